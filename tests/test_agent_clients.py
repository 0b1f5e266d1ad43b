"""Tools and structured output through the clients people point at a local server, against a
live `fermi serve openai` on 127.0.0.1: openai-python (chat and Responses), litellm,
langchain-openai and the `llm` CLI.

tiny-qwen3 has random weights: what it says is gibberish, but under constrained decoding its
tool calls and JSON answers are valid, so these tests check validity against the schemas, never
the words. Where a client cannot ask for a forced call (`llm --functions` sends tool_choice auto)
or gives no schema (langchain's json_mode), the test first finds, over HTTP, a seed with which
the model calls on its own / ends its JSON, then hands the client that seed: the server is
deterministic for a given request and seed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from fermi.constraints import close_objects
from fermi.openai_server.loadtest import serve

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no fetch at import

MODEL = "tiny-qwen3"
ENV = {"FERMI_API_KEY": "", "FERMI_DEFAULT_THINKING": "", "HF_HUB_OFFLINE": "1"}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather of a city.",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a timezone.",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["tz"],
            },
        },
    },
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    """A weather report."""

    city: str = Field(max_length=12)
    hot: bool


@pytest.fixture(scope="module")
def server(tiny_cpu_artifact):
    with serve(str(tiny_cpu_artifact), env=ENV) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def check_call(name: str, arguments: str) -> dict:
    """A call names a known function and its arguments validate against its schema (objects
    closed, as constrained decoding reads them)."""
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, close_objects(PARAMETERS[name]))
    return parsed


def find_seed(server, body: dict, done, limit: int = 400) -> int:
    """The first seed with which the server's answer to `body` satisfies `done`, twice in a
    row (so that the client, sending the same request, gets it too)."""
    with httpx.Client(base_url=server.url, timeout=60) as http:

        def ok(seed: int) -> bool:
            answer = http.post("/v1/chat/completions", json={**body, "seed": seed}).json()
            return done(answer["choices"][0])

        for seed in range(limit):
            if ok(seed) and ok(seed):
                return seed
    raise AssertionError(f"no seed in {limit} gave the answer wanted")


# -- openai-python: chat -------------------------------------------------------------------------


def test_required_tool_calls_validate(client):
    for seed in range(3):
        completion = client.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=200,
            seed=seed,
        )  # fmt: skip
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            check_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("max_tokens", [1, 3, 5, 8, 12, 20])
def test_a_forced_call_cut_off_by_max_tokens_leaks_no_tag_text(client, max_tokens):
    """A call cut off before its JSON completes is a tool call with the arguments so far
    (vLLM's behaviour) or nothing; never tag text in content. finish_reason stays length."""
    weather = [TOOLS[0]]
    completion = client.chat.completions.create(
        model=MODEL, messages=USER, tools=weather, tool_choice="required",
        max_tokens=max_tokens,
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    # null, as OpenAI's content is beside tool calls: the model was not to write text
    assert choice.message.content is None
    assert "tool_call" not in str(choice.message.model_extra)
    for call in choice.message.tool_calls or []:
        assert call.function.name == "get_weather" and call.id.startswith("call_")
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, tools=weather, tool_choice="required",
        max_tokens=max_tokens, stream=True,
    )  # fmt: skip
    chunks = [chunk for chunk in stream if chunk.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices[0].delta.content is None for chunk in chunks)  # never ""
    response = client.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[FLAT_TOOLS[0]],
        tool_choice="required", max_output_tokens=max_tokens,
    )  # fmt: skip
    assert response.output_text == ""
    calls = [item for item in response.output if item.type == "function_call"]
    assert all(call.name == "get_weather" for call in calls)


