"""The OpenAI server, live: `fermi serve openai` on 127.0.0.1 over the tiny-qwen3 export, driven
with the official `openai` client and with raw HTTP (httpx) for exact framing and bad input.

The tiny model has random weights, so its text is gibberish: these tests check the plumbing
(shapes, counts, ids, statuses, sessions, cancellation), never the words, and never timings."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

from fermi.openai_server.loadtest import free_port, serve

MODEL = "tiny-qwen3"
USER = [{"role": "user", "content": "Hello there, how are you?"}]
BASE_ENV = {
    "FERMI_API_KEY": "",
    "FERMI_DEFAULT_THINKING": "",
    "FERMI_ENGINE_POOL": "1",
    "FERMI_MAX_QUEUE": "64",
    "FERMI_MAX_BODY_BYTES": "65536",
    "FERMI_CORS_ORIGINS": "http://allowed.example",
    "HF_HUB_OFFLINE": "1",  # nothing here may leave 127.0.0.1
}
LONG = 3000  # max_tokens of a generation meant to be cut short (ignore_eos; context is 4096)


@pytest.fixture(scope="session")
def server(tiny_cpu_artifact):
    with serve(str(tiny_cpu_artifact), env=BASE_ENV) as running:
        yield running
    assert running.process.returncode is not None


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_body(**fields):
    return {"model": MODEL, "messages": USER, "max_tokens": 8, **fields}


def sse_frames(text: str) -> list[str]:
    """Split an SSE body into frames; every frame must end with a blank line."""
    assert text.endswith("\n\n"), text[-200:]
    return text[:-2].split("\n\n")


def chat_chunks(text: str) -> list[dict]:
    """The exact chat framing: `data: {json}` frames, then `data: [DONE]`, nothing else."""
    frames = sse_frames(text)
    assert frames[-1] == "data: [DONE]"
    assert all(f.startswith("data: {") and "\n" not in f for f in frames[:-1])
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]


def check_chat_stream(chunks: list[dict], include_usage: bool) -> dict | None:
    """A well-formed stream: one id, role first, one finish chunk last, then usage if asked."""
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = chunks.pop()["usage"] if include_usage else None
    if include_usage:
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    return usage


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(predicate, what: str, limit: float = 60.0) -> None:
    """Poll a condition (bounded, so a broken server fails the test instead of hanging it)."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def idle(http: httpx.Client) -> bool:
    """No generation running or waiting (a slot is freed just after the last event is sent)."""
    return metric(http, "fermi_running") == 0 and metric(http, "fermi_queue_depth") == 0


def assert_healthy(http: httpx.Client) -> None:
    assert http.get("/health").json()["status"] == "ok"


# -- the official client ---------------------------------------------------------------------


def test_health_and_models(http, client):
    assert http.get("/health").json() == {"status": "ok", "model": MODEL}
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "fermi"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"


def test_chat_non_streaming(client):
    completion = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8)
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert 0 < usage.completion_tokens <= 8 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == 0
    assert usage.prompt_tokens_details.cached_tokens == 0


def test_chat_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_completion_tokens=6, stream=True,
        stream_options={"include_usage": True}, temperature=0.7, top_p=0.9, seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )  # fmt: skip
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 6


# Each control is checked where it lands: Qwen3's template appends an empty think block to
# the prompt when thinking is off, so the prompt is longer by exactly those tokens.
THINKING_CONTROLS = [
    ({"thinking": "on"}, {"thinking": "off"}),
    ({"thinking": True}, {"thinking": False}),
    ({"chat_template_kwargs": {"enable_thinking": True}},
     {"chat_template_kwargs": {"enable_thinking": False}}),
    ({"reasoning_effort": "high"}, {"reasoning_effort": "none"}),
]  # fmt: skip


