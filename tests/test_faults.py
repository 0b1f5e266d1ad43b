"""Fault tests, live on 127.0.0.1: clients that disconnect at every phase of a request (while
well-behaved clients keep being served: none of their requests may be lost), and SIGTERM
during a stream on both servers. Killed exports and corrupted artifacts are in
test_security_artifacts.py. Figures are printed (`-s`) and recorded in docs/security.md."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fermi.grpc_server import fermi_pb2 as pb
from fermi.grpc_server import fermi_pb2_grpc as pb_grpc
from fermi.openai_server.loadtest import free_port, serve

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-qwen3"
LONG = 3000  # tokens of a generation meant to be cut short (ignore_eos)
WAIT_S = 60
ENV = {
    "FERMI_API_KEY": "",
    "FERMI_ENGINE_POOL": "2",
    "FERMI_MAX_QUEUE": "64",
    "FERMI_REQUEST_TIMEOUT_S": "2",
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="module")
def server(tiny_cpu_artifact):
    with serve(str(tiny_cpu_artifact), env=ENV) as running:
        yield running
        assert running.process.poll() is None


@pytest.fixture(scope="module")
def port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def body(**fields) -> bytes:
    data = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}]}
    return json.dumps({**data, "max_tokens": 4, **fields}).encode()


def head(length: int, path: str = "/v1/chat/completions") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def wait_idle(url: str) -> None:
    """No generation running or waiting: every abandoned request let go of its slot."""
    deadline = time.monotonic() + WAIT_S
    while metric(url, "fermi_running") or metric(url, "fermi_queue_depth"):
        assert time.monotonic() < deadline, "an abandoned request kept its slot"
        time.sleep(0.05)


# Each phase: a function (port) that opens a connection, gets that far, and hangs up.


def connect_only(port):
    socket.create_connection(("127.0.0.1", port)).close()


def partial_request_line(port):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/com")


def partial_headers(port):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head(100)[:40])


def partial_body(port):
    with socket.create_connection(("127.0.0.1", port)) as s:
        data = body(session_id="fault-partial")
        s.sendall(head(len(data)) + data[: len(data) // 2])


def after_request(port):
    """The whole request, then gone before the answer (a long non-streamed generation)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        data = body(max_tokens=LONG, ignore_eos=True, session_id="fault-after")
        s.sendall(head(len(data)) + data)
        time.sleep(0.05)


def mid_stream(port):
    with socket.create_connection(("127.0.0.1", port)) as s:
        data = body(max_tokens=LONG, ignore_eos=True, stream=True, session_id="fault-stream")
        s.sendall(head(len(data)) + data)
        received = b""
        while b"data: " not in received:
            chunk = s.recv(4096)
            if not chunk:
                break
            received += chunk


def mid_responses_stream(port):
    with socket.create_connection(("127.0.0.1", port)) as s:
        data = json.dumps(
            {"model": MODEL, "input": "Hi", "max_output_tokens": LONG, "stream": True}
        ).encode()
        s.sendall(head(len(data), "/v1/responses") + data)
        s.recv(4096)


