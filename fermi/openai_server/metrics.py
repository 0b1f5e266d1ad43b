"""Prometheus metrics of one server, in their own registry (GET /metrics renders it)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fermi.requests import Event, Finished, TextDelta, ToolCallDelta

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "fermi_http_requests", "HTTP requests by route and status", ["route", "status"],
            registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "fermi_prompt_tokens", "Prompt tokens of finished generations", registry=registry
        )
        self.cached_tokens = Counter(
            "fermi_cached_prompt_tokens", "Prompt tokens served from a session's KV cache",
            registry=registry,
        )  # fmt: skip
        self.completion_tokens = Counter(
            "fermi_completion_tokens", "Generated tokens of finished generations", registry=registry
        )
        self.generations = Counter(
            "fermi_generations", "Generations (each choice of a request, of each of its prompts)"
            " by outcome (stop, length, tool_calls, cancelled, disconnected: cancelled because "
            "the client went away, timeout, error)", ["outcome"], registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "fermi_time_to_first_token_seconds", "From submit to the first text",
            buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.itl = Histogram(
            "fermi_inter_token_latency_seconds", "Time per generated token after the first",
            buckets=ITL_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "fermi_queue_depth", "Requests waiting for an engine", registry=registry
        )
        self.running = Gauge("fermi_running", "Generations running now", registry=registry)
        self.active_sessions = Gauge(
            "fermi_active_sessions", "Sessions held by the runtime", registry=registry
        )
        self.kv_bytes = Gauge(
            "fermi_kv_cache_bytes",
            "KV memory: the running batch's (on the CPU, the positions its rows hold; on a GPU,"
            " its buffers) and the cached prefixes'",
            registry=registry,
        )
        self.loaded = Gauge("fermi_model_loaded", "1 once the model is loaded", registry=registry)

    def render(self, stats) -> bytes:
        """The text exposition; gauges are read from the runtime's stats (None while loading)."""
        if stats is not None:
            self.queue_depth.set(stats.queue_depth)
            self.running.set(stats.running)
            self.active_sessions.set(stats.active_sessions)
            self.kv_bytes.set(stats.kv_bytes)
        return generate_latest(self.registry)

    async def observe(
        self,
        events: AsyncIterator[Event],
        client_left: Callable[[], bool] = lambda: False,
        choices: int = 1,
    ) -> AsyncIterator[Event]:
        """Pass events through, timing first and later tokens and counting the outcome of each
        of the request's `choices` once (n per prompt: every choice is a generation): its
        finish reason, or "disconnected" for one cancelled because the client went away
        (`client_left()` true when it ends), or, for all of them, "error" when `events`
        raises."""
        last = start = time.perf_counter()
        first = True
        try:
            async for event in events:
                if isinstance(event, TextDelta | ToolCallDelta):
                    now = time.perf_counter()
                    if first:
                        self.ttft.observe(now - start)
                        first = False
                    else:
                        for _ in event.token_ids:  # a delta can hold several tokens
                            self.itl.observe((now - last) / len(event.token_ids))
                    last = now
                elif isinstance(event, Finished):
                    self.finished(event, client_left())
                yield event
        except Exception:
            self.generations.labels("error").inc(choices)
            raise

    def finished(self, finished: Finished, client_left: bool = False) -> None:
        """Count a request's tokens, and each of its choices by its finish reason ("cancelled"
        as "disconnected" when `client_left`)."""
        usage = finished.usage
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.completion_tokens.inc(usage.completion_tokens)
        for reason in finished.finish_reasons or [finished.finish_reason]:
            gone = reason == "cancelled" and client_left
            self.generations.labels("disconnected" if gone else reason).inc()