@pytest.mark.parametrize("on, off", THINKING_CONTROLS)
def test_thinking_controls_reach_the_template(client, on, off):
    def run(extra):
        return client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=4, extra_body=extra
        )

    enabled, disabled, default = run(on), run(off), run({})
    assert disabled.usage.prompt_tokens > enabled.usage.prompt_tokens
    assert default.usage.prompt_tokens == disabled.usage.prompt_tokens  # the default is off
    assert not hasattr(disabled.choices[0].message, "reasoning_content")
    assert disabled.usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_thinking_on_shape(client, mode):
    """Reasoning, when the model opens a think block, is in reasoning_content, not in content.
    (The tiny model's random weights seldom emit <think>; the reasoning deltas' own plumbing
    is covered in test_openai_schemas with hand-made events.)"""
    completion = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=24, extra_body={"thinking": mode}
    )
    message = completion.choices[0].message
    reasoning = getattr(message, "reasoning_content", None)
    assert reasoning is None or (isinstance(reasoning, str) and reasoning)
    assert not message.content.lstrip().startswith("<think>")
    if reasoning:
        assert completion.usage.completion_tokens_details.reasoning_tokens > 0
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=24, stream=True, extra_body={"thinking": mode}
    )
    for chunk in stream:
        for choice in chunk.choices:
            assert not (choice.delta.content and getattr(choice.delta, "reasoning_content", None))


def test_reasoning_content_in_history_is_accepted_and_dropped(client):
    """As Qwen3's template does, reasoning of turns before the last user query is dropped."""

    def prompt_tokens(assistant: dict) -> int:
        messages = [*USER, {"role": "assistant", **assistant}, {"role": "user", "content": "ok"}]
        return client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=1
        ).usage.prompt_tokens

    plain = prompt_tokens({"content": "Fine."})
    assert prompt_tokens({"content": "Fine.", "reasoning_content": "Be polite."}) == plain


def test_responses_non_streaming(client):
    response = client.responses.create(
        model=MODEL, input="Say hi", instructions="Be brief.", max_output_tokens=8,
        temperature=0.6, top_p=0.95, reasoning={"effort": "low"},
    )  # fmt: skip
    Response.model_validate(response.model_dump())
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert response.output[-1].type == "message"
    assert [o.type for o in response.output[:-1]] in ([], ["reasoning"])
    assert isinstance(response.output_text, str)
    assert 0 < response.usage.output_tokens <= 8
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"


