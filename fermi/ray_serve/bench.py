"""Benchmark of `fermi serve ray`: aggregate completion tok/s and TTFT with 1 and 2 replicas at
several stream counts (fermi.openai_server.loadtest's clients), next to one `fermi serve openai`
process, and the routing overhead per request (GET /v1/models and a 1-token chat, sequential,
through Ray and direct).

    python -m fermi.ray_serve.bench --model smollm2-135m --replicas 1,2 --concurrency 1,4,16

Every server runs on 127.0.0.1 and is stopped at the end; the local Ray instance gets
--num-cpus CPUs and each replica one onnxruntime thread per CPU it reserves."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from fermi.openai_server.loadtest import Server, benchmark, free_port, report, serve, stop_process

READY_LINE = "fermi: Ray Serve application"  # printed once every replica is ready


@contextmanager
def serve_ray(
    model: str,
    env: dict[str, str] | None = None,
    replicas: int | None = 2,
    num_cpus: int = 2,
    timeout: float = 300.0,
    args: tuple[str, ...] = (),
) -> Iterator[Server]:
    """`fermi serve ray` in a subprocess on 127.0.0.1 with a fixed replica count (None: give
    --min-replicas/--max-replicas in `args`), yielded once the application is ready; SIGTERM on
    exit (the command takes its application and Ray instance down), SIGKILL if that takes over
    a minute."""
    port = free_port()
    count = ("--replicas", str(replicas)) if replicas is not None else ()
    command = [sys.executable, "-m", "fermi.cli", "serve", "ray", "--model", model,
               "--host", "127.0.0.1", "--port", str(port), *count,
               "--num-cpus", str(num_cpus), *args]  # fmt: skip
    log = Path(tempfile.mkstemp(prefix="fermi-ray-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + timeout
        while READY_LINE not in log.read_text(errors="replace"):
            if process.poll() is not None:
                raise RuntimeError(f"fermi serve ray exited:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout:.0f}s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        stop_process(process, 60)  # Ray's shutdown takes longer than one server's
        log.unlink(missing_ok=True)


def overhead_ms(url: str, requests: int) -> dict[str, float]:
    """Median milliseconds of `requests` sequential GET /v1/models and 1-token chats."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "thinking": "off"}
    times: dict[str, list[float]] = {"models_ms": [], "chat_1_token_ms": []}
    with httpx.Client(base_url=url, timeout=60) as client:
        client.get("/v1/models")
        for _ in range(requests):
            start = time.perf_counter()
            client.get("/v1/models").raise_for_status()
            times["models_ms"].append(time.perf_counter() - start)
            start = time.perf_counter()
            client.post("/v1/chat/completions", json=chat).raise_for_status()
            times["chat_1_token_ms"].append(time.perf_counter() - start)
    return {name: round(statistics.median(t) * 1000, 2) for name, t in times.items()}


def measure(name: str, url: str, args) -> tuple[list[dict], dict]:
    levels = [int(n) for n in args.concurrency.split(",")]
    results = benchmark(url, levels, args.requests, args.max_tokens, args.prompt)
    rows = [{"server": name, **r.summary()} for r in results]
    return rows, {"server": name, **overhead_ms(url, args.overhead_requests)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--replicas", default="1,2", help="comma list of replica counts")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    parser.add_argument("--overhead-requests", type=int, default=50)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per server")
    args = parser.parse_args(argv)
    env = {"FERMI_MAX_QUEUE": "256", "FERMI_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    rows, overheads = [], []
    with serve(args.model, env=env) as direct:
        level_rows, overhead = measure("fermi serve openai", direct.url, args)
        rows += level_rows
        overheads.append(overhead)
    for replicas in [int(n) for n in args.replicas.split(",")]:
        with serve_ray(args.model, env, replicas, args.num_cpus) as ray_server:
            level_rows, overhead = measure(f"fermi serve ray, {replicas} replica(s)",
                                           ray_server.url, args)  # fmt: skip
            rows += level_rows
            overheads.append(overhead)
    report(rows, {"server": "server", "concurrency": "streams", "requests": "requests",
                  "errors": "errors", "completion_tokens_per_s": "completion tok/s",
                  "ttft_p50_ms": "TTFT p50 ms", "ttft_p95_ms": "TTFT p95 ms"}, None)  # fmt: skip
    print()
    report(overheads, {"server": "server", "models_ms": "GET /v1/models ms (median)",
                       "chat_1_token_ms": "1-token chat ms (median)"}, None)  # fmt: skip


if __name__ == "__main__":
    main()
