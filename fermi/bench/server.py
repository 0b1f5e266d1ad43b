"""fermi's OpenAI server under 1, 4, 16 ... concurrent streaming clients: aggregate completion
tokens/s and time to first token. The server runs as a subprocess
(`fermi.openai_server.loadtest.serve`); every request asks for exactly `server_tokens` tokens
(ignore_eos) and reports its usage in the stream.

TTFT is the time to the first chunk that carries text, as a client sees it. A model whose
tokens decode to no text (random weights over a vocabulary larger than their tokenizer's) may
send its first text only with the last chunk, or never: such streams are counted apart and
left out of the TTFT percentiles, which are then marked as not measurable."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fermi.bench.config import BenchConfig
from fermi.bench.stats import percentile, summarize


@dataclass
class Stream:
    ttft_s: float | None  # None: no text arrived before the final chunk
    completion_tokens: int


async def _stream(client, url: str, body: dict) -> Stream:
    from fermi.openai_server.loadtest import stream_once

    return Stream(*await stream_once(client, url, body))


async def _level(url: str, clients: int, body: dict) -> tuple[float, list[Stream], int]:
    """`clients` simultaneous streams: (seconds until all finished, streams, errors)."""
    import httpx

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        outcomes = await asyncio.gather(
            *(_stream(client, url, body) for _ in range(clients)), return_exceptions=True
        )
        seconds = time.perf_counter() - start
    streams = [o for o in outcomes if isinstance(o, Stream)]
    return seconds, streams, len(outcomes) - len(streams)


def _request(config: BenchConfig, max_tokens: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": " ".join(["benchmark"] * config.server_prompt_words)}
        ],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "thinking": "off",
        "temperature": 0,
        "seed": config.seed,
    }


def measure(artifact: Path, config: BenchConfig, log_dir: Path) -> dict:
    from fermi.openai_server.loadtest import serve
    from fermi.settings import load_settings

    env = {
        "FERMI_MAX_QUEUE": str(max(64, *config.concurrency)),
        "FERMI_THREADS": str(config.threads),
    }
    body = _request(config, config.server_tokens)
    levels = []
    with serve(str(artifact), env=env, timeout=1800) as server:
        asyncio.run(_level(server.url, 1, _request(config, 4)))  # warm-up
        for clients in config.concurrency:
            runs = [asyncio.run(_level(server.url, clients, body)) for _ in range(config.reps)]
            levels.append(_summarize_level(clients, runs))
        peak = _peak_rss(server.process.pid)
        shutil.copyfile(server.log, log_dir / "fermi-openai-server.log")
    return {
        "engine": "fermi:fp32",
        "max_tokens": config.server_tokens,
        "engine_pool": load_settings().engine_pool,
        "levels": levels,
        "peak_rss_bytes": peak,
    }


def _summarize_level(clients: int, runs: list[tuple[float, list[Stream], int]]) -> dict:
    streams = [s for _, run, _ in runs for s in run]
    ttfts = [s.ttft_s for s in streams if s.ttft_s is not None]
    rates = [sum(s.completion_tokens for s in run) / seconds for seconds, run, _ in runs]
    return {
        "concurrency": clients,
        "requests": len(streams),
        "errors": sum(errors for _, _, errors in runs),
        "tokens_per_s": summarize(rates),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "streams_without_text": len(streams) - len(ttfts),
    }


def _peak_rss(pid: int) -> int | None:
    status = Path(f"/proc/{pid}/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None