def test_responses_streaming_official_client(client):
    events = list(
        client.responses.create(
            model=MODEL,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}],
            max_output_tokens=8,
            stream=True,
        )
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
    ]  # fmt: skip
    assert types[-4:-1] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
    ]  # fmt: skip
    assert types[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output_text == deltas
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_sessions_reuse_kv(client):
    session = {"session_id": "kv-reuse-test"}
    opening = [{"role": "user", "content": "An opening only this test sends"}]
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=opening, max_tokens=6, extra_body=session
    )
    assert first.headers["x-session-id"] == "kv-reuse-test"
    reply = first.parse()
    assert reply.model_extra["session_id"] == "kv-reuse-test"
    assert reply.usage.prompt_tokens_details.cached_tokens < reply.usage.prompt_tokens // 2
    conversation = [
        *opening,
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=conversation, max_tokens=6, extra_body=session
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens


def test_delete_session(http):
    assert http.post("/v1/chat/completions", json=chat_body(session_id="to-delete")).is_success
    deleted = http.delete("/v1/sessions/to-delete")
    assert deleted.json() == {"id": "to-delete", "object": "session", "deleted": True}
    again = http.delete("/v1/sessions/to-delete")
    assert again.status_code == 404 and again.json()["error"]["code"] == "session_not_found"


@pytest.mark.parametrize("path", ["user%2F42", "user/42"])
def test_delete_session_with_a_slash_in_its_id(http, path):
    assert http.post("/v1/chat/completions", json=chat_body(session_id="user/42")).is_success
    deleted = http.delete(f"/v1/sessions/{path}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": "user/42", "object": "session", "deleted": True}
    assert http.delete("/v1/sessions/user%2F42").status_code == 404


# -- raw HTTP: framing -------------------------------------------------------------------------


def test_chat_sse_framing(http):
    body = chat_body(stream=True, stream_options={"include_usage": True})
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = chat_chunks(response.text)
    usage = check_chat_stream(chunks, include_usage=True)
    assert 0 < usage["completion_tokens"] <= 8
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {}
    no_usage = chat_chunks(http.post("/v1/chat/completions", json=chat_body(stream=True)).text)
    check_chat_stream(no_usage, include_usage=False)
    assert all("usage" not in c for c in no_usage)


EVENTS = TypeAdapter(ResponseStreamEvent)


def test_responses_sse_framing(http):
    response = http.post(
        "/v1/responses",
        json={
            "model": MODEL, "input": "hi", "max_output_tokens": 4, "stream": True,
            "ignore_eos": True,
        },
    )  # fmt: skip
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = sse_frames(response.text)
    assert "[DONE]" not in response.text
    for number, frame in enumerate(frames):
        head, data = frame.split("\n")
        event = EVENTS.validate_python(json.loads(data.removeprefix("data: ")))
        assert head == f"event: {event.type}" and event.sequence_number == number
    assert event.type == "response.incomplete"  # ignore_eos: it runs into the token limit
    assert event.response.incomplete_details.reason == "max_output_tokens"


# -- raw HTTP: errors --------------------------------------------------------------------------

BAD_CHAT = [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"model": MODEL}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "top_p": 1.5}, "top_p"),
    ({"messages": USER, "presence_penalty": 2.5}, "presence_penalty"),
    ({"messages": USER, "frequency_penalty": -3}, "frequency_penalty"),
    ({"messages": USER, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": -5}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "frobnicate": True}, "frobnicate"),
    ({"messages": USER, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"messages": USER, "thinking": "sometimes"}, "thinking"),
    ({"messages": USER, "stop": 7}, "stop"),
    ({"messages": USER, "logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"-1": 5}}, "logit_bias"),
]


@pytest.mark.parametrize("body, param", BAD_CHAT)
def test_bad_chat_requests(http, body, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = http.post("/v1/chat/completions", **kwargs)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]
    assert_healthy(http)


def test_unknown_fields_are_named(http):
    error = http.post("/v1/chat/completions", json=chat_body(frobnicate=1)).json()["error"]
    assert error["param"] == "frobnicate" and "unknown field" in error["message"]


def test_informational_fields_are_accepted(http):
    body = chat_body(logit_bias={}, user="me", store=False, metadata={"k": "v"}, tools=[])
    assert http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL}, "input"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "temperature": 9}, "temperature"),
    ],
)
def test_bad_responses_requests(http, body, param):
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_context_length_exceeded(http):
    response = http.post("/v1/chat/completions", json=chat_body(max_tokens=5000))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "4096" in error["message"] and "5000" in error["message"]