@pytest.mark.parametrize(
    "tool_choice, max_tokens", [("required", 5), ("required", 200), ("auto", 20), ("none", 5)]
)
def test_a_streamed_message_adds_up_to_the_unstreamed_one(client, tool_choice, max_tokens):
    """openai-python's stream helper assembles the same message, content null included, as
    the non-streamed answer to the same request and seed."""
    common = dict(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice, max_tokens=max_tokens,
        parallel_tool_calls=False, seed=3,
    )  # fmt: skip
    whole = client.chat.completions.create(**common).choices[0].message
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(**common, stream=True):
        state.handle_chunk(chunk)
    streamed = state.current_completion_snapshot.choices[0].message
    assert streamed.content == whole.content
    calls = [(c.id, c.function.name, c.function.arguments) for c in whole.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls or []] == [
        call[1:] for call in calls
    ]
    if tool_choice == "required":
        assert whole.content is None


def test_a_named_function_is_called_once_without_parallel_calls(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        max_tokens=200,
    )
    calls = completion.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    assert check_call("get_time", calls[0].function.arguments)["tz"] in ("UTC", "CET")


def test_streamed_tool_calls_come_as_openai_deltas(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=200,
        stream=True, seed=1,
    )  # fmt: skip
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content  # no tag text leaks into the answer
        for piece in delta.tool_calls or []:
            if piece.index not in calls:  # the first delta of a call: id, type and name
                assert piece.id.startswith("call_") and piece.type == "function"
                assert piece.function.name in PARAMETERS
                calls[piece.index] = {"name": piece.function.name, "arguments": ""}
            else:
                assert piece.id is None and piece.function.name is None
            calls[piece.index]["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and sorted(calls) == list(range(len(calls))) and calls
    for call in calls.values():
        check_call(call["name"], call["arguments"])


def test_n_choices_each_make_their_own_tool_calls(client):
    """n > 1 with tools (as vLLM allows): every choice is forced into calls of its own, and
    the streamed deltas, assembled per choice index, equal the non-streamed choices."""
    common = dict(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=200,
        n=2, seed=4,
    )  # fmt: skip
    completion = client.chat.completions.create(**common)
    assert [c.index for c in completion.choices] == [0, 1]
    whole = {}
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call.function.name, call.function.arguments)
        whole[choice.index] = [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls
        ]
    streamed: dict[int, dict[int, list[str]]] = {0: {}, 1: {}}
    finishes = {}
    for chunk in client.chat.completions.create(**common, stream=True):
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                call = streamed[choice.index].setdefault(piece.index, ["", ""])
                call[0] += piece.function.name or ""
                call[1] += piece.function.arguments or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    assembled = {i: [tuple(c) for _, c in sorted(calls.items())] for i, calls in streamed.items()}
    assert assembled == whole


def test_tools_and_replayed_calls_reach_the_prompt(client):
    def prompt_tokens(**fields) -> int:
        completion = client.chat.completions.create(model=MODEL, max_tokens=1, **fields)
        return completion.usage.prompt_tokens

    plain = prompt_tokens(messages=USER)
    assert prompt_tokens(messages=USER, tools=TOOLS) > plain + 100
    no_arguments = {**CALL, "function": {**CALL["function"], "arguments": "{}"}}
    assert prompt_tokens(messages=answered(CALL), tools=TOOLS) > prompt_tokens(
        messages=answered(no_arguments), tools=TOOLS
    )


CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
}
TIME_CALL = {
    "id": "call_2",
    "type": "function",
    "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
}


def called(*calls: dict) -> list[dict]:
    return [*USER, {"role": "assistant", "content": None, "tool_calls": list(calls)}]


def result(call_id: str | None, content: str = "21 degrees") -> dict:
    message = {"role": "tool", "content": content}
    return message if call_id is None else {**message, "tool_call_id": call_id}


def answered(call: dict) -> list[dict]:
    return [*called(call), result(call["id"])]


