"""Qwen3's real tokenizer and chat template (tests/data/qwen3-tokenizer): fermi's prompt ids are
the ids of transformers' apply_chat_template, for thinking on and off, multi-turn conversations
with reasoning_content, tool definitions, assistant tool calls and tool results."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from fermi.chat_template import ChatTemplate
from fermi.requests import Message

transformers = pytest.importorskip("transformers")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "e.g. Paris, 東京"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "clock", "description": "The time.", "parameters": {}},
    },
]
CALLS = [
    {
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {"id": "call_1", "type": "function", "function": {"name": "clock", "arguments": {}}},
]

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "What is 2+2?"}],
    "system and user, unicode": [
        {"role": "system", "content": "Réponds en français. 简洁。"},
        {"role": "user", "content": "Bonjour 👋"},
    ],
    "multi-turn with reasoning_content": [
        {"role": "user", "content": "Pick a number."},
        {"role": "assistant", "content": "7", "reasoning_content": "Any number will do."},
        {"role": "user", "content": "Double it."},
        {"role": "assistant", "content": "14", "reasoning_content": "7 * 2 = 14."},
        {"role": "user", "content": "And again?"},
    ],
    "reasoning after the last query is kept": [
        {"role": "user", "content": "Think, then answer."},
        {"role": "assistant", "content": "Done.", "reasoning_content": "\nSome thought.\n"},
    ],
    "think block inside assistant content": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
        {"role": "user", "content": "Bye"},
    ],
    "tool calls and results": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "", "tool_calls": CALLS},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_0"},
        {"role": "tool", "content": "12:00", "tool_call_id": "call_1"},
    ],
    "tool call beside text, then an answer": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": CALLS[:1]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_0"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thanks!"},
    ],
}


@pytest.fixture(scope="module")
def fermi_side(qwen3_tokenizer_dir):
    return (
        ChatTemplate.from_dir(qwen3_tokenizer_dir),
        Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json")),
    )


@pytest.fixture(scope="module")
def hf_tokenizer(qwen3_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


def fermi_ids(fermi_side, messages: list[dict], thinking: bool, tools) -> list[int]:
    template, tokenizer = fermi_side
    prompt = template.render([Message(**m) for m in messages], thinking, tools=tools)
    return tokenizer.encode(prompt, add_special_tokens=False).ids


def hf_ids(hf_tokenizer, messages: list[dict], thinking: bool, tools) -> list[int]:
    return hf_tokenizer.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=True,
        enable_thinking=thinking,
        tokenize=True,
        return_dict=False,
    )


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools"])
@pytest.mark.parametrize("thinking", [True, False], ids=["thinking on", "thinking off"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prompt_ids_equal_apply_chat_template(fermi_side, hf_tokenizer, name, thinking, tools):
    messages = CONVERSATIONS[name]
    expected = hf_ids(hf_tokenizer, messages, thinking, tools)
    assert fermi_ids(fermi_side, messages, thinking, tools) == expected


def test_the_cases_exercise_what_they_name(fermi_side, hf_tokenizer):
    """Guard against a vacuous pass: tools, calls, results and the thinking switch really
    reach the prompt."""
    template, _ = fermi_side
    messages = [Message(**m) for m in CONVERSATIONS["tool calls and results"]]
    prompt = template.render(messages, False, tools=TOOLS)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\n12:00\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    multi = [Message(**m) for m in CONVERSATIONS["multi-turn with reasoning_content"]]
    kept = template.render(multi[:4], True)
    assert "7 * 2 = 14." in kept and "Any number will do." not in kept
