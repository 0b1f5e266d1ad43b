"""Parsing the agent fields of chat and Responses bodies: tools, tool_choice, replayed tool calls
and results, response_format / text.format; every bad value is a 400 naming its field."""

from __future__ import annotations

import pytest

from fermi.errors import InvalidRequest
from fermi.openai_server.schemas import parse_chat, parse_responses
from fermi.requests import OutputFormat

FUNCTION = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
TOOL = {"type": "function", "function": FUNCTION}
FLAT_TOOL = {"type": "function", **FUNCTION}
USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return parse_chat({"messages": USER, **fields}).generation


def test_chat_tools_and_choices():
    assert chat(tools=[TOOL]).tools == [TOOL]
    assert chat(tools=[TOOL]).tool_choice == "auto"
    assert chat(tools=[TOOL], tool_choice="required").tool_choice == "required"
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert chat(tools=[TOOL], tool_choice=named).tool_choice == "get_weather"
    assert chat(tools=[TOOL], parallel_tool_calls=False).parallel_tool_calls is False
    assert chat().parallel_tool_calls is True


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [TOOL, TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "always"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"response_format": {"type": "bogus"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": 1}}},
         "response_format.json_schema.strict"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream_options": {"include_usage": True}, "stream": False}, "stream_options"),
        ({"response_format": {"type": "grammar", "syntax": "ebnf", "grammar": "x"}},
         "response_format.syntax"),
        ({"response_format": {"type": "grammar"}}, "response_format.grammar"),
    ],
)  # fmt: skip
def test_bad_chat_agent_fields(fields, param):
    with pytest.raises(InvalidRequest) as err:
        chat(**fields)
    assert err.value.param == param


def test_response_formats():
    assert chat(response_format={"type": "text"}).output_format is None
    assert chat(response_format={"type": "json_object"}).output_format == OutputFormat(
        "json_object", None, "response_format"
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert chat(response_format=fmt).output_format == OutputFormat(
        "json_schema", schema, "response_format.json_schema.schema"
    )
    grammar = {"type": "grammar", "syntax": "regex", "grammar": "[0-9]+"}
    assert chat(response_format=grammar).output_format == OutputFormat(
        "regex", "[0-9]+", "response_format.grammar"
    )


def test_replayed_tool_calls_and_results():
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    parsed = parse_chat({"messages": messages}).generation.messages
    assert parsed[1].content == "" and parsed[1].tool_calls == [call]
    assert (parsed[2].role, parsed[2].tool_call_id, parsed[2].content) == (
        "tool",
        "call_1",
        "sunny",
    )


def test_responses_function_items_become_chat_turns():
    body = {
        "input": [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "rain"},
        ],
        "tools": [FLAT_TOOL],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
    }
    call = parse_responses(body)
    messages = call.generation.messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[1].tool_calls] == ["c1", "c2"]
    assert [m.tool_call_id for m in messages[2:]] == ["c1", "c2"]
    assert call.generation.tools == [TOOL]
    assert call.generation.tool_choice == "get_weather"
    assert call.generation.output_format == OutputFormat(
        "json_schema", {"type": "object"}, "text.format.schema"
    )


def test_responses_items_of_one_assistant_turn_stay_one_turn():
    """A response's own output replayed in order: text after a call, or a reasoning item before
    each call, belongs to the same assistant turn as the calls (a new turn would leave them
    unanswered before it)."""
    fc = {"type": "function_call", "name": "get_weather", "arguments": "{}"}
    body = {
        "input": [
            {"role": "user", "content": "weather?"},
            {
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "Paris first."}],
            },
            {**fc, "call_id": "c1"},
            {
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "Then Rome."}],
            },
            {**fc, "call_id": "c2"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Checking both."}],
            },
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "rain"},
        ],
        "tools": [FLAT_TOOL],
    }
    messages = parse_responses(body).generation.messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool"]
    turn = messages[1]
    assert [c["id"] for c in turn.tool_calls] == ["c1", "c2"]
    assert turn.content == "Checking both."
    assert turn.reasoning_content == "Paris first.\n\nThen Rome."


def test_a_responses_json_schema_format_needs_its_name():
    body = {"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}}
    with pytest.raises(InvalidRequest) as err:
        parse_responses(body)
    assert err.value.param == "text.format.name"