@pytest.mark.parametrize(
    "messages",
    [
        answered(CALL),
        [*called(CALL, TIME_CALL), result("call_2"), result("call_1")],  # any order
        [*called(CALL), result(None)],  # no id: the results answer the calls in order
        [*answered(CALL), *called(TIME_CALL)[1:], result("call_2")],  # a second round
        [*answered(CALL), *called(CALL)[1:], result("call_1")],  # an id used again, next round
        # an id-less result answers the first call not answered yet
        [*called(CALL, TIME_CALL), result("call_2"), result(None)],
    ],
)
def test_tool_messages_that_answer_the_calls_before_them_are_taken(client, messages):
    completion = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=1
    )
    assert completion.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "messages, param, words",
    [
        ([*USER, result("call_1")], "messages[1].role", "tool_calls"),
        ([*USER, {"role": "assistant", "content": "Let me see."}, result("call_1")],
         "messages[2].role", "tool_calls"),
        ([*called(CALL), result("call_2")], "messages[2].tool_call_id", "'call_2'"),
        ([*answered(CALL), {"role": "user", "content": "And?"}, result("call_1")],
         "messages[4].role", "tool_calls"),
    ],
)  # fmt: skip
def test_a_tool_message_that_answers_no_call_is_a_400(client, messages, param, words):
    """As OpenAI answers: a tool message must follow an assistant message with tool_calls
    (other tool messages may come between) and its tool_call_id must be one of them."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=1)
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error"
    assert body["message"].startswith(f"{param}: ") and words in body["message"]
    assert "\n" not in body["message"]


@pytest.mark.parametrize(
    "messages, param, words",
    [
        (called(CALL), "messages[1].tool_calls", ": call_1"),  # the end of the list
        (called(CALL, TIME_CALL), "messages[1].tool_calls", ": call_1, call_2"),
        ([*called(CALL, TIME_CALL), result("call_1")], "messages[1].tool_calls", ": call_2"),
        ([*called(CALL, TIME_CALL), result("call_2"), {"role": "user", "content": "And?"}],
         "messages[1].tool_calls", ": call_1"),
        ([*called(CALL), {"role": "assistant", "content": "It is sunny."}],
         "messages[1].tool_calls", ": call_1"),
        # id-less results answer the calls in order: the second call is left
        ([*called(CALL, TIME_CALL), result(None)], "messages[1].tool_calls", ": call_2"),
        # an unanswered turn is named before a later tool message is judged
        ([*called(CALL), *USER, *called(TIME_CALL)[1:], result("call_2")],
         "messages[1].tool_calls", ": call_1"),
    ],
)  # fmt: skip
def test_an_unanswered_tool_call_is_a_400(client, messages, param, words):
    """As OpenAI answers: each call of an assistant message needs a tool message answering it
    before the next message that is not a tool message (or the end of the list)."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=1)
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error"
    message = body["message"]
    assert message.startswith(f"{param}: ") and message.endswith(words), message
    assert "tool_call_id" in message and "\n" not in message


@pytest.mark.parametrize(
    "messages, param, words",
    [
        ([*called(CALL, TIME_CALL), result("call_1"), result("call_1"), result("call_2")],
         "messages[3].tool_call_id", ["'call_1'", "messages[2]"]),
        # the id-less result answered call_1 (the first call); call_1 again is a second answer
        ([*called(CALL, TIME_CALL), result(None), result("call_1")],
         "messages[3].tool_call_id", ["'call_1'", "messages[2]"]),
        # every call answered: an id-less result has none left to answer
        ([*called(CALL), result("call_1"), result(None)],
         "messages[3].role", ["messages[1]", "answered"]),
    ],
)  # fmt: skip
def test_a_second_answer_to_a_tool_call_is_a_400(client, messages, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=1)
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error"
    message = body["message"]
    assert message.startswith(f"{param}: ") and all(w in message for w in words), message
    assert "\n" not in message


def test_parse_with_a_pydantic_model(client):
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=MODEL, messages=USER, response_format=Weather, max_tokens=200, seed=seed
        )
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Weather)


