"""Tools through Qwen3's real chat template: tools grow the prompt, replayed calls and results
are rendered, and the tool-call and reasoning tags are read from the template. Token identity
with transformers' apply_chat_template is tests/test_qwen3_template_parity.py's."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from fermi.chat_template import ChatTemplate, infer_reasoning_tags, infer_tool_call_tags
from fermi.requests import Message

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "now", "description": "The time: ünïcode kept.", "parameters": {}},
    },
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
CALL_DICT_ARGS = {
    "id": "call_2",
    "type": "function",
    "function": {"name": "now", "arguments": {}},
}

CONVERSATIONS = {
    "tools only": [Message("user", "What is the weather in Paris?")],
    "system and tools": [
        Message("system", "You are terse."),
        Message("user", "What is the weather in Paris?"),
    ],
    "tool round trip": [
        Message("user", "Weather in Paris, and the time?"),
        Message("assistant", "", tool_calls=[CALL, CALL_DICT_ARGS]),
        Message("tool", '{"temp": 21}', tool_call_id="call_1"),
        Message("tool", "12:00", tool_call_id="call_2"),
    ],
    "content beside a call, then an answer": [
        Message("user", "Weather?"),
        Message(
            "assistant", "Let me check.", reasoning_content="Need the tool.", tool_calls=[CALL]
        ),
        Message("tool", "sunny", tool_call_id="call_1"),
        Message("assistant", "Sunny."),
        Message("user", "Thanks"),
    ],
}


@pytest.fixture(scope="module")
def ours(qwen3_tokenizer_dir):
    template = ChatTemplate.from_dir(qwen3_tokenizer_dir)
    tokenizer = Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))
    return template, tokenizer


def test_tools_change_the_prompt(ours):
    """The issue's symptom: with a tool the prompt must grow (it was 19 tokens either way)."""
    template, tokenizer = ours
    messages = CONVERSATIONS["tools only"]
    plain = tokenizer.encode(template.render(messages, enable_thinking=False)).ids
    with_tools = tokenizer.encode(template.render(messages, False, tools=TOOLS)).ids
    assert len(with_tools) > len(plain) + 100


def test_replayed_calls_and_results_are_in_the_prompt(ours):
    template, _ = ours
    prompt = template.render(CONVERSATIONS["tool round trip"], False, tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in (
        prompt
    )
    assert '{"name": "now", "arguments": {}}' in prompt
    assert "<tool_response>\n12:00\n</tool_response>" in prompt


def test_tags_are_inferred_from_the_template(ours):
    template, _ = ours
    assert infer_tool_call_tags(template.source) == (["<tool_call>", "</tool_call>"], "hermes")
    assert infer_reasoning_tags(template.source, False) == ["<think>", "</think>"]
    assert infer_tool_call_tags("{{ messages[0].content }}") == (None, None)
    assert infer_reasoning_tags("{{ messages[0].content }}", False) is None
