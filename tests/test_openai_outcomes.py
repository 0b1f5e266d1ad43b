"""Generations that do not end on their own, live on `fermi serve openai --timeout-ms 300
--log-format json`: the runtime ends one that runs past the server's time limit, reported as a
504 (non-streamed) or as an in-band error event followed by [DONE] (streamed); a client that
hangs up is logged as 499 with finish cancelled. The tiny model cannot produce 3000 tokens
within the limit; the tests check outcomes and log lines, never timings."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from fermi.openai_server.loadtest import serve

MODEL = "tiny-qwen3"
LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 3000,
    "ignore_eos": True,
}
ENV = {"FERMI_API_KEY": "", "HF_HUB_OFFLINE": "1", "FERMI_ENGINE_POOL": "1"}


@pytest.fixture(scope="module")
def server(tiny_artifact):
    with serve(
        str(tiny_artifact), env=ENV, args=("--timeout-ms", "300", "--log-format", "json")
    ) as running:
        yield running


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_non_streamed_generation_past_the_limit_is_a_504(server, http):
    response = http.post("/v1/chat/completions", json=LONG)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "timeout" and error["type"] == "server_error"
    assert "300 ms" in error["message"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(model=MODEL, prompt="Once", max_tokens=3000,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert raised.value.status_code == 504
    short = http.post("/v1/chat/completions", json={**LONG, "max_tokens": 2})
    assert short.status_code == 200  # a generation within the limit is untouched


def test_streamed_generation_past_the_limit_ends_with_an_error_event_then_done(http):
    with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
        assert response.status_code == 200
        frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    last = json.loads(frames[-2])
    assert last["error"]["code"] == "timeout" and "300 ms" in last["error"]["message"]
    chunks = [json.loads(f) for f in frames[:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert not any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


def test_the_server_keeps_serving_after_a_time_limit(http):
    assert http.get("/health").json()["status"] == "ok"
    metrics = http.get("/metrics").text
    assert "fermi_generations" in metrics


def access_lines(server) -> list[dict]:
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]
    return [e for e in lines if e.get("event") == "access"]


def wait_for(predicate, what: str, limit: float = 60.0):
    deadline = time.monotonic() + limit
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_time_limit_is_logged_as_504_timeout(server, http):
    assert http.post("/v1/chat/completions", json=LONG).status_code == 504
    entry = wait_for(
        lambda: [e for e in access_lines(server) if e["status"] == 504], "the 504 access line"
    )[-1]
    assert entry["finish_reason"] == "timeout" and entry["completion_tokens"] > 0


@pytest.fixture(scope="module")
def unlimited(tiny_artifact):
    """No time limit here: a client's hang-up must be what ends the generation."""
    with serve(str(tiny_artifact), env=ENV, args=("--log-format", "json")) as running:
        with httpx.Client(base_url=running.url, timeout=120) as http:
            yield running, http


def test_a_client_that_hangs_up_is_logged_as_499_cancelled(unlimited):
    """Streamed and non-streamed: the access line says 499 and finish cancelled, with the
    tokens generated before the client left."""
    server, http = unlimited

    def gone() -> list[dict]:
        return [e for e in access_lines(server) if e["status"] == 499 and "finish_reason" in e]

    def running() -> float:
        return "fermi_running 1.0" in http.get("/metrics").text

    short = LONG
    with http.stream("POST", "/v1/chat/completions", json={**short, "stream": True}) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines), next(lines)  # generating
    wait_for(lambda: len(gone()) == 1 and not running(), "the stream's 499 line")
    body = json.dumps(short).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(head + body)
        wait_for(running, "the generation")
    wait_for(lambda: len(gone()) == 2, "the non-streamed request's 499 line")
    for entry in gone():
        assert entry["route"] == "/v1/chat/completions" and entry["finish_reason"] == "cancelled"
        assert entry["prompt_tokens"] > 0
        assert "cancelled" in entry["message"] and " 499 " in entry["message"]