def test_json_schema_and_json_object(client):
    schema = {
        "type": "object",
        # Bounded on both sides: "maximum" alone lets a random model write an endless
        # negative number until max_tokens cuts the JSON.
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": -99, "maximum": 99},
        },
        "required": ["ok", "n"],
    }
    completion = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=200,
        seed=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content), schema)
    completion = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=300, seed=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_grammar_extension(client):
    regex = {"type": "grammar", "syntax": "regex", "grammar": r"(yes|no), [0-9]{2}"}
    lark = {"type": "grammar", "syntax": "lark", "grammar": 'start: "color: " ("red" | "blue")'}
    answers = [
        client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=50, extra_body={"response_format": fmt}
        )
        .choices[0]
        .message.content
        for fmt in (regex, lark)
    ]
    assert re.fullmatch(r"(yes|no), [0-9]{2}", answers[0])
    assert answers[1] in ("color: red", "color: blue")


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "bogus"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "grammar", "grammar": "start: nothing"}},
         "response_format.grammar"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)  # fmt: skip
def test_bad_agent_fields_are_400s_naming_the_field(server, fields, param):
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, **fields}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


BAD_SCHEMAS = [
    ({"type": "object", "properties": {"a": {"type": "nonsense"}}}, "nonsense"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}, "regex"),
    ({"type": "string"}, "object"),
]


def check_one_line(error: openai.BadRequestError, param: str, gist: str) -> None:
    body = error.response.json()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param == error.param
    message = body["message"]
    assert "\n" not in message and len(message) < 300, message
    assert message.startswith(f"{param}: ") and "'lookup'" in message and gist in message


@pytest.mark.parametrize("tool_choice", ["required", "auto", "none"])
@pytest.mark.parametrize("schema, gist", BAD_SCHEMAS)
def test_a_tool_schema_the_compiler_rejects_is_a_one_line_400(client, schema, gist, tool_choice):
    bad = {"type": "function", "function": {"name": "lookup", "parameters": schema}}
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(
            model=MODEL, messages=USER, tools=[TOOLS[0], bad], tool_choice=tool_choice,
            max_tokens=4,
        )  # fmt: skip
    check_one_line(chat.value, "tools[1].function.parameters", gist)
    flat = {"type": "function", "name": "lookup", "parameters": schema}
    with pytest.raises(openai.BadRequestError) as responses:
        client.responses.create(
            model=MODEL, input="Weather?", tools=[FLAT_TOOLS[0], flat], tool_choice=tool_choice,
            max_output_tokens=4,
        )  # fmt: skip
    check_one_line(responses.value, "tools[1].parameters", gist)


def test_a_tool_schema_with_defs_and_refs_is_usable(client):
    """Pydantic writes nested models as $defs and `#/$defs/...` refs."""

    class Place(BaseModel):
        city: Literal["Paris", "Rome"]

    class Visit(BaseModel):
        place: Place

    tool = openai.pydantic_function_tool(Visit, name="visit")
    assert "$defs" in tool["function"]["parameters"]
    completion = client.chat.completions.create(
        model=MODEL, messages=USER, tools=[tool], tool_choice="required",
        parallel_tool_calls=False, max_tokens=200,
    )  # fmt: skip
    call = completion.choices[0].message.tool_calls[0]
    assert Visit.model_validate_json(call.function.arguments).place.city in ("Paris", "Rome")