def after_headers_of_the_answer(port):
    """Read only the status line of a streamed answer, then hang up."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        data = body(max_tokens=LONG, ignore_eos=True, stream=True)
        s.sendall(head(len(data)) + data)
        s.recv(12)


def reset_mid_stream(port):
    """An abortive close (TCP RST) in the middle of a stream."""
    s = socket.create_connection(("127.0.0.1", port))
    data = body(max_tokens=LONG, ignore_eos=True, stream=True)
    s.sendall(head(len(data)) + data)
    s.recv(4096)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


PHASES = [
    connect_only,
    partial_request_line,
    partial_headers,
    partial_body,
    after_request,
    after_headers_of_the_answer,
    mid_stream,
    mid_responses_stream,
    reset_mid_stream,
]


def well_behaved(url: str, i: int) -> str:
    """A normal client: a non-streamed and a streamed request on its own session."""
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/chat/completions", content=body(session_id=f"good-{i}"))
        assert r.status_code == 200, r.text
        finish = r.json()["choices"][0]["finish_reason"]
        with c.stream("POST", "/v1/chat/completions", content=body(stream=True)) as s:
            assert s.status_code == 200
            text = "".join(s.iter_text())
        assert text.rstrip().endswith("data: [DONE]"), text[-200:]
        return finish


def test_disconnects_at_every_phase_lose_no_other_request(server, port):
    """Every phase of hang-up, three times each, while 12 well-behaved clients run: all their
    requests are answered, every abandoned generation lets go of its slot and session, and the
    server stays healthy."""
    outcomes: Counter = Counter()
    with ThreadPoolExecutor(max_workers=6) as pool:
        good = [pool.submit(well_behaved, server.url, i) for i in range(12)]
        for phase in PHASES * 3:
            phase(port)
            outcomes[phase.__name__] += 1
        finishes = [f.result(timeout=300) for f in good]
    assert len(finishes) == 12 and set(finishes) <= {"stop", "length"}
    wait_idle(server.url)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    with httpx.Client(base_url=server.url, timeout=60) as c:  # no session was left busy
        for session in ("fault-partial", "fault-after", "fault-stream"):
            r = c.post("/v1/chat/completions", content=body(session_id=session))
            assert r.status_code == 200, r.text
    print(f"\ndisconnect phases: {len(PHASES)} x 3 = {sum(outcomes.values())}; "
          f"well-behaved requests answered: {2 * len(finishes)} of 24")  # fmt: skip


def test_sigterm_during_an_http_stream(tiny_cpu_artifact):
    """SIGTERM with a stream in flight: the stream finishes within the grace period or ends
    with a `server_shutting_down` error event and [DONE]; the process exits 0."""
    with serve(str(tiny_cpu_artifact), env=ENV) as running:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            request = body(max_tokens=LONG, ignore_eos=True, stream=True)
            with c.stream("POST", "/v1/chat/completions", content=request) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                running.process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # finished, or told why it ends: never just cut
        last = json.loads(rest[-2].removeprefix("data: "))
        if "error" in last:
            assert last["error"]["code"] == "server_shutting_down"
            outcome = "ended with a server_shutting_down error event"
        else:
            assert last["choices"][0]["finish_reason"] == "length"
            outcome = "finished"
        assert running.process.wait(WAIT_S) == 0
        assert "Traceback" not in running.log_tail(20000)
        print(f"\nHTTP SIGTERM: the stream {outcome} after {len(rest)} events; exit code 0")


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_while_draining_stops_at_once_and_cleanly(tiny_cpu_artifact, second):
    """SIGTERM starts the drain; a second signal during it ends the stream now with the
    `server_shutting_down` event and [DONE] (unless it finished first), and the process still
    exits 0 without a traceback (a second stop request used to crash Sanic's cleanup)."""
    with serve(str(tiny_cpu_artifact), env=ENV) as running:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            request = body(max_tokens=LONG, ignore_eos=True, stream=True)
            with c.stream("POST", "/v1/chat/completions", content=request) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                running.process.send_signal(signal.SIGTERM)
                assert next(lines) is not None  # still streaming while it drains
                running.process.send_signal(second)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        last = json.loads(rest[-2].removeprefix("data: "))
        if "error" in last:  # else the tiny model finished first: also a proper end
            assert last["error"]["code"] == "server_shutting_down"
        else:
            assert last["choices"][0]["finish_reason"] == "length"
        assert running.process.wait(WAIT_S) == 0
        assert "Traceback" not in running.log_tail(20000)


def wait_ready(log: Path, proc: subprocess.Popen) -> None:
    """Until the server's ready line is in its log."""
    deadline = time.monotonic() + WAIT_S
    while "ready on" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["openai", "grpc"])
def test_a_second_signal_while_an_idle_server_stops_still_exits_0(
    tiny_cpu_artifact, tmp_path, kind
):
    """SIGTERM, then another one a moment later while the process winds down (its own handlers
    already gone): the process still exits 0, never killed by the signal's default action
    (exit 143), which supervisors record as a failure."""
    for gap in (0.05, 0.15, 0.3):
        log = tmp_path / f"{kind}-{gap}.log"
        proc, _ = start_server(kind, tiny_cpu_artifact, log)
        try:
            proc.send_signal(signal.SIGTERM)
            time.sleep(gap)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT_S) == 0, (gap, log.read_text()[-3000:])
        finally:
            kill_if_running(proc)


