"""A request that sets no output limit, as a user meets it: it runs until it stops on its own or
the context is full (finish reason "length", completion tokens = context - prompt), as vLLM,
llama-server, Ollama and OpenAI's own API run it. FERMI_MAX_NEW_TOKENS / `--max-new-tokens`
caps such requests when positive; 0 (the default) and -1 (llama.cpp's spelling) mean no cap.

Live servers and `fermi chat` on 127.0.0.1, over the tiny model with its context cut to CTX
tokens: past the 1024 tokens that were the default before, and quick to fill (about half a
second). The tiny model has random weights: ignore_eos keeps it from stopping early where the
count matters, and `fermi chat` is sent prompts it does not stop on greedily."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import httpx
import pexpect
import pytest

from fermi.grpc_server import fermi_pb2 as pb
from fermi.grpc_server import fermi_pb2_grpc as pb_grpc
from fermi.openai_server.loadtest import free_port, serve, stop_process
from tests.test_cli_errors import assert_one_line_error, fermi
from tests.test_grpc import OPTIONS, wait_serving

CTX = 1280
USER = [{"role": "user", "content": "Tell me a long story about the sea."}]
ENV = {
    "FERMI_API_KEY": "",
    "FERMI_CTX_SIZE": str(CTX),
    "FERMI_MAX_NEW_TOKENS": "",  # the default, whatever the calling shell sets
    "FERMI_DEFAULT_THINKING": "",
    "FERMI_TIMEOUT_MS": "",
    "HF_HUB_OFFLINE": "1",  # nothing here may leave 127.0.0.1
}


@pytest.fixture(scope="module")
def uncapped(tiny_artifact):
    with serve(str(tiny_artifact), env=ENV) as running:
        with httpx.Client(base_url=running.url, timeout=120) as http:
            yield http


@pytest.fixture(scope="module")
def capped(tiny_artifact):
    with serve(str(tiny_artifact), env=ENV | {"FERMI_MAX_NEW_TOKENS": "5"}) as running:
        with httpx.Client(base_url=running.url, timeout=120) as http:
            yield http


def chat(http: httpx.Client, **fields) -> dict:
    body = {"messages": USER, "temperature": 0, "ignore_eos": True, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def prompt_of(http: httpx.Client, length: int) -> list[dict]:
    """Messages whose chat prompt is exactly `length` tokens (counted with /tokenize)."""
    words = length
    for _ in range(10):
        messages = [{"role": "user", "content": "word " * words}]
        count = http.post("/tokenize", json={"messages": messages}).json()["count"]
        if count == length:
            return messages
        words += length - count
    pytest.fail(f"no prompt of {length} tokens")


# -- OpenAI: no limit runs to the end of the context -----------------------------------------


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(uncapped):
    reply = chat(uncapped)
    usage = reply["usage"]
    assert reply["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] == CTX - usage["prompt_tokens"]
    assert usage["total_tokens"] == CTX


def test_a_streamed_chat_without_max_tokens_runs_to_the_end_too(uncapped):
    body = {"messages": USER, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with uncapped.stream("POST", "/v1/chat/completions", json=body) as response:
        frames = [line for line in response.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] == "length"
    assert chunks[-1]["usage"]["total_tokens"] == CTX


def test_responses_without_max_output_tokens_run_to_the_end(uncapped):
    body = {"input": "Tell me a long story about the sea.", "temperature": 0, "ignore_eos": True}
    response = uncapped.post("/v1/responses", json=body).json()
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    usage = response["usage"]
    assert usage["output_tokens"] == CTX - usage["input_tokens"]


def test_legacy_completions_keep_openais_default_of_16(uncapped):
    body = {"prompt": "Once upon a time", "temperature": 0, "ignore_eos": True}
    done = uncapped.post("/v1/completions", json=body).json()
    assert done["usage"]["completion_tokens"] == 16


def test_an_explicit_limit_still_wins_and_the_context_still_bounds_it(uncapped):
    assert chat(uncapped, max_tokens=7)["usage"]["completion_tokens"] == 7
    too_long = uncapped.post("/v1/chat/completions", json={"messages": USER, "max_tokens": CTX})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_a_prompt_that_leaves_one_token_gets_one_and_a_full_one_is_refused(uncapped):
    reply = chat(uncapped, messages=prompt_of(uncapped, CTX - 1))
    assert reply["usage"]["completion_tokens"] == 1
    assert reply["choices"][0]["finish_reason"] == "length"
    for messages in (prompt_of(uncapped, CTX), [{"role": "user", "content": "word " * 2000}]):
        full = uncapped.post("/v1/chat/completions", json={"messages": messages})
        assert full.status_code == 400
        error = full.json()["error"]
        assert error["code"] == "context_length_exceeded" and str(CTX) in error["message"]


# -- OpenAI: FERMI_MAX_NEW_TOKENS caps requests that set no limit -----------------------------


def test_a_positive_server_default_caps_requests_without_a_limit(capped):
    reply = chat(capped)
    assert reply["usage"]["completion_tokens"] == 5
    assert reply["choices"][0]["finish_reason"] == "length"
    assert chat(capped, max_tokens=9)["usage"]["completion_tokens"] == 9  # a default, no ceiling
    near_the_end = chat(capped, messages=prompt_of(capped, CTX - 3))  # the context wins
    assert near_the_end["usage"]["completion_tokens"] == 3


# -- gRPC: max_new_tokens unset (proto3 0) ----------------------------------------------------


def test_grpc_without_max_new_tokens_runs_to_the_end_with_n_predict_minus_one(
    tiny_artifact, tmp_path
):
    """`--n-predict -1`, llama.cpp's spelling of "no cap", is accepted and means the same as
    the default 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
    command = [sys.executable, "-m", "fermi.cli", "serve", "grpc", "--model", str(tiny_artifact),
               "--host", "127.0.0.1", "--port", str(port), "--ctx-size", str(CTX),
               "--n-predict", "-1"]  # fmt: skip
    log = tmp_path / "grpc.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env | {"HF_HUB_OFFLINE": "1"}, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}", process, log)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
            request = pb.GenerateRequest(
                prompt="Tell me a long story about the sea.", ignore_eos=True,
                sampling=pb.Sampling(temperature=0.0), thinking=pb.THINKING_OFF,
            )  # fmt: skip
            last = list(pb_grpc.FermiStub(channel).Generate(request))[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == CTX - last.usage.prompt_tokens
    finally:
        stop_process(process, 30)


# -- fermi chat ---------------------------------------------------------------------------------


def test_fermi_chat_without_max_new_tokens_answers_to_the_end_of_the_context(tiny_artifact):
    """The answer runs until the context is full, which chat says; the next turn drops the
    oldest messages to fit and runs to the end again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "fermi.cli", "chat", "--model", str(tiny_artifact), "--device", "cpu",
         "--temperature", "0", "--thinking", "off", "--ctx-size", str(CTX)],
        env=env | {"HF_HUB_OFFLINE": "1"},
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )  # fmt: skip
    try:
        child.expect_exact(">>> ")
        child.sendline("Hello there")
        child.expect_exact("(context full)")
        child.expect_exact(">>> ")
        child.sendline("Go on.")
        child.expect_exact("(context full)")
        child.expect_exact("oldest messages to fit the context")
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


# -- settings ---------------------------------------------------------------------------------


def test_max_new_tokens_defaults_to_no_cap_and_refuses_below_minus_one(tmp_path):
    from fermi.errors import InvalidRequest
    from fermi.settings import load_settings

    assert load_settings({}).max_new_tokens == 0
    assert load_settings({"FERMI_MAX_NEW_TOKENS": "-1"}).max_new_tokens == -1
    config = tmp_path / "fermi.toml"
    config.write_text("max_new_tokens = 2048\n")
    assert load_settings({"FERMI_CONFIG": str(config)}).max_new_tokens == 2048
    with pytest.raises(InvalidRequest, match="FERMI_MAX_NEW_TOKENS"):
        load_settings({"FERMI_MAX_NEW_TOKENS": "-2"})
    assert_one_line_error(fermi("chat", "--max-new-tokens", "-2"), "--max-new-tokens", "-1")