@pytest.mark.parametrize("tool_choice", ["required", "auto", "none"])
def test_a_tool_schema_with_openapi_formats_is_usable(client, tool_choice):
    """OpenAPI-derived tools (MCP servers, generated clients) carry string formats the grammar
    compiler does not implement (`password`, `binary`, `int64`): the tool is taken, those
    strings are constrained as plain strings, and a forced call's arguments follow the rest."""
    parameters = {
        "type": "object",
        "properties": {
            "user": {"type": "string", "format": "password", "maxLength": 8},
            "blob": {"type": "string", "format": "binary", "maxLength": 8},
            "id": {"type": "string", "format": "int64", "maxLength": 8},
            "count": {"type": "integer", "format": "int32", "minimum": 0, "maximum": 9},
        },
        "required": ["user", "blob", "id", "count"],
    }
    tool = {"type": "function", "function": {"name": "login", "parameters": parameters}}
    completion = client.chat.completions.create(
        model=MODEL, messages=USER, tools=[tool], tool_choice=tool_choice,
        parallel_tool_calls=False, max_tokens=120,
    )  # fmt: skip
    if tool_choice != "required":
        return  # taken, not refused; what the model says is its own choice
    arguments = json.loads(completion.choices[0].message.tool_calls[0].function.arguments)
    assert set(arguments) == {"user", "blob", "id", "count"}
    assert all(
        isinstance(arguments[k], str) and len(arguments[k]) <= 8 for k in ("user", "blob", "id")
    )
    assert arguments["count"] in range(10)


# -- openai-python: Responses --------------------------------------------------------------------

FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


def test_responses_function_calls_and_their_outputs(client):
    response = client.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=FLAT_TOOLS,
        tool_choice="required", max_output_tokens=200,
    )  # fmt: skip
    calls = [item for item in response.output if item.type == "function_call"]
    assert response.status == "completed" and calls
    for call in calls:
        assert call.call_id.startswith("call_")
        check_call(call.name, call.arguments)
    follow_up = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            *[
                {"type": "function_call", "call_id": c.call_id, "name": c.name,
                 "arguments": c.arguments}
                for c in calls
            ],
            *[{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"}
              for c in calls],
        ],
        tools=FLAT_TOOLS,
        tool_choice="none",
        max_output_tokens=5,
    )  # fmt: skip
    assert [item.type for item in follow_up.output] == ["message"]
    assert follow_up.usage.input_tokens > response.usage.input_tokens


@pytest.mark.parametrize(
    "items, param",
    [
        ([{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}], "input[1]"),
        ([{"type": "function_call", "call_id": "call_1", "name": "get_weather",
           "arguments": "{}"},
          {"type": "function_call_output", "call_id": "call_2", "output": "sunny"}],
         "input[2].call_id"),
    ],
)  # fmt: skip
def test_a_function_call_output_that_answers_no_call_is_a_400(client, items, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(
            model=MODEL, input=[{"role": "user", "content": "Weather?"}, *items],
            tools=FLAT_TOOLS, max_output_tokens=1,
        )  # fmt: skip
    assert err.value.body["param"] == param
    message = err.value.body["message"]
    assert message.startswith(f"{param}: ")
    assert "function_call" in message and "tool" not in message, message  # Responses' words


def function_call(call_id: str) -> dict:
    return {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": "{}"}


def function_output(call_id: str) -> dict:
    return {"type": "function_call_output", "call_id": call_id, "output": "sunny"}


@pytest.mark.parametrize(
    "items, param, words",
    [
        ([function_call("call_1")], "input[1]", ["call_1"]),
        ([function_call("call_1"), function_call("call_2"), function_output("call_1")],
         "input[2]", ["call_2"]),
        ([function_call("call_1"), function_call("call_2")], "input[1]", ["call_1, call_2"]),
        ([function_call("call_1"), {"role": "user", "content": "And?"}], "input[1]", ["call_1"]),
        ([{"role": "assistant", "content": "Let me see."}, function_call("call_1"),
          function_output("call_2")], "input[3].call_id", ["'call_2'"]),
        ([function_call("call_1"), function_output("call_1"), function_output("call_1")],
         "input[3].call_id", ["'call_1'", "input[2]"]),
    ],
)  # fmt: skip
def test_an_unanswered_or_twice_answered_function_call_is_a_400(client, items, param, words):
    """As OpenAI answers ("No tool output found for function call call_1."): each
    function_call item needs a function_call_output with its call_id, before the next item that
    is neither; and a call is answered once."""
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(
            model=MODEL, input=[{"role": "user", "content": "Weather?"}, *items],
            tools=FLAT_TOOLS, max_output_tokens=1,
        )  # fmt: skip
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error"
    message = body["message"]
    assert message.startswith(f"{param}: ") and all(w in message for w in words), message
    assert "\n" not in message


def test_a_response_output_replayed_in_order_is_taken(client):
    """Text the model wrote after its call, and a reasoning item before each call, replayed in
    the order a response's output holds them, then the outputs: one assistant turn."""
    reasoning = {
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "Check the weather."}],
    }
    text = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Checking."}],
    }
    items = [reasoning, function_call("call_1"), reasoning, function_call("call_2"), text,
             function_output("call_1"), function_output("call_2")]  # fmt: skip
    response = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "Weather?"}, *items], tools=FLAT_TOOLS,
        tool_choice="none", max_output_tokens=1,
    )  # fmt: skip
    assert response.status == "incomplete"


