"""Load test for the OpenAI server: N concurrent streaming chat clients, each sending requests
back to back; reports requests/s, aggregate completion tokens/s and time to first token.

    python -m fermi.openai_server.loadtest --model tiny-qwen3            # starts a server
    python -m fermi.openai_server.loadtest --url http://127.0.0.1:8000   # uses a running one

Every request decodes exactly --max-tokens tokens (ignore_eos), so runs are comparable."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FERMI_CLI = (sys.executable, "-m", "fermi.cli")


@contextmanager
def serve(
    model: str,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
    program: tuple[str, ...] = FERMI_CLI,
    port: int | None = None,
    args: tuple[str, ...] = (),
) -> Iterator[Server]:
    """`fermi serve openai` (or `program` with the same arguments) in a subprocess on
    127.0.0.1 with extra command-line `args`, yielded once /health answers 200; stopped on
    exit."""
    port = port or free_port()
    command = [*program, "serve", "openai", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
    log = Path(tempfile.mkstemp(prefix="fermi-openai-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_healthy(server, timeout)
        yield server
    finally:
        stop_process(process)
        log.unlink(missing_ok=True)


def stop_process(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s` seconds; waits for it."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the server exited ({server.process.returncode}):\n{server.log_tail()}"
            )
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy after {timeout:.0f}s:\n{server.log_tail()}")


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    completion_tokens: int
    ttft_s: list[float] = field(default_factory=list, repr=False)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    def ttft_percentile(self, q: float) -> float:
        if len(self.ttft_s) < 2:
            return self.ttft_s[0] if self.ttft_s else float("nan")
        return statistics.quantiles(self.ttft_s, n=100, method="inclusive")[int(q) - 1]

    def summary(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "ttft_s"}
        return data | {
            "requests_per_s": round(self.requests_per_s, 2),
            "completion_tokens_per_s": round(self.tokens_per_s, 1),
            "ttft_p50_ms": round(self.ttft_percentile(50) * 1000, 1),
            "ttft_p95_ms": round(self.ttft_percentile(95) * 1000, 1),
        }


async def stream_once(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float | None, int]:
    """One streaming chat request: (time to the first chunk with text, completion tokens from
    the usage). The time is None when no text came before the final chunk: a model whose tokens
    decode to nothing (random weights past their tokenizer's vocabulary) has no time to first
    text, and counting the whole stream as one would be wrong."""
    start = time.perf_counter()
    ttft = None
    tokens = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            delta = choice.get("delta", {})
            text = delta.get("content") or delta.get("reasoning_content")
            if ttft is None and text and not choice.get("finish_reason"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return ttft, tokens


async def run_level(
    url: str, concurrency: int, requests_per_client: int, max_tokens: int, prompt: str
) -> LevelResult:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "thinking": "off",
    }
    result = LevelResult(concurrency, 0, 0, 0.0, 0)
    limits = httpx.Limits(max_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in range(requests_per_client):
            try:
                ttft, tokens = await stream_once(client, url, body)
            except (httpx.HTTPError, RuntimeError):
                result.errors += 1
                continue
            result.requests += 1
            result.completion_tokens += tokens
            if ttft is not None:
                result.ttft_s.append(ttft)

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result


def benchmark(
    url: str, levels: list[int], requests_per_client: int, max_tokens: int, prompt: str
) -> list[LevelResult]:
    asyncio.run(run_level(url, 1, 1, max_tokens, prompt))  # warm-up
    return [asyncio.run(run_level(url, n, requests_per_client, max_tokens, prompt)) for n in levels]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", help="start `fermi serve openai --model MODEL` for the run")
    parser.add_argument("--concurrency", default="1,4,16", help="comma list of client counts")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.concurrency.split(",")]

    def run(url: str) -> list[LevelResult]:
        return benchmark(url, levels, args.requests, args.max_tokens, args.prompt)

    if args.url:
        results = run(args.url.rstrip("/"))
    else:
        with serve(args.model, env={"FERMI_MAX_QUEUE": str(max(64, max(levels)))}) as server:
            results = run(server.url)
    headers = {"concurrency": "clients", "requests": "requests", "errors": "errors",
               "requests_per_s": "req/s", "completion_tokens_per_s": "completion tok/s",
               "ttft_p50_ms": "TTFT p50 ms", "ttft_p95_ms": "TTFT p95 ms"}  # fmt: skip
    report([r.summary() for r in results], headers, args.json)


def report(rows: list[dict], headers: dict[str, str], json_path: Path | None) -> None:
    """Print `rows` as a markdown table (columns: `headers`, key -> title) and write them all
    as JSON to `json_path` when given."""
    print("| " + " | ".join(headers.values()) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in headers) + " |")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
