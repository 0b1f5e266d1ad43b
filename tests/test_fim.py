"""Fill-in-the-middle prompts: found from the vocabulary, rendered prefix-suffix-middle, and a
clear 400 for a model without FIM tokens; a raw prompt's output is never split into reasoning."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from fermi.detokenizer import StreamingDetokenizer
from fermi.errors import InvalidRequest
from fermi.fim import fim_tokens, render_fim
from fermi.runtime import TextPipeline
from fermi.sampling import SampledToken
from fermi.text_stream import OutputChannels, channel_table


def test_qwen3_vocab_has_fim_tokens_and_renders_psm(qwen3_tokenizer_dir):
    tokenizer = Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))
    tokens = fim_tokens(tokenizer.get_vocab(with_added_tokens=True))
    assert tokens == ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
    prompt = render_fim(tokens, "def add(a, b):\n    ", "\n    return c\n")
    assert (
        prompt == "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n    return c\n<|fim_middle|>"
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    specials = [tokenizer.token_to_id(t) for t in tokens]
    assert [i for i in ids if i in specials] == specials  # each one token, in PSM order


def test_starcoder_spelling_and_no_fim():
    assert fim_tokens({"<fim_prefix>": 1, "<fim_suffix>": 2, "<fim_middle>": 3}) == (
        "<fim_prefix>", "<fim_suffix>", "<fim_middle>",
    )  # fmt: skip
    assert fim_tokens({"<fim_prefix>": 1}) is None
    with pytest.raises(InvalidRequest) as e:
        render_fim(None, "a", "b")
    assert e.value.param == "suffix"


def test_raw_output_keeps_think_tags_verbatim(qwen3_tokenizer_dir):
    tokenizer = Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))
    ids = tokenizer.encode("<think>x</think> y", add_special_tokens=False).ids
    # The runtime gives a raw prompt's output one channel, the answer, whatever its tags.
    channels = OutputChannels(channel_table(("<think>", "</think>"), None), "answer")
    raw = TextPipeline(StreamingDetokenizer(tokenizer), [], channels)
    deltas = [d for i in ids for d in raw.add(SampledToken(i))[0]] + raw.finish()
    assert {d.kind for d in deltas} == {"answer"}
    assert "".join(d.text for d in deltas) == "<think>x</think> y"
