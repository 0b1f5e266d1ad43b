"""OpenTelemetry tracing: one span per request with children for parse, queue, prefill, decode
and stream, on both transports.

Only opentelemetry-api is a base dependency: without a configured SDK every span is the API's
non-recording span and costs next to nothing. `setup()` installs the SDK (the `otel` extra:
opentelemetry-sdk + the OTLP/HTTP exporter) when the standard variables ask for export:
OTEL_TRACES_EXPORTER (`otlp`, `console` or `none`), OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; the exporter reads the other OTEL_EXPORTER_OTLP_* variables
(headers, protocol, timeout) and the resource OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES.

Attribute names follow OpenTelemetry's GenAI conventions (gen_ai.usage.input_tokens ...) where
they exist, and `fermi.*` otherwise (fermi.cached_tokens: prompt tokens reused from the KV
cache)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger("fermi.tracing")
tracer = trace.get_tracer("fermi")
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def exporter_name(environ: Mapping[str, str]) -> str | None:
    """The span exporter the environment asks for: otlp, console, or None (tracing off)."""
    name = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if name == "none":
        return None
    if name:
        return name.split(",")[0].strip()
    return "otlp" if any(environ.get(v) for v in ENDPOINT_VARS) else None


def setup(environ: Mapping[str, str] | None = None) -> bool:
    """Install the SDK's tracer provider with a batching exporter when the OTEL_* variables ask
    for one; returns whether it did. Without the SDK (no `otel` extra) it logs a warning once
    and tracing stays off."""
    environ = os.environ if environ is None else environ
    name = exporter_name(environ)
    if name is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_* asks for traces but opentelemetry-sdk is missing: pip install "
                    "'fermi[otel]'")  # fmt: skip
        return False
    exporter = _exporter(name, environ)
    if exporter is None:
        return False
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": "fermi"}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans with %s", type(exporter).__name__)
    return True


def _exporter(name: str, environ: Mapping[str, str]):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none)", name)
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("the OTLP exporter for %s is missing: pip install 'fermi[otel]'", protocol)
        return None
    return OTLPSpanExporter()


def shutdown() -> None:
    """Flush spans still batched (at server exit)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def start_request(name: str, headers: Mapping[str, str] | None, attributes: dict) -> trace.Span:
    """A request's root span (kind SERVER), child of the caller's W3C `traceparent` when its
    headers (or gRPC metadata) carry one, and never of an earlier request."""
    parent = propagate.extract(headers or {}, context=otel_context.Context())
    return tracer.start_span(name, parent, trace.SpanKind.SERVER, attributes=attributes)


def activate(span: trace.Span) -> object:
    """Make `span` current in this thread or task (so `child` and the runtime see it); returns
    the token for `deactivate`."""
    return otel_context.attach(trace.set_span_in_context(span))


def deactivate(token: object) -> None:
    otel_context.detach(token)


@contextmanager
def child(name: str, **attributes) -> Iterator[trace.Span]:
    """A child span of the current one around a block (parse, stream)."""
    with tracer.start_as_current_span(name, attributes=attributes or None) as span:
        yield span


class GenerationTrace:
    """The runtime's spans of one generation, parented explicitly on the span that was current
    when the request was submitted (the generation runs in another thread): queue, then prefill
    (from a free slot to the first sampled token), then decode (to the end)."""

    def __init__(self) -> None:
        self.parent = otel_context.get_current()
        self.span: trace.Span | None = None

    def _next(self, name: str, **attributes) -> None:
        self.end()
        self.span = tracer.start_span(name, self.parent, attributes=attributes or None)

    def queued(self) -> None:
        self._next("queue")

    def prefill(self, prompt_tokens: int, cached_tokens: int) -> None:
        self._next(
            "prefill",
            **{
                "gen_ai.usage.input_tokens": prompt_tokens,
                "fermi.cached_tokens": cached_tokens,
                "fermi.prefill_tokens": prompt_tokens - cached_tokens,
                "fermi.cache_hit": cached_tokens > 0,
            },
        )

    def decode(self) -> None:
        self._next("decode")

    def end(self, **attributes) -> None:
        if self.span is not None:
            if attributes:
                self.span.set_attributes(attributes)
            self.span.end()
            self.span = None
