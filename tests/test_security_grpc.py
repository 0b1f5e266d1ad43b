"""Security of the gRPC server, in-process on 127.0.0.1 with real grpc clients: the same API keys
as HTTP (UNAUTHENTICATED without one; health and reflection open), sessions owned by their key,
one session id bound, undecodable requests answered INVALID_ARGUMENT, server-minted sessions
that expire when their id never comes back, truncated ids in logs, and TLS."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fermi.grpc_server import fermi_pb2 as pb
from fermi.grpc_server import fermi_pb2_grpc as pb_grpc
from fermi.grpc_server.server import GrpcServer
from fermi.runtime import Runtime
from fermi.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = [("grpc.enable_http_proxy", 0)]
ALICE = (("authorization", "Bearer alice-key"),)
BOB = (("authorization", "Bearer bob-key"),)
UNCLAIMED_TTL_S = 1.0
WAIT_S = 30


@pytest.fixture(scope="module")
def settings(tiny_artifact) -> Settings:
    return Settings(
        model=str(tiny_artifact),
        device="cpu",
        api_key="alice-key,bob-key",
        session_unclaimed_ttl_s=UNCLAIMED_TTL_S,
    )


@pytest.fixture(scope="module")
def runtime(settings):
    return Runtime.load(settings)


def start(settings: Settings, runtime) -> tuple[GrpcServer, int]:
    server = GrpcServer(settings, load=lambda s: runtime)
    port = server.start("127.0.0.1", 0)
    deadline = time.monotonic() + WAIT_S
    while server.servicer.runtime is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return server, port


@pytest.fixture(scope="module")
def address(settings, runtime):
    server, port = start(settings, runtime)
    yield f"127.0.0.1:{port}"
    server.stop(grace=0)


@pytest.fixture(scope="module")
def channel(address):
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.FermiStub(channel)


def generate(stub, metadata=ALICE, prompt="Remember: the code is 4711.", **fields):
    request = pb.GenerateRequest(
        prompt=prompt,
        max_new_tokens=fields.pop("max_new_tokens", 3),
        sampling=pb.Sampling(temperature=0.0),
        thinking=pb.THINKING_OFF,
        ignore_eos=True,
        **fields,
    )
    return list(stub.Generate(request, metadata=metadata, timeout=60))[-1]


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_calls_need_a_known_key(stub):
    calls = {
        "Generate": lambda md: generate(stub, md),
        "ListModels": lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md),
        "GetStats": lambda md: stub.GetStats(pb.GetStatsRequest(), metadata=md),
        "ResetSession": lambda md: stub.ResetSession(
            pb.ResetSessionRequest(session_id="x"), metadata=md
        ),
    }
    for name, call in calls.items():
        for metadata in (
            (),
            (("authorization", "Bearer nope"),),
            (("authorization", "alice-key"),),
        ):
            error = rpc_error(lambda call=call, md=metadata: call(md))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name
    assert stub.ListModels(pb.ListModelsRequest(), metadata=BOB).models


def test_health_and_reflection_stay_open(channel):
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="fermi.Fermi"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answer = next(reflection.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in answer.list_services_response.service}
    assert "fermi.Fermi" in names


def test_another_key_cannot_continue_read_or_reset_a_session(stub):
    first = generate(stub, ALICE, session_id="notes")
    assert first.usage.cached_tokens == 0
    again = generate(stub, ALICE, prompt="And what was it?", session_id="notes")
    assert again.usage.cached_tokens > 0  # alice continues her own conversation
    theirs = generate(stub, BOB, prompt="And what was it?", session_id="notes")
    assert theirs.usage.cached_tokens == 0  # bob's "notes" is a new session of his own
    assert theirs.usage.prompt_tokens < again.usage.prompt_tokens  # without alice's history
    error = rpc_error(
        lambda: stub.ResetSession(pb.ResetSessionRequest(session_id="notes2"), metadata=BOB)
    )
    missing = error
    generate(stub, ALICE, session_id="notes2")
    error = rpc_error(
        lambda: stub.ResetSession(pb.ResetSessionRequest(session_id="notes2"), metadata=BOB)
    )
    assert error.code() == missing.code() == grpc.StatusCode.NOT_FOUND
    stub.ResetSession(pb.ResetSessionRequest(session_id="notes2"), metadata=ALICE)


@pytest.mark.parametrize("session_id", ["x" * 129, "with space", "é"])
def test_session_ids_have_the_same_bound_as_http(stub, session_id):
    error = rpc_error(lambda: generate(stub, session_id=session_id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in error.details()
    error = rpc_error(
        lambda: stub.ResetSession(pb.ResetSessionRequest(session_id=session_id), metadata=ALICE)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_refused_call_creates_no_session(stub):
    error = rpc_error(lambda: generate(stub, session_id="refused", max_new_tokens=100_000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(
        lambda: stub.ResetSession(pb.ResetSessionRequest(session_id="refused"), metadata=ALICE)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_minted_sessions_expire_unless_their_id_comes_back(stub, runtime):
    dropped = generate(stub)  # no session_id: the server mints one
    kept = generate(stub)
    assert len(dropped.session_id) == 22 and dropped.session_id != kept.session_id
    generate(stub, prompt="Go on.", session_id=kept.session_id)  # claimed now
    store = runtime.sessions
    deadline = time.monotonic() + WAIT_S
    while store.has(dropped.session_id, "key-" + _tenant_hash("alice-key")):
        assert time.monotonic() < deadline, "the unclaimed session never expired"
        time.sleep(0.05)
    follow_up = generate(stub, prompt="More.", session_id=kept.session_id)
    assert follow_up.usage.cached_tokens > 0  # the claimed one lives on (the normal TTL)


def _tenant_hash(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:12]


def test_session_ids_are_truncated_in_logs(stub, caplog):
    session_id = "s" * 40 + "-secret-tail"
    with caplog.at_level(logging.INFO, logger="fermi.grpc"):
        generate(stub, session_id=session_id)
    assert "sssssss" in caplog.text and session_id not in caplog.text
    assert "secret-tail" not in caplog.text


def raw_generate(channel, payload: bytes, metadata=ALICE):
    call = channel.unary_stream("/fermi.Fermi/Generate")  # bytes in, bytes out
    return list(call(payload, metadata=metadata, timeout=30))


def test_undecodable_requests_are_invalid_argument(channel, stub):
    invalid_utf8_prompt = b"\x12\x02\xff\xfe"  # field 2 (prompt), 2 bytes, not UTF-8
    truncated = b"\x12\x10abc"  # says 16 bytes, has 3
    bad_tag = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    for payload in (invalid_utf8_prompt, truncated, bad_tag):
        error = rpc_error(lambda p=payload: raw_generate(channel, p))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, payload
    # without a key, the key is checked first
    error = rpc_error(lambda: raw_generate(channel, truncated, metadata=()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ListModels(pb.ListModelsRequest(), metadata=ALICE).models


def test_random_bytes_never_crash_the_server(channel, stub):
    rng = random.Random(16)
    codes = {}
    for _ in range(200):
        payload = rng.randbytes(rng.randrange(0, 64))
        try:
            raw_generate(channel, payload)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        codes[code] = codes.get(code, 0) + 1
    assert set(codes) <= {
        grpc.StatusCode.OK,  # bytes that happen to decode to a valid request
        grpc.StatusCode.INVALID_ARGUMENT,
    }, codes
    assert stub.ListModels(pb.ListModelsRequest(), metadata=ALICE).models
    print(f"\nrandom gRPC bytes: 200 cases, {dict((c.name, n) for c, n in codes.items())}")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with openssl."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls(settings, runtime, certificate):
    cert, key = certificate
    tls = settings.replace(grpc_tls_cert=str(cert), grpc_tls_key=str(key))
    server, port = start(tls, runtime)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=OPTIONS) as channel:
            stub = pb_grpc.FermiStub(channel)
            assert generate(stub).finish_reason == pb.FINISH_REASON_LENGTH
            error = rpc_error(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # TLS does not replace keys
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as plain:
            error = rpc_error(
                lambda: pb_grpc.FermiStub(plain).ListModels(
                    pb.ListModelsRequest(), metadata=ALICE, timeout=5
                )
            )
            assert error.code() == grpc.StatusCode.UNAVAILABLE  # a plaintext client is refused
    finally:
        server.stop(grace=0)


def test_tls_needs_both_files(settings, certificate, tmp_path):
    from fermi.errors import InvalidRequest

    cert, _ = certificate
    with pytest.raises(InvalidRequest, match="both"):
        GrpcServer(settings.replace(grpc_tls_cert=str(cert)))
    with pytest.raises(InvalidRequest, match="cannot read"):
        GrpcServer(settings.replace(grpc_tls_cert=str(cert), grpc_tls_key=str(tmp_path / "no")))


@pytest.mark.parametrize("kind", ["grpc", "openai"])
def test_cli_warns_beyond_loopback_without_a_key(kind, tiny_artifact, certificate, tmp_path):
    """`fermi serve` on an address beyond loopback without a key warns on stderr before
    binding; 192.0.2.1 (TEST-NET) cannot be bound, so it then exits 2 with a one-line error and
    no traffic ever leaves the machine. The gRPC run also takes the TLS flags."""
    cert, key = certificate
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
    env["PYTHONPATH"] = str(ROOT)
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)] if kind == "grpc" else []
    done = subprocess.run(
        [sys.executable, "-m", "fermi.cli", "serve", kind, "--model", str(tiny_artifact),
         "--host", "192.0.2.1", "--port", "9", *tls],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if "INFO" not in line]
    assert lines[0].startswith("warning: listening on 192.0.2.1 without an API key")
    assert lines[-1].startswith("error: cannot listen on 192.0.2.1:9")
    assert "Traceback" not in done.stderr
    with_key = subprocess.run(
        [sys.executable, "-m", "fermi.cli", "serve", kind, "--model", str(tiny_artifact),
         "--host", "192.0.2.1", "--port", "9"],
        env={**env, "FERMI_API_KEY": "k"}, cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert with_key.returncode == 2 and "warning:" not in with_key.stderr


def test_cli_tls_with_key_and_certificate_swapped(tiny_artifact, certificate, tmp_path):
    """Swapped (or unrelated) TLS files are named as such at once, not as a failed bind."""
    cert, key = certificate
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "fermi.cli", "serve", "grpc", "--model", str(tiny_artifact),
         "--port", "0", "--tls-cert", str(key), "--tls-key", str(cert)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if "INFO" not in line]
    assert lines == [lines[-1]] and lines[-1].startswith(
        "error: TLS certificate and key do not match (or are not PEM)"
    ), done.stderr


def test_cli_tls_ready_line_says_grpcs(tiny_artifact, certificate, tmp_path):
    """The ready line of a TLS server gives a grpcs:// address."""
    import json
    import time

    from fermi.openai_server.loadtest import free_port, stop_process

    cert, key = certificate
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
    env["PYTHONPATH"] = str(ROOT)
    port = free_port()
    log = tmp_path / "grpc.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fermi.cli", "serve", "grpc", "--model", str(tiny_artifact),
             "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key),
             "--log-format", "json"],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        ready = []
        while not ready and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            for line in log.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "ready":
                    ready.append(json.loads(line))
        assert ready, log.read_text()
        assert ready[0]["address"] == f"grpcs://127.0.0.1:{port}"
    finally:
        stop_process(process, 30)
