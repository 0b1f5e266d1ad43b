"""Serving under concurrency, side by side in one run: `fermi serve openai` against llama.cpp's
`llama-server -np N` (built natively, fermi.bench.llama_cpp) on the same model at the same bits,
N concurrent streaming chat clients, each sending requests back to back:

    python -m fermi.bench.serving --model smollm2-135m --pairs fp32:F32,int4:Q4_0 \\
        --concurrency 1,4,8,16 --max-tokens 64 --out bench-results/serving

For every pair (fermi precision : llama.cpp GGUF type) and every concurrency N, each server is
started fresh on 127.0.0.1 sized for N: fermi with FERMI_ENGINE_POOL=N (running sequences),
llama-server with N slots (`-np N`, continuous batching, `-c` N times `--context` tokens).
Every request is the same chat message, greedy (temperature 0), `ignore_eos`, exactly
`max_tokens` completion tokens, usage in the stream. Reported per level: aggregate completion
tokens/s (all usage tokens over the level's wall time) and time to first token p50/p95 (to
the first chunk with text, as the client sees it). Both engines run with their default
threading (fermi's threads wait passively, llama.cpp's OpenMP threads spin), as users run them.

Writes OUT/serving.json (every level's figures, machine, date, command) and OUT/serving.md
(the table); `--docs FILE` also replaces the block between the serving markers in FILE."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fermi.bench import llama_cpp, machine

DOCS_BEGIN = "<!-- fermi-bench:serving:begin -->"
DOCS_END = "<!-- fermi-bench:serving:end -->"
PROMPT = "Write a short story about a lighthouse keeper."


@dataclass(frozen=True)
class Pair:
    """fermi at `precision` against llama.cpp at GGUF type `kind` (the same bits)."""

    precision: str
    kind: str

    @property
    def label(self) -> str:
        return f"fermi {self.precision} / llama.cpp {self.kind}"


def parse_pairs(text: str) -> list[Pair]:
    """`fp32:F32,int4:Q4_0` -> pairs. Raises ValueError on a malformed item."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        precision, sep, kind = item.partition(":")
        if not sep or not precision or not kind:
            raise ValueError(f"--pairs takes PRECISION:GGUF_TYPE items (fp32:F32), not {item!r}")
        pairs.append(Pair(precision.lower(), kind.upper()))
    return pairs


def request_body(prompt: str, max_tokens: int) -> dict:
    """The chat request both servers get: greedy, exactly `max_tokens` tokens, usage in the
    stream."""
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


# -- model files ---------------------------------------------------------------------------------


def prepare(model: str, pairs: list[Pair], cache: Path, threads: int) -> dict[Pair, tuple]:
    """Per pair: (fermi artifact, llama.cpp GGUF), exported / converted once into `cache`.
    The llama.cpp F32 file is the checkpoint converted, or a GGUF source dequantized, so both
    engines start from the same weights."""
    from export.exporter import export_model
    from export.source import resolve
    from fermi.settings import load_settings

    source = resolve(model, None, load_settings())
    bin_dir = llama_cpp.build_llama_cpp()
    f32 = cache / "llama.cpp" / "model-F32.gguf"
    if source.gguf_file:
        llama_cpp.f32_from_gguf(source.gguf_file, f32)
    else:
        llama_cpp.f32_from_checkpoint(bin_dir, source.directory, f32)
    files = {}
    for pair in pairs:
        artifact = export_model(
            model, precision=pair.precision, target="cpu", output=cache / f"fermi-{pair.precision}"
        )
        files[pair] = (artifact, llama_cpp.quantized(bin_dir, f32, pair.kind, threads))
    return files


# -- servers -------------------------------------------------------------------------------------


@contextmanager
def fermi_server(artifact: Path, concurrency: int, threads: int) -> Iterator[str]:
    """`fermi serve openai` with an engine pool of `concurrency`; yields its URL."""
    from fermi.openai_server.loadtest import serve

    env = {
        "FERMI_ENGINE_POOL": str(concurrency),
        "FERMI_MAX_QUEUE": str(max(64, 4 * concurrency)),
        "FERMI_THREADS": str(threads),
    }
    with serve(str(artifact), env=env, timeout=600) as server:
        yield server.url