def test_unknown_model(http):
    response = http.post("/v1/chat/completions", json=chat_body(model="gpt-4o"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert http.get("/v1/models/gpt-4o").json()["error"]["code"] == "model_not_found"


# -- raw HTTP: checked fields a client may send ------------------------------------------------

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
HI = {"model": MODEL, "input": "hi", "max_output_tokens": 2}
ONCE = {"model": MODEL, "prompt": "Once", "max_tokens": 2}


def assert_refused(http: httpx.Client, path: str, body: dict, param: str) -> dict:
    """A 400 whose param, and the start of whose message, is `param`."""
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error
    return error


def test_tokenizer_routes_check_the_model(http):
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        response = http.post(path, json={**body, "model": "nope"})
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
        assert http.post(path, json={**body, "model": MODEL}).status_code == 200


def test_stop_lists_as_long_as_editors_send(http):
    stops = [f"\nSTOP{i}" for i in range(128)]
    assert http.post(COMPLETIONS, json={**ONCE, "stop": stops}).status_code == 200
    assert http.post(CHAT, json=chat_body(stop=stops)).status_code == 200
    assert_refused(http, CHAT, chat_body(stop=[*stops, "one more"]), "stop")


# @@utf8
def test_a_body_that_is_not_utf8_says_so(http):
    for raw in (b"\xff\xfe{\x00}\x00", '{"model": "x"}'.encode("utf-16")):
        response = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "UTF-8" in message and "utf-16" not in message.lower(), message


def test_fields_of_another_route_say_so(http):
    prompt = assert_refused(http, CHAT, chat_body(prompt="Once"), "prompt")["message"]
    assert "messages" in prompt and "/v1/completions" in prompt and "template" not in prompt
    for path, body in ((CHAT, chat_body(best_of=1)), (RESPONSES, {**HI, "best_of": 1})):
        message = assert_refused(http, path, body, "best_of")["message"]
        assert "/v1/completions" in message and "must equal" not in message


BAD_INFORMATIONAL = [
    (CHAT, chat_body(user=5), "user"),
    (CHAT, chat_body(user={"id": "u"}), "user"),
    (CHAT, chat_body(metadata="x"), "metadata"),
    (CHAT, chat_body(metadata={"k": 1}), "metadata"),
    (CHAT, chat_body(metadata={f"k{i}": "v" for i in range(17)}), "metadata"),
    (CHAT, chat_body(store="yes"), "store"),
    (RESPONSES, {**HI, "store": "yes"}, "store"),
    (RESPONSES, {**HI, "metadata": "x"}, "metadata"),
    (COMPLETIONS, {**ONCE, "user": 5}, "user"),
]


@pytest.mark.parametrize("path, body, param", BAD_INFORMATIONAL)
def test_informational_fields_of_a_wrong_type_are_refused(http, path, body, param):
    assert_refused(http, path, body, param)


def test_informational_fields_of_the_right_type_are_accepted(http):
    metadata = {f"k{i}": "v" for i in range(16)}
    body = chat_body(user="u", metadata=metadata, store=True, safety_identifier="s",
                     prompt_cache_key="p")  # fmt: skip
    assert http.post(CHAT, json=body).status_code == 200
    assert http.post(COMPLETIONS, json={**ONCE, "user": "u", "store": False}).status_code == 200


BAD_NESTED = [
    (RESPONSES, {**HI, "text": {"verbosity": "low"}}, "text.verbosity"),
    (RESPONSES, {**HI, "text": {"bogus": 1}}, "text.bogus"),
    (RESPONSES, {**HI, "reasoning": {"effort": "low", "bogus": 1}}, "reasoning.bogus"),
    (RESPONSES, {**HI, "input": [{"role": "user", "content": "hi", "extra": 1}]},
     "input[0].extra"),
    (RESPONSES, {**HI, "input": [{"role": "user", "content": [{"type": "input_text",
               "text": "hi", "extra": 1}]}]}, "input[0].content[0].extra"),
    (CHAT, chat_body(messages=[{"role": "user", "content": "hi", "extra": 1}]),
     "messages[0].extra"),
    (CHAT, chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": "hi",
           "extra": 1}]}]), "messages[0].content[0].extra"),
    (CHAT, chat_body(messages=[*USER, {"role": "assistant", "content": "x",
           "function_call": {"name": "f", "arguments": "{}"}}, *USER]),
     "messages[1].function_call"),
    (CHAT, chat_body(chat_template_kwargs={"enable_thinking": False, "bogus": 1}),
     "chat_template_kwargs.bogus"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi", "extra": 1}]},
     "messages[0].extra"),
]  # fmt: skip


@pytest.mark.parametrize("path, body, param", BAD_NESTED)
def test_unknown_keys_of_nested_objects_are_named_by_path(http, path, body, param):
    assert_refused(http, path, body, param)


def test_fields_clients_send_back_in_history_are_accepted(client):
    """What openai-python, litellm and langchain-openai put on replayed messages: `name`, and
    on an assistant message `refusal`, `annotations`, null `audio` / `function_call`, and
    fermi's own `reasoning` beside `reasoning_content`; Responses output items as returned."""
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4).choices[0]
    messages = [
        {"role": "system", "content": "Be brief.", "name": "setup"},
        {"role": "user", "content": "Hello", "name": "alice"},
        {"role": "assistant", "content": "Hi.", "refusal": None, "annotations": [],
         "audio": None, "function_call": None, "tool_calls": None, "name": "bot",
         "reasoning": "Greet back.", "reasoning_content": "Greet back."},
        reply.message,  # the official client's own message object, as returned
        {"role": "user", "content": "Again"},
    ]  # fmt: skip
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    first = client.responses.create(model=MODEL, input="Say hi", max_output_tokens=4)
    again = [*first.output, {"role": "user", "content": "Again"}]  # ids, status, summary: []
    assert client.responses.create(model=MODEL, input=again, max_output_tokens=2)