def start_server(
    kind: str, artifact: Path, log: Path, **env_extra: str
) -> tuple[subprocess.Popen, int]:
    """`fermi serve KIND` in a subprocess logging to `log`, returned once its ready line is
    there."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    command = [sys.executable, "-m", "fermi.cli", "serve", kind, "--model", str(artifact),
               "--port", str(port)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=log.parent, stdout=out, stderr=out)
    wait_ready(log, proc)
    return proc, port


def kill_if_running(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def health_on_a_new_channel(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service="fermi.Fermi")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


@pytest.mark.parametrize("drain_s, outcome", [("30", "finished"), ("0.5", "UNAVAILABLE")])
def test_sigterm_during_a_grpc_stream(tiny_cpu_artifact, tmp_path, drain_s, outcome):
    """SIGTERM with a gRPC stream in flight: health on a new channel says NOT_SERVING, a new
    stream is refused with UNAVAILABLE, the stream in flight finishes within FERMI_DRAIN_S or
    is ended then with UNAVAILABLE and fermi's own message, and the process exits 0."""
    log = tmp_path / "grpc.log"
    proc, port = start_server("grpc", tiny_cpu_artifact, log, FERMI_DRAIN_S=drain_s)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FermiStub(channel)
            request = pb.GenerateRequest(prompt="A story, please.", max_new_tokens=LONG,
                                         ignore_eos=True)  # fmt: skip
            stream = stub.Generate(request, timeout=WAIT_S)
            next(stream)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + WAIT_S
            while "draining" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.02)
            if drain_s == "30":
                assert health_on_a_new_channel(port) == health_pb2.HealthCheckResponse.NOT_SERVING
                refused = pb.GenerateRequest(prompt="Hi", max_new_tokens=2)
                with pytest.raises(grpc.RpcError) as late:
                    list(stub.Generate(refused, timeout=WAIT_S))
                assert late.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "draining" in late.value.details()
                assert list(stream)[-1].finish_reason == pb.FINISH_REASON_LENGTH
            else:
                with pytest.raises(grpc.RpcError) as cut:
                    list(stream)
                assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in cut.value.details()
        assert proc.wait(WAIT_S) == 0, log.read_text()[-3000:]
        print(f"\ngRPC SIGTERM: the stream {outcome}; exit code 0")
    finally:
        kill_if_running(proc)


def test_a_second_signal_ends_grpc_streams_at_once(tiny_cpu_artifact, tmp_path):
    """SIGTERM starts the drain; a second signal ends the in-flight stream now (it is cut
    with a status instead of running on to its length) and the process exits 0."""
    log = tmp_path / "grpc.log"
    proc, port = start_server("grpc", tiny_cpu_artifact, log)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = pb.GenerateRequest(prompt="A story, please.", max_new_tokens=4000,
                                         ignore_eos=True)  # fmt: skip
            stream = pb_grpc.FermiStub(channel).Generate(request, timeout=WAIT_S)
            next(stream)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as cut:
                list(stream)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(WAIT_S) == 0, log.read_text()[-3000:]
        assert "stopping now" in log.read_text()
    finally:
        kill_if_running(proc)


def test_concurrent_hostile_traffic_loses_nothing(server, port):
    """Hostile requests (bad bodies, long URLs, stalls) and good ones, all at once."""
    hostile = [
        lambda: _raw_status(port, head(12) + b'{"a": "\\ud800"}'[:12]),
        lambda: _raw_status(port, b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\n\r\n"),
        lambda: _raw_status(port, head(30) + b"[" * 30),
        lambda: _raw_status(port, head(20) + b"\xff" * 20),
    ]
    results: Counter = Counter()
    lock = threading.Lock()

    def run(call):
        status = call()
        with lock:
            results[status] += 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        good = [pool.submit(well_behaved, server.url, 100 + i) for i in range(8)]
        bad = [pool.submit(run, h) for h in hostile * 10]
        for future in bad:
            future.result(timeout=120)
        assert all(f.result(timeout=300) for f in good)
    assert set(results) <= {400, 414}, results
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def _raw_status(port: int, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        return int(s.recv(4096).split(b" ", 2)[1])