@contextmanager
def llama_server(gguf: Path, concurrency: int, threads: int, context: int) -> Iterator[str]:
    """llama-server with `concurrency` slots on a free port; yields its URL once /health is
    200; stopped on exit."""
    from fermi.openai_server.loadtest import free_port, stop_process

    bin_dir = llama_cpp.build_llama_cpp()
    port = free_port()
    command = llama_cpp.server_command(bin_dir, gguf, port, concurrency, context, threads)
    log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log, 600)
        yield url
    finally:
        stop_process(process)
        log.unlink(missing_ok=True)


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until GET /health answers 200; RuntimeError with the log's tail when the process exits
    or `timeout` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{process.args[0]} exited ({process.returncode}):\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not healthy after {timeout:.0f}s")


# -- clients -------------------------------------------------------------------------------------


async def run_level(url: str, concurrency: int, requests: int, body: dict):
    """`concurrency` clients, each sending `requests` streaming requests back to back: a
    fermi.openai_server.loadtest.LevelResult (wall time, usage tokens, TTFTs, errors)."""
    import httpx

    from fermi.openai_server.loadtest import LevelResult, stream_once

    result = LevelResult(concurrency, 0, 0, 0.0, 0)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in range(requests):
            try:
                ttft, tokens = await stream_once(client, url, body)
            except (httpx.HTTPError, RuntimeError) as e:
                result.errors += 1
                log(f"request failed: {type(e).__name__}: {e}")
                continue
            result.requests += 1
            result.completion_tokens += tokens
            if ttft is not None:
                result.ttft_s.append(ttft)

    # A new connection per request, for both servers: llama-server may close a kept-alive
    # connection between two requests, which httpx reports as a failed request.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result


def measure(url: str, concurrency: int, requests: int, body: dict) -> dict:
    """One warm-up round (`concurrency` requests of 4 tokens at once: fermi's KV pool grows to
    that many rows on its first burst, where llama-server allocates its slots at start), then
    the level; its summary (loadtest.LevelResult.summary)."""
    asyncio.run(run_level(url, concurrency, 1, body | {"max_tokens": 4}))
    return asyncio.run(run_level(url, concurrency, requests, body)).summary()


def run(args: argparse.Namespace) -> dict:
    """Every pair, level and engine, servers started fresh per level; the results dict."""
    pairs = parse_pairs(args.pairs)
    cache = args.cache or llama_cpp.cache_root() / "serving" / re.sub(r"\W+", "-", args.model)
    files = prepare(args.model, pairs, cache, args.threads)
    body = request_body(args.prompt, args.max_tokens)
    context = args.context
    results = {
        "schema": 1,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": args.command,
        "machine": machine.describe(),
        "model": args.model,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "threads": args.threads,
        "rows": [],
    }
    for pair in pairs:
        artifact, gguf = files[pair]
        for concurrency in args.concurrency:
            servers = {
                "fermi": lambda n=concurrency, a=artifact: fermi_server(a, n, args.threads),
                "llama.cpp": lambda n=concurrency, g=gguf: llama_server(
                    g, n, args.threads, context
                ),
            }
            for engine, start in servers.items():
                log(f"{pair.label}: {engine}, {concurrency} streams")
                load_average = os.getloadavg()[0]
                with start() as url:
                    stalls = machine.StallMeter()
                    summary = measure(url, concurrency, args.requests, body)
                    stall = stalls.share()
                row = {"pair": pair.label, "precision": pair.precision, "kind": pair.kind,
                       "engine": engine, **summary, "cpu_stall_share": stall,
                       "load_average": load_average}  # fmt: skip
                results["rows"].append(row)
                log(json.dumps(row))
    return results


def log(message: str) -> None:
    print(f"[serving] {message}", file=sys.stderr, flush=True)


