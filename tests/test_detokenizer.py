"""The streaming detokenizer's pieces join to tokenizer.decode(ids) and never break a character."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

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


# --- SentencePiece vocabularies (Llama 2, Mistral): `▁` for spaces, <0xNN> byte fallback --------


@pytest.fixture(scope="module")
def sentencepiece() -> Tokenizer:
    """A llama-style tokenizer.json: BPE with byte fallback, `▁` prepended and for spaces, and
    the decoder Llama 2 ships (Replace ▁, ByteFallback, Fuse, Strip one leading space). The
    256 byte tokens are ordinary vocabulary entries, as in Llama's."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_tokens(ADDED)
    return tok


@pytest.mark.parametrize("text", [*SAMPLES, "Hello world", "x  y", " lead", "ünï 😀 end", "🦙 € 𝔘"])
def test_sentencepiece_pieces_join_to_decode(sentencepiece, text):
    ids = sentencepiece.encode(text).ids
    pieces = stream(sentencepiece, ids)
    assert "".join(pieces) == sentencepiece.decode(ids)
    assert not any("\u2581" in p or "\ufffd" in p for p in pieces)


def test_sentencepiece_spaces_stream_as_spaces(sentencepiece):
    """The `▁Hello▁world` bug: each piece has real spaces, and the first word has none before it
    (the decoder strips the prepended one)."""
    ids = sentencepiece.encode("Hello world, this is a test.").ids
    pieces = [p for p in stream(sentencepiece, ids) if p]
    assert "".join(pieces) == "Hello world, this is a test."
    assert any(p.startswith(" ") or p.endswith(" ") for p in pieces)


def test_sentencepiece_byte_fallback_characters_are_never_split(sentencepiece):
    ids = sentencepiece.encode("🦙").ids  # not in the training corpus: four byte tokens
    assert sum(sentencepiece.id_to_token(i).startswith("<0x") for i in ids) == 4
    pieces = stream(sentencepiece, ids)
    assert [p for p in pieces if p] == ["🦙"]


def test_sentencepiece_special_and_unknown_ids(sentencepiece):
    bos, eos = sentencepiece.token_to_id("<s>"), sentencepiece.token_to_id("</s>")
    size = sentencepiece.get_vocab_size(with_added_tokens=True)
    ids = [bos, *sentencepiece.encode("ok 你好").ids, size + 3, eos]
    assert "".join(stream(sentencepiece, ids)) == sentencepiece.decode(ids) == "ok 你好"


def test_sentencepiece_random_id_sequences_match_decode(sentencepiece):
    """Random ids without byte tokens match decode() exactly. Runs of byte tokens that are not
    valid UTF-8 differ in one way only: ByteFallback replaces the whole run, while a character
    already streamed before the run went wrong stays (the module docstring)."""
    size = sentencepiece.get_vocab_size(with_added_tokens=True)
    byte_ids = {i for i in range(size) if sentencepiece.id_to_token(i).startswith("<0x")}
    words = [i for i in range(size) if i not in byte_ids]
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.choice(words) for _ in range(rng.randrange(1, 20))]
        assert "".join(stream(sentencepiece, ids)) == sentencepiece.decode(ids), ids
    for _ in range(300):
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 20))]
        joined, expected = "".join(stream(sentencepiece, ids)), sentencepiece.decode(ids)
        assert "\u2581" not in joined, ids
        # Everything decode() shows as text appears, in order (a subsequence).
        rest = iter(joined)
        assert all(ch in rest for ch in expected.replace("\ufffd", "")), ids


def test_finalize_gives_out_an_unfinished_character(tokenizer):
    """A stream cut inside a character: finalize() hands out what decode() gives (U+FFFD)."""
    ids = tokenizer.encode("😀").ids[:-1]
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) and pieces[-1]


def test_qwen3_real_vocabulary(qwen3_tokenizer_dir):
    """Qwen3's own tokenizer.json: every sample, and all of them joined with its special and
    think tokens, stream to exactly decode()."""
    qwen = Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))
    text = "<|im_start|>assistant\n<think>\n" + "\n".join(SAMPLES + CORPUS) + "</think><|im_end|>"
    ids = qwen.encode(text).ids
    pieces = stream(qwen, ids)
    assert "".join(pieces) == qwen.decode(ids) and "<think>" in "".join(pieces)
    assert not any("\ufffd" in p for p in pieces)


def test_a_cut_off_output_drops_its_unfinished_character(qwen3_tokenizer_dir):
    """Qwen3's real byte-level vocabulary splits an emoji across byte tokens: an output cut off
    inside it (max_tokens) ends before the character, not with U+FFFD."""
    qwen = Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))
    ids = qwen.encode("ok 🦜").ids
    emoji_start = next(i for i in range(len(ids)) if "\ufffd" in qwen.decode(ids[: i + 1]))
    for end in range(emoji_start + 1, len(ids)):  # every cut inside the emoji
        detok = StreamingDetokenizer(qwen)
        pieces = [detok.add_token(i) for i in ids[:end]]
        text = "".join(pieces) + detok.finalize(cut=True)
        assert text == "ok " or text == "ok", (end, text)
        assert "\ufffd" in qwen.decode(ids[:end])  # what finalize() without cut gives
    detok = StreamingDetokenizer(qwen)
    whole = "".join(detok.add_token(i) for i in ids) + detok.finalize(cut=True)
    assert whole == "ok 🦜"  # a complete character is kept
