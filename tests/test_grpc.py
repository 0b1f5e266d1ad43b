"""`fermi serve grpc` against the tiny model, through real grpc clients (sync and grpc.aio).

Most tests talk to a live server started once as a subprocess (`python -m fermi.cli serve grpc`)
on 127.0.0.1; a few start the server in-process to control what it sits on (a runtime that is
still loading, one with no queue, one that fails midway). All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fermi.errors import ArtifactError, InvalidRequest, QueueFull, SessionBusy, SessionNotFound
from fermi.grpc_server import fermi_pb2 as pb
from fermi.grpc_server import fermi_pb2_grpc as pb_grpc
from fermi.grpc_server.server import (
    GrpcServer,
    delta_message,
    status_for,
    to_generation_request,
)
from fermi.requests import Finished, GenerationRequest, Message, SamplingParams, TextDelta
from fermi.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = [("grpc.enable_http_proxy", 0)]  # never route 127.0.0.1 through a proxy
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROMPT = "Tell me a long story about the sea."
GREEDY = pb.Sampling(temperature=0.0)
WAIT_S = 30  # upper bound for polls that normally end within milliseconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                request = health_pb2.HealthCheckRequest(service="fermi.Fermi")
                if health.Check(request, timeout=1).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    pytest.fail(f"server at {address} never became SERVING")


def poll(predicate, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def server_address(tiny_cpu_artifact, tmp_path_factory):
    """`fermi serve grpc` as a subprocess on a free 127.0.0.1 port, SERVING."""
    workdir = tmp_path_factory.mktemp("grpc-server")  # no stray fermi.toml
    log = workdir / "server.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [
        sys.executable, "-m", "fermi.cli", "serve", "grpc", "--model", str(tiny_cpu_artifact),
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, proc, log)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "killed"
    assert code == 0, f"server did not shut down cleanly ({code}):\n{log.read_text()}"


@pytest.fixture(scope="module")
def channel(server_address):
    with grpc.insecure_channel(server_address, options=OPTIONS) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.FermiStub(channel)


@pytest.fixture(scope="module")
def runtime(tiny_artifact):
    """The same artifact loaded in this process: the reference for greedy output."""
    from fermi.runtime import Runtime

    return Runtime.load(Settings(model=str(tiny_artifact), device="cpu"))


@pytest.fixture(scope="module")
def long_tokens(runtime):
    """A max_new_tokens that fills most of the context: such a stream (several seconds on the
    tiny model) is still running when a test cancels it a few tokens in."""
    return runtime.context_length - 64


def long_request(max_new_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=PROMPT, sampling=GREEDY, max_new_tokens=max_new_tokens, ignore_eos=True
    )


def generate(stub, prompt=PROMPT, **fields) -> list[pb.GenerateResponse]:
    """A short greedy stream; ignore_eos makes its length independent of the random weights."""
    fields.setdefault("sampling", GREEDY)
    fields.setdefault("thinking", pb.THINKING_OFF)
    fields.setdefault("max_new_tokens", 8)
    fields.setdefault("ignore_eos", True)
    return list(stub.Generate(pb.GenerateRequest(prompt=prompt, **fields), timeout=60))


def split(messages) -> tuple[list[pb.GenerateResponse], pb.GenerateResponse]:
    *pieces, last = messages
    assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED and last.HasField("usage")
    assert last.token == "" and not last.token_ids
    assert all(p.token and p.finish_reason == pb.FINISH_REASON_UNSPECIFIED for p in pieces)
    return pieces, last


def ids_of(pieces) -> list[int]:
    return [t for p in pieces for t in p.token_ids]


def stats(stub) -> pb.GetStatsResponse:
    return stub.GetStats(pb.GetStatsRequest(), timeout=10)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- the live server -------------------------------------------------------------------------


def test_health_and_reflection_list_the_services(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "fermi.Fermi"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING

    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    database = ProtoReflectionDescriptorDatabase(channel)  # what grpcurl does
    services = set(database.get_services())
    assert {"fermi.Fermi", "grpc.health.v1.Health"} <= services
    assert any("ServerReflection" in s for s in services)
    pool = DescriptorPool(database)
    fermi = pool.FindServiceByName("fermi.Fermi")
    assert {m.name for m in fermi.methods} >= {"Generate", "ResetSession", "ListModels"}
    request = pool.FindMessageTypeByName("fermi.GenerateRequest")
    assert request.fields_by_name["prompt"].number == 2


def test_list_models(stub, runtime):
    (model,) = stub.ListModels(pb.ListModelsRequest()).models
    assert model.id == runtime.model_id
    assert model.context_length == runtime.context_length
    assert model.precision == "fp32" and model.architecture


def test_stream_carries_text_ids_session_and_a_final_usage(stub):
    pieces, last = split(generate(stub, max_new_tokens=12))
    assert pieces
    session = last.session_id
    assert len(session) >= 16 and all(p.session_id == session for p in pieces)
    for p in pieces:
        assert p.kind == pb.TEXT_KIND_ANSWER
        assert p.token_ids and p.token_id == p.token_ids[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens > 0 and last.usage.cached_tokens == 0
    assert 0 < len(ids_of(pieces)) <= last.usage.completion_tokens == 12
    assert last.usage.reasoning_tokens == 0 and not last.thinking


def test_thinking_mode_reaches_the_prompt(stub):
    (model,) = stub.ListModels(pb.ListModelsRequest()).models
    assert model.supports_thinking
    _, on = split(generate(stub, thinking=pb.THINKING_ON, max_new_tokens=2))
    _, off = split(generate(stub, thinking=pb.THINKING_OFF, max_new_tokens=2))
    assert on.thinking and not off.thinking
    # thinking off closes an empty <think></think> block in the prompt: more prompt tokens
    assert off.usage.prompt_tokens > on.usage.prompt_tokens


def test_greedy_output_equals_the_runtime_in_process(stub, runtime):
    system = "You are terse."
    pieces, last = split(generate(stub, system_prompt=system, max_new_tokens=24))
    request = GenerationRequest(
        [Message("system", system), Message("user", PROMPT)],
        max_new_tokens=24,
        sampling=SamplingParams(temperature=0.0),
        thinking="off",
        ignore_eos=True,
    )
    events = list(runtime.submit(request))
    expected = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    assert ids_of(pieces) == expected
    assert "".join(p.token for p in pieces) == "".join(
        e.text for e in events if isinstance(e, TextDelta)
    )
    done = events[-1]
    assert isinstance(done, Finished)
    assert last.usage.completion_tokens == done.usage.completion_tokens
    assert last.usage.prompt_tokens == done.usage.prompt_tokens


def test_a_session_continues_with_cached_tokens(stub):
    _, first = split(generate(stub, max_new_tokens=6))
    session = first.session_id
    pieces, second = split(generate(stub, "And then?", session_id=session, max_new_tokens=6))
    assert second.session_id == session and all(p.session_id == session for p in pieces)
    assert second.usage.cached_tokens > 0
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # a client-chosen id creates a session too
    _, named = split(generate(stub, session_id="client-chosen-id", max_new_tokens=2))
    assert named.session_id == "client-chosen-id"


def test_reset_session(stub):
    missing = rpc_error(lambda: stub.ResetSession(pb.ResetSessionRequest(session_id="nope")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "nope" in missing.details()
    empty = rpc_error(lambda: stub.ResetSession(pb.ResetSessionRequest()))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in empty.details()

    prompt = "A prompt that only this test sends"
    _, first = split(generate(stub, prompt, max_new_tokens=4))
    stub.ResetSession(pb.ResetSessionRequest(session_id=first.session_id))
    _, again = split(generate(stub, prompt, session_id=first.session_id, max_new_tokens=4))
    assert again.usage.prompt_tokens == first.usage.prompt_tokens  # the history is forgotten
    # and the KV it pinned: what is reused now is only the template's opening, which other
    # requests left in the prefix cache
    assert again.usage.cached_tokens < again.usage.prompt_tokens // 2


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": "  "}, "prompt"),
        ({"sampling": pb.Sampling(temperature=2.5)}, "temperature"),
        ({"temperature": 3.0}, "temperature"),
        ({"sampling": pb.Sampling(top_p=1.5)}, "top_p"),
        ({"repeat_penalty": 7.0}, "repeat_penalty"),
        ({"sampling": pb.Sampling(min_p=2.0)}, "min_p"),
        ({"sampling": pb.Sampling(presence_penalty=-3.0)}, "presence_penalty"),
        ({"stop": [""]}, "stop"),
        ({"thinking": 42}, "thinking"),
        ({"max_new_tokens": 10_000_000}, "context length"),
    ],
)
def test_invalid_arguments_name_the_field(stub, fields, field):
    fields = {"prompt": PROMPT, **fields}
    error = rpc_error(lambda: list(stub.Generate(pb.GenerateRequest(**fields), timeout=30)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()


def test_busy_session_is_resource_exhausted(stub, long_tokens):
    first = stub.Generate(long_request(long_tokens), timeout=60)
    session = next(first).session_id
    try:
        error = rpc_error(lambda: generate(stub, "again", session_id=session))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "busy" in error.details() and session in error.details()
    finally:
        first.cancel()


def _cancelled_count(stub, before):
    now = stats(stub)
    return now if now.streams_cancelled > before.streams_cancelled else None


def test_client_cancel_stops_generation(stub, long_tokens):
    before = stats(stub)
    call = stub.Generate(long_request(long_tokens), timeout=60)
    session = next(call).session_id
    call.cancel()
    after = poll(lambda: _cancelled_count(stub, before), "the cancelled stream to end")
    # It stopped early: far fewer tokens than asked for, and nothing is left running (the
    # stream is counted a moment before its engine slot is handed back, hence the poll).
    assert after.completion_tokens - before.completion_tokens < long_tokens
    assert after.streams_length == before.streams_length
    poll(lambda: stats(stub).running == 0 or None, "the engine slot to be released")
    # The session was released the moment the stream ended (a follow-up is served at once)
    # and kept the KV cache of what was generated.
    _, last = split(generate(stub, "Shorter, please.", session_id=session, max_new_tokens=2))
    assert last.session_id == session and last.usage.cached_tokens > 0


def test_client_deadline_stops_generation_aio(server_address, stub, long_tokens):
    before = stats(stub)

    async def run() -> tuple[str, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(server_address, options=OPTIONS) as channel:
            request = long_request(long_tokens)
            call = pb_grpc.FermiStub(channel).Generate(request, timeout=1.0)
            session = ""
            try:
                async for message in call:
                    session = message.session_id
            except grpc.aio.AioRpcError as e:
                return session, e.code()
            return session, grpc.StatusCode.OK

    session, code = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and session

    def ended():
        # The server counts it as deadline_exceeded when its copy of the deadline expired, or
        # as cancelled when the client's own timer fired first and reset the stream.
        now = stats(stub)
        stopped = now.streams_deadline_exceeded + now.streams_cancelled
        return (
            now if stopped > before.streams_deadline_exceeded + before.streams_cancelled else None
        )

    after = poll(ended, "the expired stream to end")
    assert after.completion_tokens - before.completion_tokens < long_tokens
    _, last = split(generate(stub, "Go on.", session_id=session, max_new_tokens=2))
    assert last.session_id == session and last.usage.cached_tokens > 0


def test_sixteen_concurrent_streams_complete_aio(server_address):
    async def one(stub, i: int) -> list[pb.GenerateResponse]:
        request = pb.GenerateRequest(
            prompt=f"Story number {i}", sampling=GREEDY, max_new_tokens=8, ignore_eos=True,
            thinking=pb.THINKING_OFF,
        )  # fmt: skip
        return [m async for m in stub.Generate(request, timeout=120)]

    async def run():
        async with grpc.aio.insecure_channel(server_address, options=OPTIONS) as channel:
            stub = pb_grpc.FermiStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(16)))

    streams = asyncio.run(run())
    finals = [split(messages)[1] for messages in streams]
    assert len({f.session_id for f in finals}) == 16
    assert all(f.usage.completion_tokens == 8 for f in finals)


LEGACY_PROTO = """
syntax = "proto3";
package fermi;
service Fermi { rpc Generate(GenerateRequest) returns (stream GenerateResponse); }
message GenerateRequest {
  string session_id = 1; string prompt = 2; uint32 max_new_tokens = 3; float repeat_penalty = 4;
  string system_prompt = 5; float temperature = 6; float top_p = 7;
}
message GenerateResponse { string token = 1; uint32 token_id = 2; string session_id = 3; }
"""


def legacy_messages(tmp_path):
    """GenerateRequest/GenerateResponse classes compiled from the ORIGINAL proto only, in their
    own descriptor pool (the package name clashes with ours in the default one)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    (tmp_path / "legacy.proto").write_text(LEGACY_PROTO)
    out = tmp_path / "legacy.pb"
    args = ["protoc", f"-I{tmp_path}", f"--descriptor_set_out={out}", "legacy.proto"]
    assert protoc.main(args) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return tuple(
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"fermi.{name}"))
        for name in ("GenerateRequest", "GenerateResponse")
    )