def test_responses_echo_metadata_effort_and_store(http, client):
    sent = {"metadata": {"run": "7"}, "reasoning": {"effort": "low", "summary": "auto"},
            "store": True}  # fmt: skip
    body = http.post(RESPONSES, json={**HI, **sent}).json()
    assert body["metadata"] == {"run": "7"} and body["store"] is True
    assert body["reasoning"] == {"effort": "low", "summary": "auto"}
    events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=2,
                                          stream=True, **sent))  # fmt: skip
    for response in (events[0].response, events[-1].response):
        assert response.metadata == {"run": "7"} and response.store is True
        assert response.reasoning.effort == "low"
    plain = http.post(RESPONSES, json=HI).json()
    assert (plain["metadata"], plain["store"], plain["reasoning"]["effort"]) == ({}, False, None)


BAD_STREAM_OPTIONS = [
    (RESPONSES, {**HI, "stream": True, "stream_options": {"include_usage": True}},
     "stream_options.include_usage"),
    (CHAT, chat_body(stream=True, stream_options={"bogus": True}), "stream_options.bogus"),
    (COMPLETIONS, {**ONCE, "stream": True, "stream_options": {"bogus": 1}},
     "stream_options.bogus"),
]  # fmt: skip


@pytest.mark.parametrize("path, body, param", BAD_STREAM_OPTIONS)
def test_unknown_stream_options_are_named(http, path, body, param):
    assert_refused(http, path, body, param)


def test_continuous_usage_stats_put_usage_on_every_chunk(http):
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in ((CHAT, chat_body(max_tokens=6)), (COMPLETIONS, {**ONCE, "max_tokens": 6})):
        text = http.post(path, json={**body, "stream": True, "stream_options": options}).text
        chunks = chat_chunks(text)
        usages = [c["usage"] for c in chunks]
        assert all(u is not None for u in usages), usages
        final = usages[-1]
        assert chunks[-1]["choices"] == [] and 0 < final["completion_tokens"] <= 6
        counts = [u["completion_tokens"] for u in usages]
        assert counts == sorted(counts) and counts[-1] == final["completion_tokens"]
        for u in usages:
            assert u["prompt_tokens"] == final["prompt_tokens"] > 0
            assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        alone = {"stream": True, "stream_options": {"continuous_usage_stats": True}}
        assert_refused(http, path, {**body, **alone}, "stream_options.continuous_usage_stats")


def test_unknown_route_names_itself(http):
    """A path no route serves is a 404 in OpenAI's shape that names the method and path, "/"
    included (Sanic's own message drops it)."""
    for path in ("/", "/v1/embeddings"):
        response = http.get(path)
        assert response.status_code == 404
        assert f"GET {path} " in response.json()["error"]["message"]


def test_body_too_large(http):
    huge = chat_body(messages=[{"role": "user", "content": "x" * 100_000}])  # limit is 64 KiB
    response = http.post("/v1/chat/completions", json=huge)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert_healthy(http)


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def first_line(response: httpx.Response):
    """Read the first line of a stream and keep the stream open (dropping a fresh line iterator
    would close the connection, which the server rightly takes for a disconnect)."""
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
    return lines


def test_busy_session(http):
    body = chat_body(stream=True, max_tokens=LONG, ignore_eos=True, session_id="busy-test")
    with http.stream("POST", "/v1/chat/completions", json=body) as running:
        _lines = first_line(running)  # the session is reserved now
        response = http.post("/v1/chat/completions", json=chat_body(session_id="busy-test"))
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "session_busy" and "busy" in error["message"]
    wait_for(lambda: metric(http, "fermi_running") == 0, "the generation to stop")
    assert http.post("/v1/chat/completions", json=chat_body(session_id="busy-test")).is_success


