"""`fermi serve openai` as an operator meets it: started with command-line flags, read through
its own output (the ready line, the access log, JSON logs), probed with HEAD and wrong methods,
and stopped with SIGTERM while a stream runs (draining). Live servers on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from fermi.openai_server.loadtest import free_port, serve, stop_process

BASE_ENV = {
    "FERMI_API_KEY": "",
    "FERMI_DEFAULT_THINKING": "",
    "FERMI_SERVED_MODEL_NAME": "",
    "FERMI_CTX_SIZE": "",
    "FERMI_LOG_FORMAT": "",
    "HF_HUB_OFFLINE": "1",  # nothing here may leave 127.0.0.1
}
KEY = "sekrit-operator-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "Hello there"}]
CTX = 256


def wait_for(predicate, what: str, limit: float = 60.0):
    deadline = time.monotonic() + limit
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)
    return value


def json_lines(text: str) -> list[dict]:
    """Every line of a --log-format json server's output, parsed (each must be JSON)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def flagged(tiny_artifact):
    """A server started with flags only: two served names, a context cap, a key, JSON logs."""
    args = (
        "--served-model-name", "tiny-alias", "--alias", "second-name", "--alias", "org/my-model",
        "--ctx-size", str(CTX),
        "--api-key", KEY, "--log-format", "json", "--max-num-seqs", "2", "--max-queue", "5",
        "--threads", "1", "-n", "3", "--allowed-origins", "http://ok.example",
        "--max-body-bytes", "2048", "--session-max", "4", "--default-thinking", "off",
    )  # fmt: skip
    with serve(str(tiny_artifact), env=BASE_ENV, args=args) as running:
        yield running


@pytest.fixture
def http(flagged):
    with httpx.Client(base_url=flagged.url, timeout=60, headers=AUTH) as client:
        yield client


def test_ready_line_says_where_what_and_how_much(flagged):
    ready = wait_for(
        lambda: [e for e in json_lines(flagged.log.read_text()) if e.get("event") == "ready"],
        "the ready line",
    )
    assert len(ready) == 1
    line = ready[0]
    assert line["address"] == flagged.url
    assert (line["model"], line["device"], line["precision"]) == ("tiny-alias", "cpu", "fp32")
    assert (line["context_length"], line["max_num_seqs"], line["max_queue"]) == (CTX, 2, 5)
    assert "warning" not in line  # loopback and a key
    assert flagged.url in line["message"] and "tiny-alias" in line["message"]


def test_served_names_full_path_and_folder_name(flagged, http, tiny_artifact):
    client = openai.OpenAI(base_url=flagged.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-alias"]
    for name in ("tiny-alias", "second-name", "tiny-qwen3", str(tiny_artifact), "tiny"):
        reply = client.chat.completions.create(model=name, messages=USER, max_tokens=2)
        assert reply.model == "tiny-alias"  # the first served name is the one reported
        assert http.get(f"/v1/models/{name}").json()["id"] == "tiny-alias"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)


def test_a_served_name_with_a_slash_is_retrieved_by_the_official_client(flagged, http):
    """openai-python sends models.retrieve("org/my-model") as /v1/models/org%2Fmy-model; the
    plain /v1/models/org/my-model works as well."""
    client = openai.OpenAI(base_url=flagged.url + "/v1", api_key=KEY, max_retries=0)
    assert client.models.retrieve("org/my-model").id == "tiny-alias"
    assert http.get("/v1/models/org/my-model").json()["id"] == "tiny-alias"
    with pytest.raises(openai.NotFoundError, match="'org/other'"):
        client.models.retrieve("org/other")


def test_models_list_and_trailing_slash_carry_what_clients_use(http):
    listed = http.get("/v1/models").json()
    assert http.get("/v1/models/").json() == listed
    (card,) = listed["data"]
    assert {k: card[k] for k in ("id", "object", "owned_by")} == {
        "id": "tiny-alias", "object": "model", "owned_by": "fermi"
    }  # fmt: skip
    assert card["context_length"] == card["max_model_len"] == CTX
    assert card["supports_thinking"] is True  # tiny-qwen3 has Qwen3's template
    assert isinstance(card["supports_tools"], bool)
    assert (card["precision"], card["target"]) == ("fp32", "portable")  # the fixture's export
    assert card["architecture"] == "Qwen3ForCausalLM"


