"""The Ray-free pieces of `fermi serve ray`, alone: routing keys from request bodies, one
request through an ASGI app as messages (and its cancellation), and the front's replies when a
replica is gone, too large a body, or a replica fails mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fermi.errors import QueueFull
from fermi.ray_serve.bridge import exchange, portable_scope
from fermi.ray_serve.front import ACCEPTED, Front, ReplicaGone
from fermi.ray_serve.routing import PREFIX_CHARS, routing_key

ROOT = Path(__file__).parent.parent


def key(path: str, body: dict | str, method: str = "POST") -> str | None:
    raw = body if isinstance(body, str) else json.dumps(body)
    return routing_key(method, path, raw.encode())


CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "Be brief."}


def test_session_id_is_the_key():
    body = {"messages": [{"role": "user", "content": "hi"}], "session_id": "s1"}
    assert key(CHAT, body) == "session:s1"
    assert key("/v1/responses", {"input": "hi", "session_id": "s1"}) == "session:s1"
    assert key("/v1/sessions/user%2F42", "", method="DELETE") == "session:user/42"


def test_a_conversation_keeps_its_prefix_key_across_turns():
    first = [SYSTEM, {"role": "user", "content": "Tell me about owls"}]
    later = [
        *first,
        {"role": "assistant", "content": "Owls..."},
        {"role": "user", "content": "More"},
    ]
    other = [SYSTEM, {"role": "user", "content": "Tell me about bats"}]
    assert key(CHAT, {"messages": first}).startswith("prefix:")
    assert key(CHAT, {"messages": first}) == key(CHAT, {"messages": later, "stream": True})
    assert key(CHAT, {"messages": first}) != key(CHAT, {"messages": other})


def test_responses_and_completions_prefix_keys():
    turn1 = {"instructions": "Be brief.", "input": [{"role": "user", "content": "owls"}]}
    turn2 = {**turn1, "input": [*turn1["input"], {"role": "assistant", "content": "Owls."}]}
    assert key("/v1/responses", turn1) == key("/v1/responses", turn2)
    shared = "x" * PREFIX_CHARS
    assert key("/v1/completions", {"prompt": shared + "a"}) == key(
        "/v1/completions", {"prompt": shared + "b"}
    )
    assert key("/v1/completions", {"prompt": [1, 2, 3]}).startswith("prefix:")


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/v1/models", ""),
        ("POST", "/tokenize", '{"content": "hi"}'),
        ("POST", CHAT, "{not json"),
        ("POST", CHAT, "[1, 2]"),
        ("POST", CHAT, '{"messages": "oops"}'),
        ("POST", CHAT, '{"messages": [3]}'),
        ("POST", CHAT, "[" * 100_000),
        ("DELETE", "/v1/sessions/", ""),
    ],
)
def test_no_key_for_the_rest(method, path, body):
    assert routing_key(method, path, body.encode()) is None


def scope(path: str = CHAT) -> dict:
    return portable_scope({"type": "http", "method": "POST", "path": path, "headers": []})


async def echo_app(scope, receive, send):
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": iter([(b"a", b"b")])})
    await send({"type": "http.response.body", "body": body, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def test_exchange_yields_plain_messages():
    async def run():
        return [m async for m in exchange(echo_app, scope(), b"hello")]

    start, body = asyncio.run(run())  # the two body messages piled up: joined
    assert start["headers"] == [(b"a", b"b")] and body["body"] == b"hello"
    assert body["more_body"] is False
    assert scope()["raw_path"] == CHAT.encode()


def test_closing_an_exchange_early_cancels_the_handler():
    cancelled = asyncio.Event()

    async def endless(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
                await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def run():
        messages = exchange(endless, scope(), b"")
        await anext(messages)
        await anext(messages)
        await messages.aclose()
        return cancelled.is_set()

    assert asyncio.run(run())


def run_front(forward, body: bytes = b"{}", path: str = CHAT, limit: int = 1024) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    request = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(Front(forward, limit)(request, receive, send))
    return sent


def test_front_routes_again_when_no_replica_took_the_request():
    calls = []

    async def forward(scope, body, key):
        calls.append(key)
        if len(calls) == 1:
            raise ReplicaGone("dead")
        yield {"type": ACCEPTED, "replica": "r2"}
        yield {"type": "http.response.start", "status": 200, "headers": []}
        yield {"type": "http.response.body", "body": b"ok", "more_body": False}

    sent = run_front(forward, b'{"session_id": "s"}')
    assert calls == ["session:s", "session:s"]
    assert (b"x-fermi-replica", b"r2") in sent[0]["headers"] and sent[1]["body"] == b"ok"


def test_front_ends_a_stream_whose_replica_died_with_an_error_event():
    async def forward(scope, body, key):
        yield {"type": ACCEPTED, "replica": "r1"}
        headers = [(b"content-type", b"text/event-stream")]
        yield {"type": "http.response.start", "status": 200, "headers": headers}
        yield {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}
        raise ReplicaGone("killed")

    last = run_front(forward)[-1]
    assert last["more_body"] is False
    error, done = last["body"].decode().strip().split("\n\n")
    assert json.loads(error.removeprefix("data: "))["error"]["code"] == "replica_failed"
    assert done == "data: [DONE]"


def test_front_answers_503_when_the_replica_died_before_answering():
    async def forward(scope, body, key):
        yield {"type": ACCEPTED, "replica": "r1"}
        raise ReplicaGone("killed")

    start, body = run_front(forward)
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert json.loads(body["body"])["error"]["code"] == "replica_failed"


def test_front_refuses_too_large_a_body_as_the_server_does():
    async def forward(scope, body, key):  # never reached
        raise AssertionError
        yield

    start, body = run_front(forward, b"x" * 2000, limit=1000)
    assert start["status"] == 413
    assert json.loads(body["body"])["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "./typo-dir"], "error: no such file or directory: ./typo-dir"),
        (["--min-replicas", "3", "--max-replicas", "2"], "error: replicas: need 0 <= min (3)"),
    ],
)
def test_serve_ray_usage_errors_are_one_line_before_ray_starts(tmp_path, args, message):
    done = subprocess.run([sys.executable, "-m", "fermi.cli", "serve", "ray", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message)


def test_body_messages_that_pile_up_travel_as_one():
    async def burst(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"d"})

    async def run():
        return [m async for m in exchange(burst, scope(), b"")]

    start, body = asyncio.run(run())
    assert body == {"type": "http.response.body", "body": b"abcd", "more_body": False}


def test_front_answers_429_when_the_router_refuses_the_request():
    async def forward(scope, body, key):
        raise QueueFull("every replica is at its limit")
        yield

    start, body = run_front(forward)
    assert start["status"] == 429
    assert json.loads(body["body"])["error"]["code"] == "queue_full"


def test_serve_ray_on_a_taken_port_is_one_line_before_ray_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "fermi.cli", "serve", "ray", "--model",
                               "tiny-qwen3", "--port", str(port)], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    )