def test_cors(http):
    preflight = http.options(
        "/v1/chat/completions",
        headers={
            "Origin": "http://allowed.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://allowed.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    allowed = http.get("/v1/models", headers={"Origin": "http://allowed.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://allowed.example"
    other = http.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/tokenize", "POST"),
        ("/detokenize", "POST"),
        ("/health", "GET"),
        ("/metrics", "GET"),
        ("/v1/models", "GET"),
        ("/v1/models/tiny-qwen3", "GET"),
        ("/v1/sessions/some-session", "DELETE"),
        ("/v1/completions", "POST"),
    ],
)
def test_every_route_answers_a_cors_preflight(http, path, method):
    """A browser preflights each route it calls: all answer like /v1/chat/completions."""
    preflight = http.options(
        path,
        headers={
            "Origin": "http://allowed.example",
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "http://allowed.example"
    assert method in preflight.headers["access-control-allow-methods"]


def test_metrics(http):
    http.post("/v1/chat/completions", json=chat_body())
    text = http.get("/metrics").text
    for name in (
        "fermi_http_requests_total", "fermi_prompt_tokens_total", "fermi_completion_tokens_total",
        "fermi_time_to_first_token_seconds_bucket", "fermi_inter_token_latency_seconds_bucket",
        "fermi_queue_depth", "fermi_running", "fermi_active_sessions",
    ):  # fmt: skip
        assert name in text
    assert metric(http, "fermi_http_requests_total", route="/v1/chat/completions", status="200") > 0
    assert metric(http, "fermi_http_requests_total", route="/v1/chat/completions", status="400") > 0
    assert metric(http, "fermi_completion_tokens_total") > 0
    assert metric(http, "fermi_model_loaded") == 1


# -- concurrency -------------------------------------------------------------------------------


def test_32_concurrent_streams(server, http):
    async def one(client: httpx.AsyncClient, i: int) -> dict:
        body = chat_body(
            stream=True, max_tokens=6, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"Client {i} says hello"}],
        )  # fmt: skip
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return check_chat_stream(chat_chunks(response.text), include_usage=True)

    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    usages = asyncio.run(run())
    assert len(usages) == 32 and all(0 < u["completion_tokens"] <= 6 for u in usages)
    wait_for(lambda: idle(http), "the engine to be idle")
    assert_healthy(http)


def outcomes(http: httpx.Client) -> dict[str, float]:
    """What /metrics counts of generations ending (by outcome) and of chat requests (by status)."""
    route = "/v1/chat/completions"
    return {
        "cancelled": metric(http, "fermi_generations_total", outcome="cancelled"),
        "disconnected": metric(http, "fermi_generations_total", outcome="disconnected"),
        "200": metric(http, "fermi_http_requests_total", route=route, status="200"),
        "499": metric(http, "fermi_http_requests_total", route=route, status="499"),
    }


def counted_once_as_disconnected(http: httpx.Client, before: dict[str, float]) -> None:
    """The generation of a client that left is counted once, as disconnected (not also as
    cancelled), and its request with the status of its access line, 499 (not 200)."""
    expected = {**before, "disconnected": before["disconnected"] + 1, "499": before["499"] + 1}
    deadline = time.monotonic() + 60
    while outcomes(http) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # and nothing more is counted later
    assert outcomes(http) == expected


def test_a_finished_stream_is_counted_once_as_200(http):
    wait_for(lambda: idle(http), "the engine to be idle")
    before = outcomes(http)
    length = metric(http, "fermi_generations_total", outcome="length")
    body = chat_body(stream=True, max_tokens=4, ignore_eos=True)
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    wait_for(lambda: outcomes(http) != before, "the stream to be counted")
    assert outcomes(http) == {**before, "200": before["200"] + 1}
    assert metric(http, "fermi_generations_total", outcome="length") == length + 1


