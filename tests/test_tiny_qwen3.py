"""The built-in tiny-qwen3 checkpoint: deterministic build, Qwen3's tokens and config shape, and
a chat template that honours enable_thinking the way Qwen3's does."""

from __future__ import annotations

import json

import jinja2
import pytest

from export import tiny
from fermi.settings import Settings

FILES = (
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
)


def test_build_is_deterministic(tmp_path):
    tiny.build(tmp_path / "a")
    tiny.build(tmp_path / "b")
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_checkpoint_path_builds_once_and_repairs(tmp_path):
    settings = Settings(artifacts=str(tmp_path))
    directory = tiny.checkpoint_path(settings)
    assert directory == tmp_path / ".checkpoints" / "tiny-qwen3"
    weights = directory / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert tiny.checkpoint_path(settings) == directory
    assert weights.stat().st_mtime_ns == built
    weights.unlink()
    tiny.checkpoint_path(settings)
    assert weights.is_file()


def test_config_has_the_tiny_qwen3_shape():
    directory = tiny.checkpoint_path()
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert {k: config[k] for k in tiny.SHAPE} == tiny.SHAPE
    assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
    assert (config["rope_theta"], config["rms_norm_eps"]) == (1e6, 1e-6)
    assert config["tie_word_embeddings"] is True
    size = tiny.train_tokenizer().get_vocab_size()
    assert config["vocab_size"] % 64 == 0 and size <= config["vocab_size"] < size + 64
    generation = json.loads((directory / "generation_config.json").read_text())
    tokenizer = tiny.train_tokenizer()
    assert generation["eos_token_id"] == [
        tokenizer.token_to_id("<|im_end|>"),
        tokenizer.token_to_id("<|endoftext|>"),
    ]
    assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.6, 0.95, 20)
    assert generation["do_sample"] is True


def test_tokenizer_carries_qwen3_tokens():
    tokenizer = tiny.train_tokenizer()
    assert 1000 <= tokenizer.get_vocab_size() <= 2000
    for token in tiny.SPECIAL + tiny.MARKUP:
        assert tokenizer.encode(token).tokens == [token]
    text = "<think>\nplan</think>\n\nHi 你好 🎉<|im_end|>"
    ids = tokenizer.encode(text).ids
    # Think tags are not special: they survive skip_special_tokens; <|im_end|> does not.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nplan</think>\n\nHi 你好 🎉"
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "今天天气很好，我们去公园散步吧。",
        "emoji 👩‍💻🇫🇷 done ✅",
        "def f(x):\n    return x ** 2\n",
        "  odd   spacing\t\ttabs\n\n",
    ],
)
def test_tokenizer_round_trips(text):
    tokenizer = tiny.train_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def render(messages, **kwargs) -> str:
    """The template as a plain jinja2 renderer (what serving uses) sees it."""
    config = json.loads((tiny.checkpoint_path() / "tokenizer_config.json").read_text())
    return (
        jinja2.Environment()
        .from_string(config["chat_template"])
        .render(messages=messages, **kwargs)
    )


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_generation_prompt_with_thinking_on_or_unset():
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(CHAT, add_generation_prompt=True) == expected
    assert render(CHAT, add_generation_prompt=True, enable_thinking=True) == expected


def test_generation_prompt_with_thinking_off_prefills_an_empty_think_block():
    assert render(CHAT, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_reasoning_is_dropped_before_the_last_user_turn_and_kept_after():
    messages = CHAT + [
        {"role": "assistant", "content": "<think>\nold plan\n</think>\n\nHello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 is 4"},
    ]
    text = render(messages)
    assert "old plan" not in text
    assert "<|im_start|>assistant\nHello!<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n2 plus 2 is 4\n</think>\n\n4<|im_end|>\n")


def test_tool_turns():
    messages = CHAT + [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}],
        },
        {"role": "tool", "content": "4"},
        {"role": "tool", "content": "ok"},
    ]
    text = render(messages, add_generation_prompt=True)
    assert (
        '<|im_start|>assistant\n\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}'
        "\n</tool_call><|im_end|>\n"
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<tool_response>\nok\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in text


def test_transformers_loads_tokenizer_and_template():
    transformers = pytest.importorskip("transformers")
    directory = tiny.checkpoint_path()
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    text = "Hello 你好 🎉 <think>x</think>"
    assert hf(text)["input_ids"] == tiny.train_tokenizer().encode(text).ids
    for thinking in (True, False):
        rendered = hf.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        assert rendered == render(CHAT, add_generation_prompt=True, enable_thinking=thinking)