def test_function_calls_answered_between_them_are_taken(client):
    """A function_call, its output, another call and its output: two answered turns."""
    items = [function_call("call_1"), function_output("call_1"), function_call("call_2"),
             function_output("call_2")]  # fmt: skip
    response = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "Weather?"}, *items], tools=FLAT_TOOLS,
        tool_choice="none", max_output_tokens=1,
    )  # fmt: skip
    assert response.status == "incomplete"


def test_responses_stream_function_call_events(client):
    events = list(
        client.responses.create(
            model=MODEL, input="Weather?", tools=FLAT_TOOLS,
            tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False, max_output_tokens=200, stream=True,
        )
    )  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"}
    added, done = events[2].item, events[-2].item
    assert added.type == "function_call" and added.name == "get_weather" and added.arguments == ""
    arguments = "".join(e.delta for e in events if e.type.endswith("arguments.delta"))
    assert arguments == events[-3].arguments == done.arguments
    check_call("get_weather", arguments)
    assert events[-1].response.output[0].call_id == added.call_id


def test_responses_text_format(client):
    response = client.responses.create(
        model=MODEL,
        input="Weather?",
        max_output_tokens=200,
        text={"format": {"type": "json_schema", "name": "weather", "strict": True,
                         "schema": Weather.model_json_schema()}},
    )  # fmt: skip
    Weather.model_validate_json(response.output_text)
    assert response.text.format.type == "json_schema"


# -- litellm ---------------------------------------------------------------------------------


def test_litellm_tool_calls(server):
    import litellm

    common = dict(
        model=f"openai/{MODEL}", api_base=server.url + "/v1", api_key="unused",
        messages=USER, tools=TOOLS, tool_choice="required", max_tokens=200,
    )  # fmt: skip
    response = litellm.completion(**common)
    assert response.choices[0].finish_reason == "tool_calls"
    for call in response.choices[0].message.tool_calls:
        check_call(call.function.name, call.function.arguments)
    chunks = list(litellm.completion(**common, stream=True))
    rebuilt = litellm.stream_chunk_builder(chunks)
    assert rebuilt.choices[0].finish_reason == "tool_calls"
    for call in rebuilt.choices[0].message.tool_calls:
        check_call(call.function.name, call.function.arguments)
    # The tool loop: the assistant message as litellm gives it back, then the results.
    message = response.choices[0].message
    results = [
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"} for call in message.tool_calls
    ]
    follow_up = litellm.completion(
        **{**common, "messages": [*USER, message, *results], "tool_choice": "none",
           "max_tokens": 2},
    )  # fmt: skip
    assert follow_up.choices[0].finish_reason == "length"


def test_litellm_cache_control_marks_are_taken(server):
    """litellm passes Anthropic-style `cache_control` marks on to servers other than OpenAI's,
    on a message and on a content part: they ask for the prefix caching fermi does anyway."""
    import litellm

    cached = {"type": "ephemeral"}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief.",
                                        "cache_control": cached}]},
        {"role": "user", "content": "Hello", "cache_control": cached},
    ]  # fmt: skip
    response = litellm.completion(
        model=f"openai/{MODEL}", api_base=server.url + "/v1", api_key="unused",
        messages=messages, max_tokens=2,
    )  # fmt: skip
    assert response.choices[0].finish_reason in ("length", "stop")