def test_disconnect_stops_generation(http):
    before = outcomes(http)
    tokens = metric(http, "fermi_completion_tokens_total")
    body = chat_body(stream=True, max_tokens=LONG, ignore_eos=True, session_id="disconnect-test")
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        data = (line for line in response.iter_lines() if line.startswith("data: "))
        next(data), next(data)  # the role chunk and the first text: it is generating
        assert metric(http, "fermi_running") == 1
    # The client has gone: the generation ends, long before its token limit.
    counted_once_as_disconnected(http, before)
    assert metric(http, "fermi_completion_tokens_total") - tokens < LONG
    wait_for(lambda: idle(http), "the engine to be idle")
    follow_up = http.post("/v1/chat/completions", json=chat_body(session_id="disconnect-test"))
    assert follow_up.status_code == 200  # the session is free again


def test_disconnect_stops_every_prompt_of_a_batch(http):
    """A streamed /v1/completions batch whose client leaves: all its generations stop."""
    tokens = metric(http, "fermi_completion_tokens_total")
    body = {"prompt": ["Once", "upon", "a time"], "max_tokens": LONG, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with http.stream("POST", "/v1/completions", json=body) as response:
        data = (line for line in response.iter_lines() if line.startswith("data: "))
        next(data), next(data)
        assert metric(http, "fermi_running") + metric(http, "fermi_queue_depth") == 3
    wait_for(lambda: idle(http), "the engine to be idle")
    assert metric(http, "fermi_completion_tokens_total") - tokens < 3 * LONG


def test_disconnect_non_streaming(server, http):
    """A non-streaming client that hangs up mid-generation also cancels it."""
    before = outcomes(http)
    tokens = metric(http, "fermi_completion_tokens_total")
    body = json.dumps(chat_body(max_tokens=LONG, ignore_eos=True)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(head + body)
        wait_for(lambda: metric(http, "fermi_running") == 1, "the generation to start")
    counted_once_as_disconnected(http, before)
    assert metric(http, "fermi_completion_tokens_total") - tokens < LONG
    wait_for(lambda: idle(http), "the engine to be idle")


def test_disconnect_while_queued_frees_the_place(server, http):
    """A client that leaves while waiting for the engine gives its queue place back."""
    long = chat_body(stream=True, max_tokens=LONG, ignore_eos=True)
    with http.stream("POST", "/v1/chat/completions", json=long) as running:
        _lines = first_line(running)
        with httpx.Client(base_url=server.url, timeout=60) as other:
            with other.stream("POST", "/v1/chat/completions", json=long) as queued:
                _queued_lines = first_line(queued)
                wait_for(lambda: metric(http, "fermi_queue_depth") == 1, "a queued request")
        wait_for(lambda: metric(http, "fermi_queue_depth") == 0, "the queue place to be freed")
    wait_for(lambda: metric(http, "fermi_running") == 0, "the running generation to stop")


# -- separate servers: auth and limits; failures inside generation -----------------------------


def test_api_key_and_queue_full(tiny_artifact):
    env = {**BASE_ENV, "FERMI_API_KEY": "sekrit", "FERMI_MAX_QUEUE": "0"}
    with serve(str(tiny_artifact), env=env) as locked, httpx.Client(base_url=locked.url) as http:
        assert http.get("/health").status_code == 200  # open without a key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            response = http.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        denied = http.post("/v1/chat/completions", json=chat_body())
        assert denied.status_code == 401
        key = {"Authorization": "Bearer sekrit"}
        for route in ("/tokenize", "/detokenize"):
            body = {"content": "hi"} if route == "/tokenize" else {"tokens": [5]}
            assert http.post(route, json=body).status_code == 401
            assert http.post(route, json=body, headers=key).status_code == 200
        assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 401
        assert http.get("/v1/models", headers=key).status_code == 200
        client = openai.OpenAI(base_url=locked.url + "/v1", api_key="sekrit", max_retries=0)
        assert client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=locked.url + "/v1", api_key="nope", max_retries=0).models.list()
        # FERMI_MAX_QUEUE=0: while one generation runs, the next request is refused at once.
        long = chat_body(stream=True, max_tokens=LONG, ignore_eos=True)
        with http.stream("POST", "/v1/chat/completions", json=long, headers=key) as running:
            _lines = first_line(running)
            full = http.post("/v1/chat/completions", json=chat_body(), headers=key)
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            assert full.headers["retry-after"]


def test_health_503_while_loading_then_failure_inside_generation(tiny_artifact, tmp_path):
    """On a server whose runtime loads only once a gate file exists, and then fails inside
    generation on demand: /health is 503 while loading; a failure after the stream started
    ends it with an error event; the server keeps serving."""
    gate, port = tmp_path / "gate", free_port()
    while_loading: list[httpx.Response] = []

    def open_gate_once_loading_is_seen() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not while_loading:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health")
                while_loading.extend([health, httpx.get(f"http://127.0.0.1:{port}/v1/models")])
            except httpx.TransportError:
                time.sleep(0.05)
        gate.touch()

    opener = threading.Thread(target=open_gate_once_loading_is_seen, daemon=True)
    opener.start()
    env = {**BASE_ENV, "FERMI_TEST_LOAD_GATE": str(gate), "FERMI_ENGINE_POOL": "2"}  # n=2 fits
    with serve(str(tiny_artifact), env=env, program=(sys.executable, __file__), port=port) as s:
        opener.join()
        health, models = while_loading
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert models.status_code == 503 and models.json()["error"]["code"] == "model_loading"
        with httpx.Client(base_url=s.url, timeout=60) as http:
            boom = chat_body(stream=True, messages=[{"role": "user", "content": FAIL}])
            frames = sse_frames(http.post("/v1/chat/completions", json=boom).text)
            assert frames[-1] == "data: [DONE]"
            error = json.loads(frames[-2].removeprefix("data: "))["error"]
            assert error["type"] == "server_error" and "injected" in error["message"]
            responses = http.post("/v1/responses", json={"input": FAIL, "stream": True}).text
            last = [json.loads(f.split("\n")[1][6:]) for f in sse_frames(responses)][-2:]
            assert [e["type"] for e in last] == ["error", "response.failed"]
            plain = http.post("/v1/chat/completions", json=chat_body(messages=boom["messages"]))
            assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
            two = http.post("/v1/chat/completions", json=chat_body(messages=boom["messages"], n=2))
            assert two.status_code == 500, two.text
            # each failed choice is a generation that ended in error: 1 + 1 + 1 + 2
            assert metric(http, "fermi_generations_total", outcome="error") == 5
            # and the server keeps serving
            assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200
            wait_for(lambda: metric(http, "fermi_running") == 0, "the failed generations to end")


def test_load_failure_exits_with_an_error(tmp_path):
    command = [sys.executable, "-m", "fermi.cli", "serve", "openai", "--model", str(tmp_path),
               "--host", "127.0.0.1", "--port", str(free_port())]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, **BASE_ENV}
    )
    assert done.returncode == 2  # the CLI's "bad input or missing model" status
    assert f"error: {tmp_path}" in done.stderr


