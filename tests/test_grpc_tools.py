"""Tools and structured output over gRPC, through a real grpc client and the live server of
tests/test_grpc.py: tool calls are their own message kind, their results go back as the next
turn of the session, and a JSON schema constrains the answer."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from fermi.constraints import close_objects
from fermi.grpc_server import fermi_pb2 as pb
from fermi.grpc_server import fermi_pb2_grpc as pb_grpc
from tests.test_grpc import OPTIONS, rpc_error, server_address  # noqa: F401 (fixture)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "hot": {"type": "boolean"}},
    "required": ["city", "hot"],
}
TOOL = pb.Tool(
    name="get_weather", description="The weather of a city.", parameters_json=json.dumps(WEATHER)
)


@pytest.fixture(scope="module")
def stub(server_address):  # noqa: F811
    with grpc.insecure_channel(server_address, options=OPTIONS) as channel:
        yield pb_grpc.FermiStub(channel)


def generate(stub, **fields) -> list[pb.GenerateResponse]:
    fields.setdefault("thinking", pb.THINKING_OFF)
    fields.setdefault("max_new_tokens", 200)
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=120))


def test_a_forced_call_streams_as_tool_call_messages_and_its_result_continues(stub):
    *pieces, last = generate(stub, prompt="Weather in Paris?", tools=[TOOL], tool_choice="required")
    assert last.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert pieces and all(p.kind == pb.TEXT_KIND_TOOL_CALL and not p.token for p in pieces)
    calls: dict[int, dict] = {}
    for piece in pieces:
        call = piece.tool_call
        if call.id:
            assert call.id.startswith("call_") and call.name == "get_weather"
            calls[call.index] = {"id": call.id, "arguments": ""}
        calls[call.index]["arguments"] += call.arguments
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), close_objects(WEATHER))
    results = [pb.ToolResult(tool_call_id=c["id"], content="sunny") for c in calls.values()]
    *_, after = generate(
        stub, session_id=last.session_id, tool_results=results, tools=[TOOL],
        tool_choice="none", max_new_tokens=4, ignore_eos=True,
    )  # fmt: skip
    assert after.finish_reason == pb.FINISH_REASON_LENGTH
    assert after.usage.cached_tokens > 0  # the same session, its calls in the history


def test_json_schema_constrains_the_answer(stub):
    *pieces, last = generate(stub, prompt="Weather?", json_schema=json.dumps(WEATHER))
    assert last.finish_reason == pb.FINISH_REASON_STOP
    answer = json.loads("".join(p.token for p in pieces))
    jsonschema.validate(answer, close_objects(WEATHER))


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"prompt": "x", "json_schema": "{not json"}, "json_schema"),
        ({"prompt": "x", "json_schema": '{"$ref": "#/nope"}'}, "json_schema"),
        ({"prompt": "x", "tools": [pb.Tool(name="f", parameters_json="[]")]},
         "tools[0].parameters_json"),
        ({"prompt": "x", "tools": [TOOL], "tool_choice": "other"}, "tool_choice"),
        ({"prompt": ""}, "prompt"),
    ],
)  # fmt: skip
def test_bad_agent_fields_are_invalid_argument(stub, fields, field):
    error = rpc_error(lambda: generate(stub, **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()


@pytest.mark.parametrize("tool_choice", ["required", "auto", "none"])
@pytest.mark.parametrize(
    "schema, gist",
    [
        ({"type": "object", "properties": {"a": {"type": "nonsense"}}}, "nonsense"),
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}, "regex"),
        ({"type": "string"}, "object"),
    ],
)
def test_a_tool_schema_the_compiler_rejects_is_one_line_naming_the_tool(
    stub, schema, gist, tool_choice
):
    bad = pb.Tool(name="lookup", parameters_json=json.dumps(schema))
    error = rpc_error(
        lambda: generate(stub, prompt="x", tools=[TOOL, bad], tool_choice=tool_choice)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details()
    assert "\n" not in details and len(details) < 300, details
    assert details.startswith("tools[1].parameters_json: ") and "'lookup'" in details
    assert gist in details


def test_a_tool_schema_with_defs_and_refs_is_usable(stub):
    """Pydantic writes nested models as $defs and `#/$defs/...` refs."""
    schema = {
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}},
        "required": ["place"],
        "$defs": {"Place": {"type": "string", "enum": ["Paris", "Rome"]}},
    }
    tool = pb.Tool(name="visit", parameters_json=json.dumps(schema))
    *pieces, last = generate(
        stub, prompt="Go", tools=[tool], tool_choice="visit", parallel_tool_calls=False
    )
    assert last.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    arguments = "".join(p.tool_call.arguments for p in pieces)
    assert json.loads(arguments)["place"] in ("Paris", "Rome")


def forced_calls(stub, seed: int | None = None) -> tuple[str, list[str]]:
    """A new session whose turn made tool calls: its id and the calls' ids. With a seed, drawn
    at temperature 1.5, which lets the random model go on to a second call now and then."""
    sampling = pb.Sampling(seed=seed, temperature=1.5) if seed is not None else None
    *pieces, last = generate(
        stub, prompt="Weather in Paris?", tools=[TOOL], tool_choice="required", sampling=sampling
    )
    assert last.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    return last.session_id, [p.tool_call.id for p in pieces if p.tool_call.id]


def several_calls(stub) -> tuple[str, list[str]]:
    """A new session whose turn made two or more tool calls (the first seed that does)."""
    for seed in range(100):
        session, ids = forced_calls(stub, seed)
        if len(ids) > 1:
            return session, ids
    raise AssertionError("no seed in 100 made parallel calls")


def test_tool_results_answer_the_calls_of_the_previous_turn(stub):
    session, ids = forced_calls(stub)
    wrong = [pb.ToolResult(tool_call_id="call_nope", content="sunny")]
    error = rpc_error(lambda: generate(stub, session_id=session, tool_results=wrong))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details()
    assert details.startswith("tool_results[0].tool_call_id: ")
    assert "'call_nope'" in details and ids[0] in details and "\n" not in details
    # Refused, the session still waits for its results; an empty id answers by position.
    results = [pb.ToolResult(tool_call_id=ids[0], content="sunny")]
    results += [pb.ToolResult(content="rain") for _ in ids[1:]]
    *_, last = generate(
        stub, session_id=session, tool_results=results, max_new_tokens=2, ignore_eos=True
    )
    assert last.finish_reason == pb.FINISH_REASON_LENGTH


def test_tool_results_without_calls_before_them_are_invalid_argument(stub):
    results = [pb.ToolResult(tool_call_id="call_1", content="sunny")]
    error = rpc_error(lambda: generate(stub, tool_results=results))  # a new session
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("tool_results[0]: ")
    *_, last = generate(stub, prompt="Hi", max_new_tokens=2, ignore_eos=True)
    error = rpc_error(
        lambda: generate(
            stub, session_id=last.session_id, tool_results=results, prompt="and?",
            system_prompt="Be brief.",
        )
    )  # fmt: skip
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("tool_results[0]: ")


def test_tool_results_must_answer_every_call_of_the_previous_turn(stub):
    """Results sent for a turn answer all its calls (the model writes its next turn after them,
    so a result sent later would answer none), each once."""
    session, ids = several_calls(stub)
    partial = [pb.ToolResult(tool_call_id=ids[0], content="sunny")]
    for prompt in ("", "and?"):
        error = rpc_error(
            lambda p=prompt: generate(stub, session_id=session, tool_results=partial, prompt=p)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error.details()
        assert details.startswith("tool_results: ") and "\n" not in details
        assert details.endswith(": " + ", ".join(ids[1:])), details
    twice = [pb.ToolResult(tool_call_id=i, content="sunny") for i in [ids[0], *ids]]
    error = rpc_error(lambda: generate(stub, session_id=session, tool_results=twice))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details()
    assert details.startswith("tool_results[1].tool_call_id: ")
    assert repr(ids[0]) in details and "tool_results[0]" in details
    # an empty id answers the first call not answered yet; none is left for one more
    extra = [pb.ToolResult(content="sunny") for _ in [*ids, "one more"]]
    error = rpc_error(lambda: generate(stub, session_id=session, tool_results=extra))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"tool_results[{len(ids)}]: ")
    # Refused, the session still waits for its results: all of them are taken.
    results = [pb.ToolResult(tool_call_id=i, content="sunny") for i in reversed(ids)]
    *_, last = generate(
        stub, session_id=session, tool_results=results, max_new_tokens=2, ignore_eos=True
    )
    assert last.finish_reason == pb.FINISH_REASON_LENGTH


def test_a_prompt_without_results_after_tool_calls_is_taken(stub):
    """The session's history cannot be edited: a client that will not run the calls (or whose
    turn was cut short) goes on with a prompt, and the calls stay unanswered in the history."""
    session, _ = forced_calls(stub)
    *_, last = generate(stub, session_id=session, prompt="Never mind.", max_new_tokens=2,
                        ignore_eos=True)  # fmt: skip
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