# -- langchain-openai ----------------------------------------------------------------------------


class GetWeather(BaseModel):
    """The current weather of a city."""

    city: str = Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]


def langchain_model(server, **fields):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=MODEL, base_url=server.url + "/v1", api_key="unused", max_tokens=200, max_retries=0,
        **fields,
    )  # fmt: skip


@pytest.fixture
def chat_model(server):
    return langchain_model(server)


def test_langchain_standard_content_blocks(chat_model):
    """LangChain v1's standard content blocks carry an `id` on each block, which it sends on
    user and system messages."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_core.messages.content import create_text_block

    messages = [
        SystemMessage(content_blocks=[create_text_block("Be brief.")]),
        HumanMessage(content_blocks=[create_text_block("Hello"), create_text_block("there")]),
    ]
    assert messages[1].content[0]["id"]  # what goes over the wire
    assert chat_model.bind(max_tokens=2).invoke(messages).response_metadata["finish_reason"]


def test_langchain_bind_tools(chat_model):
    message = chat_model.bind_tools([GetWeather], tool_choice="required").invoke("Weather?")
    assert message.tool_calls and {c["name"] for c in message.tool_calls} == {"GetWeather"}
    for call in message.tool_calls:
        assert set(call["args"]) == {"city", "unit"} and call["id"].startswith("call_")


def test_langchain_tool_loop(chat_model):
    """ToolMessages answer the AIMessage's calls by id; one that answers none is refused."""
    from langchain_core.messages import HumanMessage, ToolMessage

    model = chat_model.bind_tools([GetWeather])
    question = HumanMessage("Weather?")
    message = chat_model.bind_tools([GetWeather], tool_choice="required").invoke([question])
    results = [ToolMessage("sunny", tool_call_id=call["id"]) for call in message.tool_calls]
    assert results
    model.bind(max_tokens=2).invoke([question, message, *results])
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        model.invoke([question, message, ToolMessage("sunny", tool_call_id="call_nope")])


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output_with_a_schema(chat_model, method):
    report = chat_model.with_structured_output(Weather, method=method).invoke("Weather?")
    assert isinstance(report, Weather)


def test_langchain_structured_output_json_mode(server):
    """json_mode sends no schema (only response_format json_object), so the answer is any JSON
    object: the seed is one with which the model closes its object within max_tokens."""
    prompt = "Weather? Reply in JSON."
    seed = find_seed(
        server,
        {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 200,
         "response_format": {"type": "json_object"}},
        lambda choice: choice["finish_reason"] == "stop",
    )  # fmt: skip
    schema = {"title": "anything", "type": "object"}
    model = langchain_model(server, seed=seed)
    structured = model.with_structured_output(schema, method="json_mode")
    assert isinstance(structured.invoke(prompt), dict)


# -- the llm CLI ---------------------------------------------------------------------------------

LLM = [sys.executable, "-m", "llm"]
FUNCTION = """
def get_weather(city: str) -> str:
    "Get the weather of a city."
    open(CALLED, "w").write(city)
    return "sunny"
"""


