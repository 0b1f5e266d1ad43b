"""Logging for the servers: plain text or one JSON object per line (`--log-format json`), the
ready line, and the access log (one record per request, the same fields on both transports)."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from fermi import tracing
from fermi.settings import Settings

access_log = logging.getLogger("fermi.access")
ready_log = logging.getLogger("fermi.ready")
PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...fields}: `fields` is the dict a caller passes
    as `extra={"fields": {...}}` (the access log's and the ready line's data)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(log_format: str) -> None:
    """Send INFO and above to stderr, as text or JSON; replaces any earlier configuration."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(PLAIN))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def log_ready(url: str, info, device: str, settings: Settings, warning: str | None = None) -> None:
    """The one line a server prints once it answers requests; `info` is a ModelInfo."""
    fields = {
        "event": "ready",
        "address": url,
        "model": info.id,
        "device": device,
        "precision": info.precision,
        "context_length": info.context_length,
        "max_num_seqs": settings.engine_pool,
        "max_queue": settings.max_queue,
    }
    text = (
        f"ready on {url}: model {info.id} on {device} ({info.precision}), context "
        f"{info.context_length} tokens, batch {settings.engine_pool} "
        f"(queue {settings.max_queue})"
    )
    if warning:
        fields["warning"] = warning
        text += f"; WARNING: {warning}"
    ready_log.log(logging.WARNING if warning else logging.INFO, text, extra={"fields": fields})


@dataclass
class AccessRecord:
    """One request, filled in as it runs; `emit` writes it. Times in seconds from `start`."""

    transport: str  # http | grpc
    method: str  # HTTP method, or "rpc"
    route: str  # the path, or /fermi.Fermi/Generate
    start: float = field(default_factory=time.perf_counter)
    status: int | str = 0  # HTTP status, or the gRPC code's name
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    ttft_s: float | None = None
    span: Any = None  # the request's root span (fermi.tracing.start_request): ended by emit
    emitted: bool = False

    def first_token(self, at: float | None = None) -> None:
        """The first token was generated `at` (time.perf_counter(); default: now)."""
        if self.ttft_s is None:
            self.ttft_s = (time.perf_counter() if at is None else at) - self.start

    def finished(self, finished) -> None:
        """Take the counts of the runtime's Finished event, and its first token's time when no
        text came before it (tokens that decoded to nothing yet still count)."""
        if finished.first_token_at is not None:
            self.first_token(finished.first_token_at)
        usage = finished.usage
        self.prompt_tokens = usage.prompt_tokens
        self.completion_tokens = usage.completion_tokens
        self.cached_tokens = usage.cached_tokens
        self.finish_reason = finished.finish_reason

    def emit(self) -> None:
        """Write the record once (later calls do nothing)."""
        if self.emitted:
            return
        self.emitted = True
        total = time.perf_counter() - self.start
        fields: dict[str, Any] = {
            "event": "access",
            "transport": self.transport,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "total_ms": round(total * 1000, 1),
        }
        text = f'{self.transport} "{self.method} {self.route}" {self.status}'
        if self.prompt_tokens is not None:
            fields.update(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                cached_tokens=self.cached_tokens,
                finish_reason=self.finish_reason,
            )
            text += (
                f" prompt={self.prompt_tokens} (cached {self.cached_tokens})"
                f" completion={self.completion_tokens} finish={self.finish_reason}"
            )
        if self.ttft_s is not None:
            fields["ttft_ms"] = round(self.ttft_s * 1000, 1)
            text += f" ttft={fields['ttft_ms']}ms"
        text += f" total={fields['total_ms']}ms"
        access_log.info(text, extra={"fields": fields})
        if self.span is not None:
            self._end_span(fields)

    def _end_span(self, fields: dict[str, Any]) -> None:
        key = "http.response.status_code" if self.transport == "http" else "rpc.grpc.status_code"
        self.span.set_attribute(key, self.status)
        if self.prompt_tokens is not None:
            self.span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": self.prompt_tokens,
                    "gen_ai.usage.output_tokens": self.completion_tokens or 0,
                    "fermi.cached_tokens": self.cached_tokens or 0,
                    "fermi.cache_hit": bool(self.cached_tokens),
                    "gen_ai.response.finish_reasons": [str(self.finish_reason)],
                }
            )
        if fields.get("ttft_ms") is not None:
            self.span.set_attribute("fermi.ttft_ms", fields["ttft_ms"])
        failed = (self.transport == "http" and int(self.status) >= 500) or self.status in (
            "INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"
        )  # fmt: skip
        if failed:
            self.span.set_status(tracing.trace.StatusCode.ERROR)
        self.span.end()
