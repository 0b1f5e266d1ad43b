"""The OpenAI server's edge, without a server: request parsing, the response builders (checked
against the official `openai` package's own types) and the error mapping."""

from __future__ import annotations

import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from fermi.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    SessionBusy,
)
from fermi.openai_server import formatters as fmt
from fermi.openai_server.errors import map_error
from fermi.openai_server.schemas import check_model, parse_chat, parse_json, parse_responses
from fermi.requests import Finished, TextDelta, Usage

USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return parse_chat({"messages": USER, **fields})


def test_chat_fields_reach_the_generation_request():
    call = chat(
        model="tiny-qwen3", stream=True, stream_options={"include_usage": True}, max_tokens=9,
        temperature=0.5, top_p=0.9, top_k=-1, min_p=0.1, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, seed=7, stop="END", n=1, user="u",
        session_id="abc", store=True, metadata={"x": "1"},
    )  # fmt: skip
    g = call.generation
    assert (call.model, call.stream, call.include_usage) == ("tiny-qwen3", True, True)
    assert g.max_new_tokens == 9 and g.stop == ["END"] and g.session_id == "abc" and not g.append
    s = g.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0.5, 0.9, 0, 0.1, 7)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.1)


def test_max_completion_tokens_wins():
    assert chat(max_tokens=5, max_completion_tokens=3).generation.max_new_tokens == 3


def test_messages_roles_and_content_parts():
    call = parse_chat(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]},
                {"role": "assistant", "content": None, "reasoning_content": "hmm",
                 "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "42"},
            ]
        }
    )  # fmt: skip
    roles = [(m.role, m.content, m.reasoning_content) for m in call.generation.messages]
    assert roles == [
        ("system", "be brief", None),
        ("user", "ab", None),
        ("assistant", "", "hmm"),
        ("tool", "42", None),
    ]


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, None),
        ({"thinking": "on"}, "on"),
        ({"thinking": False}, "off"),
        ({"thinking": "auto"}, "auto"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, "off"),
        ({"chat_template_kwargs": {"enable_thinking": True}}, "on"),
        ({"reasoning_effort": "none"}, "off"),
        ({"reasoning_effort": "high"}, "on"),
        ({"thinking": "off", "reasoning_effort": "high"}, "off"),
    ],
)
def test_thinking_three_ways(fields, expected):
    assert chat(**fields).generation.thinking == expected


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"some_unknown_field": 1}, "some_unknown_field"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"thinking": "maybe"}, "thinking"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"seed": 1.5}, "seed"),
        ({"session_id": 12}, "session_id"),
    ],
)  # fmt: skip
def test_bad_chat_fields_name_their_param(fields, param):
    with pytest.raises(InvalidRequest) as e:
        parse_chat({"messages": USER, **fields})
    assert e.value.param == param


def test_missing_messages_and_bad_json():
    with pytest.raises(InvalidRequest, match="messages is required"):
        parse_chat({})
    for raw in (b"", b"{", b"[1]", b'{"a": NaN}', b"\xff"):
        with pytest.raises(InvalidRequest):
            parse_json(raw)


def test_n_seed_logprobs_and_thinking_switches():
    call = chat(n=3, seed=-1, logprobs=True, top_logprobs=4, enable_thinking=False)
    g = call.generation
    assert (g.n, g.sampling.seed, g.logprobs, g.thinking) == (3, -1, 4, "off")
    assert call.logprobs and chat(logprobs=True).generation.logprobs == 0
    assert chat(logprobs=False).generation.logprobs is None
    assert chat(service_tier="auto", modalities=["text"]).generation.n == 1
    assert chat(logit_bias={"5": -100}).generation.sampling.logit_bias == {5: -100}
    both = chat(
        thinking="on", enable_thinking=False, chat_template_kwargs={"enable_thinking": True}
    )
    assert both.generation.thinking == "on"  # thinking wins; the others are still read
    # owned by the tool-calling work: accepted as before
    assert chat(tools=[], tool_choice="auto", response_format={"type": "text"}).generation