@pytest.fixture
def llm_env(server, tmp_path):
    """A user dir whose extra-openai-models.yaml points `llm` at the live server."""
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: fermi-tiny\n  model_name: {MODEL}\n  api_base: {server.url}/v1\n"
        "  supports_tools: true\n  supports_schema: true\n"
    )
    return {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": "unused"}


def run_llm(env, *args: str, check: bool = True) -> str:
    done = subprocess.run([*LLM, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 or not check, done.stderr
    return done.stdout


def test_llm_schema(llm_env):
    schema = json.dumps(Weather.model_json_schema())  # llm takes a JSON schema or its DSL
    output = run_llm(
        llm_env, "-m", "fermi-tiny", "--schema", schema, "-o", "max_tokens", "200", "Hi"
    )  # fmt: skip
    answer = json.loads(output)
    assert set(answer) == {"city", "hot"} and isinstance(answer["hot"], bool)


def test_llm_functions_run_the_tool_loop(server, llm_env, tmp_path):
    """llm sends tool_choice auto; with the seed found here the model calls on its own, the
    call is valid (the grammar applies from the model's <tool_call> on), llm runs the function
    and sends its result back."""
    called = tmp_path / "called.txt"
    prompt = "What is the weather in Paris?"
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather of a city.",
            "parameters": {
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "type": "object",
            },
        },
    }  # as llm builds it from FUNCTION's signature
    seed = find_seed(
        server,
        {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "tools": [tool],
         "max_tokens": 200},
        lambda choice: choice["finish_reason"] == "tool_calls",
    )  # fmt: skip
    code = f"CALLED = {str(called)!r}\n{FUNCTION}"
    # With the same seed the random model may call again after the result: llm then stops the
    # chain at its limit (exit 1), after running the function and sending its result back.
    before = chat_requests(server)
    run_llm(llm_env, "-m", "fermi-tiny", "--functions", code, "-o", "seed", str(seed),
            "-o", "max_tokens", "200", "--chain-limit", "2", prompt, check=False)  # fmt: skip
    assert called.is_file()  # llm ran the function the model called
    assert chat_requests(server) == before + 2  # and sent its result back


def chat_requests(server) -> float:
    """Answered POST /v1/chat/completions so far, from /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {"route": "/v1/chat/completions", "status": "200"}
            if sample.name == "fermi_http_requests_total" and sample.labels == labels:
                return sample.value
    return 0.0


# -- reasoning under both names ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reasoning_stub():
    """An HTTP server on 127.0.0.1 that answers every chat request with fermi's own formatters
    and a scripted reasoning turn (the random tiny model never reasons)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from fermi.openai_server import formatters as fmt
    from fermi.requests import Finished, TextDelta, Usage

    finished = Finished("stop", Usage(5, 3, 2, 0), "s", True)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            meta = fmt.Meta("chatcmpl-1", MODEL, None)
            if body.get("stream"):
                frames = fmt.ChatStream(meta, include_usage=True)
                deltas = [
                    TextDelta("Let me see.", "reasoning", [1]),
                    TextDelta("Hi", "answer", [2]),
                ]
                out = frames.start() + "".join(map(frames.text, deltas)) + frames.finish(finished)
                kind = "text/event-stream"
            else:
                choice = fmt.ChoiceText(0, "Let me see.", "Hi")
                body = fmt.chat_completion(meta, [choice], finished)
                out, kind = json.dumps(body), "application/json"
            self.send_response(200)
            self.send_header("content-type", kind)
            self.end_headers()
            self.wfile.write(out.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_reasoning_under_both_names_breaks_no_client(reasoning_stub):
    """fermi sends reasoning as `reasoning_content` and `reasoning`: each client reads the one
    it knows, none fails, none copies it into the answer."""
    import litellm
    from langchain_openai import ChatOpenAI

    client = openai.OpenAI(base_url=reasoning_stub, api_key="unused", max_retries=0)
    message = client.chat.completions.create(model=MODEL, messages=USER).choices[0].message
    assert message.content == "Hi" and message.model_extra["reasoning"] == "Let me see."
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi"
    common = dict(model=f"openai/{MODEL}", api_base=reasoning_stub, api_key="unused", messages=USER)
    answer = litellm.completion(**common).choices[0].message
    assert (answer.content, answer.reasoning_content) == ("Hi", "Let me see.")
    pieces = list(litellm.completion(**common, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == "Hi"
    chat = ChatOpenAI(model=MODEL, base_url=reasoning_stub, api_key="unused", max_retries=0)
    assert chat.invoke("x").content == "Hi"
    assert "".join(m.content for m in chat.stream("x")) == "Hi"