# -- report --------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    """One table per pair: per concurrency, each engine's aggregate tokens/s and TTFT p50/p95,
    and fermi's tokens/s over llama.cpp's (the ratio is what compares: same run, same
    machine)."""
    m = results["machine"]
    lines = [
        f"**{results['model']}**, {results['date']}  ",
        f"{m['cpu']}, {m['logical_cores']} cores, {m['memory_gb']} GB; {results['threads']} "
        f"threads per server; {results['max_tokens']} tokens per streamed request (greedy, "
        f"ignore_eos), {results['requests_per_client']} requests per client back to back.",
        "",
    ]
    for pair in dict.fromkeys(row["pair"] for row in results["rows"]):
        rows = [row for row in results["rows"] if row["pair"] == pair]
        fermi_name, llama_name = pair.split(" / ")
        lines += [
            f"| streams | {fermi_name}: tok/s | TTFT p50 / p95 ms | CPU stall "
            f"| {llama_name}: tok/s | TTFT p50 / p95 ms | CPU stall | fermi / llama.cpp tok/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for level in dict.fromkeys(row["concurrency"] for row in rows):
            by_engine = {row["engine"]: row for row in rows if row["concurrency"] == level}
            fermi, llama = by_engine.get("fermi"), by_engine.get("llama.cpp")
            ratio = (
                f"{fermi['completion_tokens_per_s'] / llama['completion_tokens_per_s']:.2f}"
                if fermi and llama and llama["completion_tokens_per_s"]
                else "–"
            )
            lines.append(f"| {level} | {_cells(fermi)} | {_cells(llama)} | {ratio} |")
        lines.append("")
    errors = sum(row["errors"] for row in results["rows"])
    lines.append(
        f"Errors: {errors}. CPU stall: share of the level's wall time in which some runnable "
        "task waited for a CPU (/proc/pressure/cpu): the server's own threads beyond the cores "
        "and any other work on the machine; near 0% on a quiet machine."
    )
    return "\n".join(lines) + "\n"


def _cells(row: dict | None) -> str:
    if not row:
        return "– | – | –"
    stall = row.get("cpu_stall_share")
    return (
        f"{row['completion_tokens_per_s']:.1f} | "
        f"{row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f}"
        + (f" ({row['errors']} errors)" if row["errors"] else "")
        + (f" | {stall:.0%}" if stall is not None else " | –")
    )


def update_docs(path: Path, table: str, command: str) -> None:
    """Replace the block between the serving markers of `path` with this run's table. Raises
    ValueError when the markers are missing."""
    text = path.read_text()
    block = f"{DOCS_BEGIN}\nProduced by:\n\n```\n{command}\n```\n\n{table}{DOCS_END}"
    pattern = re.compile(re.escape(DOCS_BEGIN) + ".*?" + re.escape(DOCS_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {DOCS_BEGIN} ... {DOCS_END} block to replace")
    path.write_text(pattern.sub(lambda _: block, text))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fermi.bench.serving", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, checkpoint, GGUF")
    parser.add_argument("--pairs", default="fp32:F32,int4:Q4_0", help="PRECISION:GGUF_TYPE,...")
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma list of stream counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="per client, back to back")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="per server")
    parser.add_argument("--context", type=int, default=512, help="llama-server tokens per slot")
    parser.add_argument("--cache", type=Path, help="exports and GGUFs (default: fermi cache)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/serving"))
    parser.add_argument("--docs", type=Path, help="replace this file's serving block")
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(n) for n in args.concurrency.split(",") if n.strip()]
        parse_pairs(args.pairs)
    except ValueError as e:
        parser.error(str(e))
    if not args.concurrency or min(args.concurrency) < 1 or args.max_tokens < 1:
        parser.error("--concurrency and --max-tokens take positive integers")
    args.command = shlex.join(["python", "-m", "fermi.bench.serving", *(argv or sys.argv[1:])])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    table = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "serving.md").write_text(table)
    if args.docs:
        update_docs(args.docs, table, args.command)
    print(table)


if __name__ == "__main__":
    main()
