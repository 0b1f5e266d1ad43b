"""The streaming detokenizer's pieces join to tokenizer.decode(ids) and never break a character."""

from __future__ import annotations

import random

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from fermi.detokenizer import StreamingDetokenizer, bytes_to_unicode, token_bytes_table

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<think>", "</think>", "<tool_call>", "ünï"]  # not special: they survive decoding

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    print('hello, world')\n    return 0\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "日本語のテキストも少し入れておきます。",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈",
    "Ünïcödé àccénts and ñ, ß, Ω, Ж, ع",
    "   leading spaces\ttabs\n\nnewlines   ",
]

SAMPLES = [
    "你好，世界",
    "中文和English混合 text，还有标点。",
    "😀😃😄 emoji 🎉",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 tone",
    "def f(x):\n\treturn x ** 2  # square\n",
    "  odd   spacing \n\n\n  and\ttabs\t",
    "<think>\n推理过程\n</think>\n\nAnswer: 42 ✅",
    "Ω≈ç√∫˜µ≤≥÷ ÅÍÎÏ˝ÓÔ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛼𝛽 and 🀄 mahjong",
    "",
    "\n",
    "a",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Qwen-like: split with a regex, then map bytes to printable characters.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+"), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.add_tokens(ADDED)
    return tok


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tokenizer)
    pieces = [detok.add_token(i) for i in ids]
    return [*pieces, detok.finalize()]


@pytest.mark.parametrize("text", SAMPLES)
def test_pieces_join_to_decode_without_broken_characters(tokenizer, text):
    ids = tokenizer.encode(text).ids
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_characters_are_split_across_tokens(tokenizer):
    # The fixture's vocabulary is small, so CJK and emoji really do span several tokens.
    ids = tokenizer.encode("👨‍👩‍👧‍👦").ids
    assert len(ids) > 1
    pieces = stream(tokenizer, ids)
    assert "" in pieces[:-1]  # something was held back until its character completed


def test_special_tokens_produce_nothing_and_added_tokens_their_content(tokenizer):
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    think = tokenizer.token_to_id("<think>")
    ids = [im_start, *tokenizer.encode("hi 你").ids, think, im_end]
    pieces = stream(tokenizer, ids)
    assert pieces[0] == "" and pieces[-2] == ""
    assert "".join(pieces) == tokenizer.decode(ids) == "hi 你<think>"


def test_non_ascii_added_token_matches_the_library(tokenizer):
    # tokenizers' ByteLevel decoder maps an added token's characters through the byte map when it
    # can, so "ünï" decodes to invalid UTF-8; the stream reproduces decode() exactly.
    ids = tokenizer.encode("x ünï y").ids
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_ids_beyond_the_vocab_produce_nothing(tokenizer):
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = [*tokenizer.encode("ok 好").ids, size, size + 1000, *tokenizer.encode("!").ids]
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == "ok 好!"


def test_random_id_sequences_match_decode(tokenizer):
    # Arbitrary ids produce invalid UTF-8 too: the join must still equal decode(), U+FFFD and all.
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(size + 5) for _ in range(rng.randrange(1, 20))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids


def test_reset_starts_over(tokenizer):
    detok = StreamingDetokenizer(tokenizer)
    ids = tokenizer.encode("😀").ids
    detok.add_token(ids[0])  # a held partial character
    detok.reset()
    assert "".join([detok.add_token(i) for i in ids]) + detok.finalize() == "😀"


def test_byte_map_and_table_cache(tokenizer):
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert token_bytes_table(tokenizer) is token_bytes_table(tokenizer)
