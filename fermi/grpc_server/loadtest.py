"""Streaming load test, gRPC against the OpenAI HTTP server on the same model and generation:
N concurrent clients, each sending requests back to back; reports time to first token and
completion tokens/s (aggregate, and per stream after its first token).

    python -m fermi.grpc_server.loadtest --model ARTIFACT            # starts each server in turn
    python -m fermi.grpc_server.loadtest --grpc 127.0.0.1:50051 [--http http://127.0.0.1:8000]

Every request decodes exactly --max-tokens tokens (ignore_eos, thinking off) from the same
prompt with a fresh session, so the transports do the same work. The servers run one at a time,
so they never compete for cores. The HTTP side reuses fermi.openai_server.loadtest."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fermi.grpc_server import fermi_pb2 as pb
from fermi.grpc_server import fermi_pb2_grpc as pb_grpc

OPTIONS = [("grpc.enable_http_proxy", 0)]


@dataclass
class Level:
    transport: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    completion_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    stream_tokens_per_s: list[float] = field(default_factory=list)  # after the first token

    def row(self) -> dict:
        def ms(q: int) -> float:
            if len(self.ttft_s) < 2:
                return round(self.ttft_s[0] * 1000, 1) if self.ttft_s else float("nan")
            return round(statistics.quantiles(self.ttft_s, n=100)[q - 1] * 1000, 1)

        per_stream = self.stream_tokens_per_s
        return {
            "transport": self.transport,
            "clients": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "ttft_p50_ms": ms(50),
            "ttft_p95_ms": ms(95),
            "tokens_per_s": round(self.completion_tokens / self.seconds, 1),
            "stream_tokens_per_s": round(statistics.median(per_stream), 1) if per_stream else "n/a",
        }


# -- gRPC ------------------------------------------------------------------------------------


async def grpc_stream(stub, request: pb.GenerateRequest) -> tuple[float, float, int]:
    """One Generate stream: (time to first text, tokens/s after it, completion tokens)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async for message in stub.Generate(request, timeout=600):
        if first is None and message.token:
            first = time.perf_counter()
        if message.HasField("usage"):
            tokens = message.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    rate = (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0
    return first - start, rate, tokens


async def grpc_level(address: str, clients: int, per_client: int, request) -> Level:
    level = Level("gRPC", clients)

    async def client() -> None:
        async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
            stub = pb_grpc.FermiStub(channel)
            for _ in range(per_client):
                try:
                    ttft, rate, tokens = await grpc_stream(stub, request)
                except grpc.aio.AioRpcError:
                    level.errors += 1
                    continue
                level.requests += 1
                level.completion_tokens += tokens
                level.ttft_s.append(ttft)
                level.stream_tokens_per_s.append(rate)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    level.seconds = time.perf_counter() - start
    return level


def grpc_benchmark(address: str, levels: list[int], per_client: int, max_tokens: int,
                   prompt: str) -> list[Level]:  # fmt: skip
    request = pb.GenerateRequest(
        prompt=prompt, max_new_tokens=max_tokens, ignore_eos=True, thinking=pb.THINKING_OFF
    )
    asyncio.run(grpc_level(address, 1, 1, request))  # warm-up
    return [asyncio.run(grpc_level(address, n, per_client, request)) for n in levels]


@contextmanager
def serve_grpc(model: str, env: dict[str, str], timeout: float = 300.0) -> Iterator[str]:
    """`fermi serve grpc` in a subprocess on 127.0.0.1; yields its address once SERVING."""
    from fermi.openai_server.loadtest import free_port, stop_process

    port = free_port()
    command = [sys.executable, "-m", "fermi.cli", "serve", "grpc", "--model", model,
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = Path(tempfile.mkstemp(prefix="fermi-grpc-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
    address = f"127.0.0.1:{port}"
    try:
        _wait_serving(address, process, log, timeout)
        yield address
    finally:
        stop_process(process)


def _wait_serving(address: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the gRPC server exited:\n{log.read_text()[-4000:]}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the gRPC server was not SERVING after {timeout:.0f}s")


# -- HTTP (the OpenAI server's own load test) --------------------------------------------------


def http_benchmark(url: str, levels: list[int], per_client: int, max_tokens: int,
                   prompt: str) -> list[Level]:  # fmt: skip
    from fermi.openai_server.loadtest import benchmark

    out = []
    for r in benchmark(url, levels, per_client, max_tokens, prompt):
        out.append(Level("HTTP (SSE)", r.concurrency, r.requests, r.errors, r.seconds,
                         r.completion_tokens, r.ttft_s))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="start `fermi serve grpc|openai --model MODEL` in turn")
    parser.add_argument("--grpc", help="a running gRPC server, e.g. 127.0.0.1:50051")
    parser.add_argument("--http", help="a running OpenAI server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--no-http", action="store_true", help="gRPC only")
    parser.add_argument("--concurrency", default="1,8", help="comma list of client counts")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.model or args.grpc):
        parser.error("give --model, or --grpc (and --http) for running servers")
    levels = [int(n) for n in args.concurrency.split(",")]
    work = (levels, args.requests, args.max_tokens, args.prompt)
    env = {"FERMI_MAX_QUEUE": str(max(64, max(levels)))}

    results: list[Level] = []
    if args.grpc:
        results += grpc_benchmark(args.grpc, *work)
    else:
        with serve_grpc(args.model, env) as address:
            results += grpc_benchmark(address, *work)
    if args.http:
        results += http_benchmark(args.http.rstrip("/"), *work)
    elif args.model and not args.no_http:
        from fermi.openai_server.loadtest import serve

        with serve(args.model, env=env) as server:
            results += http_benchmark(server.url, *work)

    from fermi.openai_server.loadtest import report

    rows = [r.row() for r in results]
    report(rows, {key: key for key in rows[0]}, args.json)


if __name__ == "__main__":
    main()