def test_ctx_size_caps_the_context(http):
    body = {"model": "tiny-alias", "messages": USER, "max_tokens": CTX}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and str(CTX) in error["message"]
    body["max_tokens"] = 8
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_request_limits_from_flags(http):
    """-n 3: a request without max_tokens gets 3 tokens at most; --max-body-bytes 2048: a
    bigger body is 413; --allowed-origins: CORS for that origin only."""
    reply = http.post("/v1/chat/completions", json={"messages": USER, "ignore_eos": True})
    assert reply.json()["usage"]["completion_tokens"] == 3
    big = http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 4096}]}
    )
    assert big.status_code == 413
    allowed = http.get("/v1/models", headers={"Origin": "http://ok.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://ok.example"
    other = http.get("/v1/models", headers={"Origin": "http://other.example"})
    assert "access-control-allow-origin" not in other.headers


def test_api_key_flag(flagged):
    with httpx.Client(base_url=flagged.url) as anonymous:
        denied = anonymous.get("/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert anonymous.get("/health").status_code == 200


def test_head_works_where_get_does_and_405_says_allow(http):
    for path in ("/health", "/v1/models", "/v1/models/tiny-alias", "/metrics"):
        head, get = http.head(path), http.get(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
    wrong = http.put("/health")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    allow = set(wrong.headers["allow"].replace(" ", "").split(","))
    assert allow == {"GET", "HEAD", "OPTIONS"}  # OPTIONS: the CORS preflight
    post_only = http.get("/v1/chat/completions")
    assert post_only.status_code == 405 and "POST" in post_only.headers["allow"]


def test_access_log_has_route_status_tokens_and_times(flagged, http):
    body = {"model": "tiny-alias", "messages": USER, "max_tokens": 4}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    stream = http.post("/v1/chat/completions", json={**body, "stream": True, "session_id": "a"})
    assert stream.text.endswith("data: [DONE]\n\n")
    http.get("/v1/nothing")

    def access() -> list[dict]:
        entries = json_lines(flagged.log.read_text())
        return [e for e in entries if e.get("event") == "access"]

    wait_for(lambda: len([e for e in access() if e["route"] == "/v1/nothing"]), "the 404 line")
    chats = [e for e in access() if e["route"] == "/v1/chat/completions" and e["status"] == 200]
    assert len(chats) >= 2
    for entry in chats[-2:]:
        assert entry["method"] == "POST" and entry["transport"] == "http"
        assert entry["prompt_tokens"] > 0 and 0 < entry["completion_tokens"] <= 4
        assert entry["finish_reason"] in ("stop", "length")
        assert entry["total_ms"] >= 0 and "ttft_ms" in entry and entry["level"] == "info"
    (missing,) = [e for e in access() if e["route"] == "/v1/nothing"]
    assert missing["status"] == 404 and "prompt_tokens" not in missing


def test_sigterm_drains_running_streams_then_exits(tiny_artifact):
    """/health: ok -> draining (503) on SIGTERM; new work is refused with 503 while the
    running stream finishes; then the process exits 0. Plain logs: the ready line is text."""
    port = free_port()
    command = [sys.executable, "-m", "fermi.cli", "serve", "openai", "--model",
               str(tiny_artifact), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = Path(tiny_artifact).parent / f"drain-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**os.environ, **BASE_ENV}, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "ready on" in log.read_text(), "the ready line")
        assert f"ready on {url}: model tiny-qwen3 on cpu (fp32)" in log.read_text()
        assert httpx.get(url + "/health").json()["status"] == "ok"
        body = {"messages": USER, "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=120) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as running:
                lines = running.iter_lines()
                assert next(lines).startswith("data: ")
                process.send_signal(signal.SIGTERM)
                health = wait_for(
                    lambda: (r := httpx.get(url + "/health")).status_code == 503 and r,
                    "draining",
                )
                assert health.json() == {"status": "draining"}
                refused = httpx.post(url + "/v1/chat/completions", json={"messages": USER})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "server_draining"
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert reasons[-1] == "length"  # it ran to its end
        assert process.wait(60) == 0
        text = log.read_text()
        assert 'http "POST /v1/chat/completions" 200' in text and "completion=1500" in text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.unlink(missing_ok=True)


def test_grpc_server_flags_ready_line_access_log_and_list_models(tiny_artifact, tmp_path):
    """`fermi serve grpc` with flags: ListModels reports the served name, the context cap and
    what the model can do; the ready line and an access line per RPC are JSON log lines."""
    import grpc

    from fermi.grpc_server import fermi_pb2 as pb
    from fermi.grpc_server import fermi_pb2_grpc as pb_grpc

    port = free_port()
    command = [sys.executable, "-m", "fermi.cli", "serve", "grpc", "--model", str(tiny_artifact),
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny-grpc,other",
               "-c", str(CTX), "--log-format", "json"]  # fmt: skip
    log = tmp_path / "grpc.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**os.environ, **BASE_ENV}, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        ready = wait_for(
            lambda: [e for e in json_lines(log.read_text()) if e.get("event") == "ready"],
            "the ready line",
        )
        assert ready[0]["address"] == f"grpc://127.0.0.1:{port}"
        assert (ready[0]["model"], ready[0]["context_length"]) == ("tiny-grpc", CTX)
        options = [("grpc.enable_http_proxy", 0)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = pb_grpc.FermiStub(channel)
            (model,) = stub.ListModels(pb.ListModelsRequest()).models
            assert (model.id, model.context_length, list(model.aliases)) == (
                "tiny-grpc", CTX, ["other"]
            )  # fmt: skip
            assert model.supports_thinking and model.HasField("supports_tools")
            assert (model.precision, model.target) == ("fp32", "portable")
            last = list(stub.Generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=3)))[-1]
        access = wait_for(
            lambda: [
                e for e in json_lines(log.read_text())
                if e.get("event") == "access" and e["route"] == "/fermi.Fermi/Generate"
            ],
            "the Generate access line",
        )  # fmt: skip
        entry = access[0]
        assert (entry["transport"], entry["status"]) == ("grpc", "OK")
        assert entry["completion_tokens"] == last.usage.completion_tokens
        assert entry["prompt_tokens"] == last.usage.prompt_tokens and "ttft_ms" in entry
    finally:
        stop_process(process, 30)
