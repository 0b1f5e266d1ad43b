"""`fermi serve openai --timeout-ms`, live: the runtime ends a generation that runs past the
server's time limit, and the OpenAI server reports it as a 504 (non-streamed) or as an in-band
error event followed by [DONE] (streamed). The tiny model cannot produce 3000 tokens within the
limit; the tests check outcomes, never timings."""

from __future__ import annotations

import json

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
    with serve(str(tiny_artifact), env=ENV, args=("--timeout-ms", "300")) as running:
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