def test_responses_input_forms():
    call = parse_responses(
        {"input": "hi", "instructions": "be brief", "max_output_tokens": 7,
         "reasoning": {"effort": "low"}, "temperature": 0.3}
    )  # fmt: skip
    g = call.generation
    assert [(m.role, m.content) for m in g.messages] == [("system", "be brief"), ("user", "hi")]
    assert (g.max_new_tokens, g.thinking, g.sampling.temperature) == (7, "on", 0.3)
    items = parse_responses(
        {
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
                {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "r"}]},
                {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": "a"}]},
                {"role": "user", "content": "q2"},
            ]
        }
    ).generation.messages  # fmt: skip
    assert [(m.role, m.content, m.reasoning_content) for m in items] == [
        ("user", "q", None),
        ("assistant", "a", "r"),
        ("user", "q2", None),
    ]


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"type": "computer_call"}]}, "input[0].type"),
        ({"input": [{"type": "function_call"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "text": {"format": {"type": "bogus"}}}, "text.format"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ],
)
def test_bad_responses_fields(body, param):
    with pytest.raises(InvalidRequest) as e:
        parse_responses(body)
    assert e.value.param == param


def test_model_names():
    check_model(None, "Qwen/Qwen3-1.7B")
    check_model("Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B")
    check_model("Qwen3-1.7B", "Qwen/Qwen3-1.7B")
    with pytest.raises(ModelNotFound):
        check_model("gpt-4o", "Qwen/Qwen3-1.7B")


def test_error_mapping():
    cases = [
        (ContextLengthExceeded(10, 20, 16), 400, "context_length_exceeded"),
        (InvalidRequest("bad", "top_p"), 400, None),
        (ModelNotFound("x"), 404, "model_not_found"),
        (SessionBusy("s"), 409, "session_busy"),
        (QueueFull("full"), 429, "queue_full"),
        (RuntimeError("boom"), 500, "internal_error"),
    ]
    for exc, status, code in cases:
        err = map_error(exc)
        assert (err.status, err.code) == (status, code)
        assert set(fmt.error_body(err)["error"]) == {"message", "type", "param", "code"}


# -- formatters, validated by the official client's types ----------------------------------------

USAGE = Usage(prompt_tokens=12, completion_tokens=5, reasoning_tokens=2, cached_tokens=4)
EVENTS = [
    TextDelta("let me ", "reasoning", [1, 2]),
    TextDelta("see", "reasoning", [3]),
    TextDelta("Hi", "answer", [4]),
    TextDelta("!", "answer", [5]),
]


def frames(text: str) -> list[str]:
    assert text.endswith("\n\n")
    return text[:-2].split("\n\n")


def test_chat_completion_body():
    meta = fmt.Meta("chatcmpl-1", "tiny-qwen3", "s1")
    choice = fmt.ChoiceText(0, "let me see", "Hi!")
    body = fmt.chat_completion(meta, [choice], Finished("stop", USAGE, "s1", True))
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == "Hi!"
    assert body["choices"][0]["message"]["reasoning_content"] == "let me see"
    assert body["choices"][0]["message"]["reasoning"] == "let me see"
    assert parsed.usage.total_tokens == 17
    assert parsed.usage.prompt_tokens_details.cached_tokens == 4
    assert parsed.usage.completion_tokens_details.reasoning_tokens == 2
    assert body["session_id"] == "s1"
    plain = fmt.chat_completion(
        meta, [fmt.ChoiceText(0, "", "Hi")], Finished("length", USAGE, "s1", False)
    )
    assert "reasoning_content" not in plain["choices"][0]["message"]


def test_chat_stream_frames():
    stream = fmt.ChatStream(fmt.Meta("chatcmpl-1", "tiny-qwen3", None), include_usage=True)
    text = stream.start() + "".join(stream.text(e) for e in EVENTS)
    text += stream.finish(Finished("stop", USAGE, "one-shot", True))
    raw = frames(text)
    assert raw[-1] == "data: [DONE]"
    chunks = [
        ChatCompletionChunk.model_validate(json.loads(f.removeprefix("data: "))) for f in raw[:-1]
    ]
    assert {c.id for c in chunks} == {"chatcmpl-1"}
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(
        c.choices[0].delta.model_extra.get("reasoning_content", "") for c in chunks[1:3]
    )
    assert reasoning == "let me see" and chunks[3].choices[0].delta.content == "Hi"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


EVENT_ADAPTER = TypeAdapter(ResponseStreamEvent)


def test_response_stream_events_parse_and_follow_openai_order():
    call = parse_responses({"input": "hi", "max_output_tokens": 5})
    stream = fmt.ResponseStream(fmt.Meta("resp_1", "tiny-qwen3", None), call)
    text = stream.start() + "".join(stream.text(e) for e in EVENTS)
    text += stream.finish(Finished("length", USAGE, "x", True))
    events = []
    for frame in frames(text):
        head, data = frame.split("\n")
        event = EVENT_ADAPTER.validate_python(json.loads(data.removeprefix("data: ")))
        assert head == f"event: {event.type}"
        events.append(event)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete",
    ]  # fmt: skip
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output_text == "Hi!" and final.usage.output_tokens == 5


def test_response_stream_without_text_still_has_a_message():
    call = parse_responses({"input": "hi"})
    stream = fmt.ResponseStream(fmt.Meta("resp_1", "m", None), call)
    text = stream.start() + stream.finish(Finished("stop", USAGE, "x", False))
    types = [json.loads(f.split("\n")[1][6:])["type"] for f in frames(text)]
    assert types[2:] == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip


def test_response_final_body():
    call = parse_responses({"input": "hi"})
    meta = fmt.Meta("resp_1", "tiny-qwen3", None)
    choice = fmt.ChoiceText(0, "think", "answer")
    body = fmt.response_final(meta, call, choice, Finished("stop", USAGE, "x", True))
    parsed = Response.model_validate(body)
    assert parsed.status == "completed" and parsed.output_text == "answer"
    assert [o.type for o in parsed.output] == ["reasoning", "message"]
    assert parsed.output[0].content[0].text == "think"