FAIL = "please fail now"


def serve_with_injected_failure(argv: list[str]) -> None:
    """A server whose runtime raises after the first event of any request whose last message is
    FAIL, as an engine failure would (run as `python tests/test_openai_server.py serve ...`)."""
    from fermi.openai_server.server import create_app
    from fermi.runtime import Runtime
    from fermi.settings import load_settings

    options = dict(zip(argv[2::2], argv[3::2], strict=True))

    def load(settings):
        gate = Path(os.environ["FERMI_TEST_LOAD_GATE"])
        while not gate.exists():
            time.sleep(0.05)
        runtime = Runtime.load(settings)
        submit_all = runtime.submit_all

        def fail_after_the_first_event(generation) -> None:
            events = generation.aiter

            async def aiter():
                async for event in events():
                    yield event
                    raise RuntimeError("injected engine failure")

            generation.aiter = aiter

        def submit_failing(requests):
            generations = submit_all(requests)
            for request, generation in zip(requests, generations, strict=True):
                if request.messages and request.messages[-1].content == FAIL:
                    fail_after_the_first_event(generation)
            return generations

        runtime.submit_all = submit_failing
        return runtime

    app = create_app(load_settings().replace(model=options["--model"]), load)
    app.run(host=options["--host"], port=int(options["--port"]), single_process=True, motd=False)


if __name__ == "__main__":
    serve_with_injected_failure(sys.argv[1:])