def test_an_old_client_with_the_original_seven_fields_still_works(channel, tmp_path):
    Request, Response = legacy_messages(tmp_path)
    assert [f.number for f in Request.DESCRIPTOR.fields] == list(range(1, 8))
    generate_old = channel.unary_stream(
        "/fermi.Fermi/Generate",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    request = Request(prompt="Hello", max_new_tokens=16, repeat_penalty=1.1, temperature=0.2,
                      top_p=1.0, system_prompt="Be brief.")  # fmt: skip
    replies = list(generate_old(request, timeout=60))
    session = replies[0].session_id
    assert replies[-1].token == "" and replies[-1].token_id == 0  # the final message, as seen
    # proto3 zeros (temperature 0 included) mean "defaults"; the session continues. An old
    # client cannot set ignore_eos, so ask until the random tiny model has said something.
    for _ in range(5):
        if any(r.token for r in replies):
            break
        replies += list(generate_old(Request(session_id=session, prompt="More"), timeout=60))
    assert session and all(r.session_id == session for r in replies)
    text = [r for r in replies if r.token]
    assert text and any(r.token_id for r in text)  # a trailing "\ufffd" piece may carry none


# -- in-process servers ----------------------------------------------------------------------


def start_in_process(settings: Settings, load) -> tuple[GrpcServer, str]:
    server = GrpcServer(settings, load=load)
    port = server.start("127.0.0.1", 0)
    return server, f"127.0.0.1:{port}"


def test_not_serving_until_the_model_is_loaded(runtime):
    release = threading.Event()

    def slow_load(settings):
        assert release.wait(WAIT_S)
        return runtime

    server, address = start_in_process(Settings(), slow_load)
    try:
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "fermi.Fermi"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
                assert status == NOT_SERVING
            error = rpc_error(lambda: generate(pb_grpc.FermiStub(channel)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.details()
            release.set()
            wait_serving(address)
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == SERVING
            assert split(generate(pb_grpc.FermiStub(channel), max_new_tokens=2))
    finally:
        release.set()
        server.stop(grace=0)


def test_a_load_failure_stops_the_server_with_its_error():
    def broken(settings):
        raise ArtifactError("artifact /x is incomplete")

    server, _ = start_in_process(Settings(), broken)
    with pytest.raises(ArtifactError, match="incomplete"):
        server.wait()


SIGNAL_IN_ANOTHER_THREAD = """
import signal, threading, time
from fermi.grpc_server.server import GrpcServer
from fermi.settings import Settings

never = threading.Event()
server = GrpcServer(Settings(), load=lambda settings: never.wait())
server.start("127.0.0.1", 0)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.stop).start())


def kill_from_here():  # once main waits: the kernel may hand a signal to any thread
    time.sleep(0.5)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


threading.Thread(target=kill_from_here).start()
server.wait()
print("stopped")
"""


def test_a_signal_taken_by_another_thread_still_stops_the_server(tmp_path):
    """The main thread waits in GrpcServer.wait(); a SIGTERM that the kernel delivered to a
    grpc or onnxruntime thread must still run the handler (it used to wait forever)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SIGNAL_IN_ANOTHER_THREAD], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S)  # fmt: skip
    assert done.returncode == 0 and "stopped" in done.stdout, done.stderr[-2000:]


def test_a_stream_the_drain_ends_is_counted_as_cancelled_not_failed(runtime, long_tokens):
    """A stream still running when the drain limit passes ends with UNAVAILABLE "shutting
    down" and counts as cancelled in GetStats' counters, not as an internal failure."""
    server, address = start_in_process(Settings(), lambda s: runtime)
    try:
        wait_serving(address)
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            stream = pb_grpc.FermiStub(channel).Generate(long_request(long_tokens), timeout=60)
            next(stream)
            drain = threading.Thread(target=server.drain, kwargs={"grace_s": 0.0})
            drain.start()
            with pytest.raises(grpc.RpcError) as cut:
                list(stream)
            drain.join(WAIT_S)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in cut.value.details()
        counts = server.stats.snapshot()
        assert (counts["cancelled"], counts["failed"]) == (1, 0)
    finally:
        server.stop(grace=0)


class StuckRuntime:
    """A runtime whose submit blocks until released: a handler thread that does not return."""

    def __init__(self, runtime):
        self._runtime = runtime
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def submit(self, request):
        self.entered.set()
        self.release.wait(WAIT_S)
        raise QueueFull("released")


def test_stopping_reports_handler_threads_that_do_not_return(runtime):
    """After stop(), release_handlers waits a bounded time for busy handler threads and says
    how many are still running (the CLI then exits without joining them), and 0 once they
    have returned."""
    stuck = StuckRuntime(runtime)
    server, address = start_in_process(Settings(), lambda s: stuck)
    try:
        wait_serving(address)
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            stub = pb_grpc.FermiStub(channel)
            stream = stub.Generate(pb.GenerateRequest(prompt="Hi"), timeout=WAIT_S)
            waiter = threading.Thread(target=lambda: rpc_error(lambda: list(stream)))
            waiter.start()
            assert stuck.entered.wait(WAIT_S)
            server.stop(grace=0)
            assert server.release_handlers(0.2) == 1
            stuck.release.set()
            assert server.release_handlers(WAIT_S) == 0
            waiter.join(WAIT_S)
    finally:
        stuck.release.set()
        server.stop(grace=0)


class FaultyRuntime:
    """The real runtime, except that a prompt containing FAULT breaks after its first event."""

    def __init__(self, runtime):
        self._runtime = runtime

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def submit(self, request):
        gen = self._runtime.submit(request)
        return FaultyGeneration(gen) if "FAULT" in request.messages[-1].content else gen


class FaultyGeneration:
    def __init__(self, gen):
        self._gen = gen
        self.session_id = gen.session_id

    def __iter__(self):
        events = iter(self._gen)
        try:
            yield next(events)
            raise RuntimeError("injected fault")
        finally:
            events.close()

    def cancel(self):
        self._gen.cancel()

    def close(self):
        self._gen.close()


def test_an_exception_inside_generation_is_internal_and_the_server_keeps_serving(runtime):
    server, address = start_in_process(Settings(), lambda s: FaultyRuntime(runtime))
    try:
        wait_serving(address)
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            stub = pb_grpc.FermiStub(channel)
            error = rpc_error(lambda: generate(stub, "FAULT here", session_id="faulty"))
            assert error.code() == grpc.StatusCode.INTERNAL and "injected fault" in error.details()
            assert stats(stub).streams_failed == 1
            _, last = split(generate(stub, "fine now", session_id="faulty", max_new_tokens=2))
            assert last.session_id == "faulty"  # the session was released
    finally:
        server.stop(grace=0)


def test_a_full_queue_and_the_server_time_limit(tiny_artifact, long_tokens):
    from fermi.runtime import Runtime

    # One engine slot and no waiting room: a second concurrent stream is refused.
    settings = Settings(model=str(tiny_artifact), device="cpu", engine_pool=1, max_queue=0,
                        timeout_ms=1000)  # fmt: skip
    small = Runtime.load(settings)
    server, address = start_in_process(settings, lambda s: small)
    try:
        wait_serving(address)
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            stub = pb_grpc.FermiStub(channel)
            request = long_request(long_tokens)
            first = stub.Generate(request, timeout=60)
            session = next(first).session_id
            full = rpc_error(lambda: generate(stub, "me too"))
            assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "capacity" in full.details()
            # FERMI_TIMEOUT_MS ends the first stream with DEADLINE_EXCEEDED
            timed_out = rpc_error(lambda: list(first))
            assert timed_out.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "1000 ms" in timed_out.details()
            after = stats(stub)
            assert after.streams_deadline_exceeded == 1
            assert after.completion_tokens < long_tokens
            _, last = split(generate(stub, "Go on.", session_id=session, max_new_tokens=2))
            assert last.session_id == session
    finally:
        server.stop(grace=0)


def test_refusals_are_counted_apart_from_failures(stub):
    before = stats(stub)
    bad = rpc_error(lambda: generate(stub, "", max_new_tokens=8))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = stats(stub)
    assert after.streams_refused == before.streams_refused + 1
    assert after.streams_failed == before.streams_failed


def test_a_stream_ended_by_the_server_stopping_is_not_logged_ok(runtime, long_tokens, caplog):
    """The server stops while a stream runs: the stream's access line gives the RPC's real
    status (CANCELLED), not OK."""
    server, address = start_in_process(Settings(), lambda s: runtime)
    caplog.set_level(logging.INFO, logger="fermi.access")
    try:
        wait_serving(address)
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            call = pb_grpc.FermiStub(channel).Generate(long_request(long_tokens), timeout=60)
            next(call)
            server.stop(grace=0)
            assert rpc_error(lambda: list(call)).code() in (
                grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE
            )  # fmt: skip
    finally:
        server.stop(grace=0)

    def generate_lines():
        return [r.getMessage() for r in caplog.records if "/fermi.Fermi/Generate" in r.getMessage()]

    (line,) = poll(generate_lines, "the Generate access line")
    assert " CANCELLED " in line and " OK " not in line, line


def test_cli_reports_a_missing_model_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
    env.update(PYTHONPATH=str(ROOT), FERMI_OFFLINE="1")
    cmd = [sys.executable, "-m", "fermi.cli", "serve", "grpc", "--model", str(tmp_path / "none"),
           "--host", "127.0.0.1", "--port", str(free_port())]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error:" in out.stderr


# -- the request and error mapping (no server) ----------------------------------------------


def test_proto3_zero_means_default_and_sampling_fields_win():
    legacy = to_generation_request(pb.GenerateRequest(prompt="hi", temperature=0.0), "s")
    assert legacy.sampling.temperature is None and legacy.max_new_tokens is None
    assert legacy.session_id == "s" and legacy.append
    assert [(m.role, m.content) for m in legacy.messages] == [("user", "hi")]

    old = to_generation_request(
        pb.GenerateRequest(prompt="hi", temperature=0.7, top_p=0.9, repeat_penalty=1.1,
                           system_prompt="sys", max_new_tokens=5), "s",
    )  # fmt: skip
    assert (old.sampling.temperature, old.sampling.top_p) == (0.7, 0.9)
    assert old.sampling.repetition_penalty == 1.1 and old.max_new_tokens == 5
    assert [m.role for m in old.messages] == ["system", "user"]

    new = to_generation_request(
        pb.GenerateRequest(
            prompt="hi", temperature=0.7, stop=["x"], thinking=pb.THINKING_ON,
            sampling=pb.Sampling(temperature=0.0, top_k=0, seed=3, presence_penalty=0.5),
        ), "s",
    )  # fmt: skip
    assert new.sampling.temperature == 0.0 and new.sampling.top_k == 0
    assert new.sampling.seed == 3 and new.sampling.presence_penalty == 0.5
    assert new.stop == ["x"] and new.thinking == "on" and not new.ignore_eos
    assert to_generation_request(pb.GenerateRequest(prompt="x", ignore_eos=True), "s").ignore_eos


def test_deltas_say_reasoning_or_answer():
    reasoning = delta_message("s", TextDelta("hm", "reasoning", [5, 6]))
    assert reasoning.kind == pb.TEXT_KIND_REASONING and reasoning.token_id == 6
    assert list(reasoning.token_ids) == [5, 6] and reasoning.session_id == "s"
    assert delta_message("s", TextDelta("ok", "answer", [7])).kind == pb.TEXT_KIND_ANSWER


def test_one_status_per_error_type():
    assert status_for(InvalidRequest("bad", param="messages"))[1] == "prompt: bad"
    assert status_for(InvalidRequest("bad", "max_tokens"))[1] == "max_new_tokens: bad"
    assert status_for(SessionBusy("s"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(QueueFull("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(SessionNotFound("s"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_for(KeyError("x"))[0] == grpc.StatusCode.INTERNAL
