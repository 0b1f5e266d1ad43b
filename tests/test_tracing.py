"""OpenTelemetry tracing against live servers on 127.0.0.1: both transports in this process with
the SDK's InMemorySpanExporter (span tree, attributes, the caller's traceparent continued), and
`fermi serve openai` as a subprocess exporting over OTLP/HTTP to a collector stub, driven only by
the standard OTEL_* variables. Without them, the SDK is never imported."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fermi.grpc_server import fermi_pb2 as pb
from fermi.grpc_server import fermi_pb2_grpc as pb_grpc
from fermi.grpc_server.server import GrpcServer
from fermi.openai_server.loadtest import free_port, serve
from fermi.settings import Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
GRPC_TRACE_ID = "5bf92f3577b34da6a3ce929d0e0e4737"
GRPC_TRACEPARENT = f"00-{GRPC_TRACE_ID}-00f067aa0ba902b7-01"
USER = [{"role": "user", "content": "Hello there"}]
OPTIONS = [("grpc.enable_http_proxy", 0)]


def poll(predicate, what: str, limit: float = 60.0):
    deadline = time.monotonic() + limit
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def exporter():
    """The process's tracer provider records into memory (set once: OpenTelemetry allows one)."""
    memory = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.fixture(scope="module")
def runtime(tiny_artifact):
    from fermi.runtime import Runtime

    return Runtime.load(Settings(model=str(tiny_artifact), device="cpu"))


@pytest.fixture(scope="module")
def http_url(runtime):
    """The OpenAI app served in this process (its own event loop in a thread)."""
    from fermi.openai_server.server import create_app

    app = create_app(Settings(model="tiny-qwen3"), load=lambda settings: runtime)
    port = free_port()
    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), asyncio.Event()

    async def main() -> None:
        server = await app.create_server(
            host="127.0.0.1", port=port, return_asyncio_server=True, access_log=False
        )
        await server.startup()
        await server.before_start()
        await server.after_start()
        started.set()
        await stop.wait()
        await server.before_stop()
        await server.close()
        await server.after_stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(60)
    url = f"http://127.0.0.1:{port}"
    poll(lambda: httpx.get(url + "/health").status_code == 200, "the model to load")
    yield url
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


def spans_of(exporter, trace_id: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        if format(span.context.trace_id, "032x") == trace_id:
            found.setdefault(span.name, []).append(span)
    return found


def check_tree(spans: dict[str, list], root_name: str, children: set[str]) -> None:
    (root,) = spans[root_name]
    assert root.kind == trace.SpanKind.SERVER
    assert format(root.parent.span_id, "016x") == "00f067aa0ba902b7"  # the caller's span
    for name in children:
        (span,) = spans[name]
        assert span.parent.span_id == root.context.span_id, name
    queue, prefill, decode = (spans[n][0] for n in ("queue", "prefill", "decode"))
    assert queue.end_time <= prefill.start_time <= prefill.end_time <= decode.start_time


def test_http_spans_parse_queue_prefill_decode_stream(exporter, http_url):
    headers = {"traceparent": TRACEPARENT}
    body = {"messages": USER, "max_tokens": 4, "stream": True, "session_id": "traced"}
    assert httpx.post(http_url + "/v1/chat/completions", json=body, headers=headers).is_success
    root = "POST /v1/chat/completions"
    spans = poll(lambda: (s := spans_of(exporter, TRACE_ID)).get(root) and s, "the root span")
    check_tree(spans, root, {"parse", "queue", "prefill", "decode", "stream"})
    attributes = spans[root][0].attributes
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.route"] == "/v1/chat/completions"
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert 0 < attributes["gen_ai.usage.output_tokens"] <= 4
    prefill = spans["prefill"][0].attributes
    assert prefill["gen_ai.usage.input_tokens"] == attributes["gen_ai.usage.input_tokens"]
    assert prefill["fermi.cache_hit"] is False and prefill["fermi.cached_tokens"] == 0
    assert spans["decode"][0].attributes["gen_ai.usage.output_tokens"] > 0


def test_http_cache_hit_is_an_attribute(exporter, http_url):
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    headers = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    body = {"messages": USER, "max_tokens": 2, "session_id": "traced-twice"}
    url = http_url + "/v1/chat/completions"
    first = httpx.post(url, json=body).json()["choices"][0]["message"]["content"]
    again = [*USER, {"role": "assistant", "content": first}, {"role": "user", "content": "More"}]
    assert httpx.post(url, json={**body, "messages": again}, headers=headers).is_success
    spans = poll(lambda: (s := spans_of(exporter, trace_id)).get("prefill") and s, "prefill")
    prefill = spans["prefill"][0].attributes
    assert prefill["fermi.cache_hit"] is True and prefill["fermi.cached_tokens"] > 0
    assert prefill["fermi.prefill_tokens"] < prefill["gen_ai.usage.input_tokens"]
    (root,) = spans["POST /v1/chat/completions"]
    assert root.attributes["fermi.cached_tokens"] == prefill["fermi.cached_tokens"]


def test_grpc_spans_parse_queue_prefill_decode_stream(exporter, runtime):
    server = GrpcServer(Settings(model="tiny-qwen3"), load=lambda settings: runtime)
    port = server.start("127.0.0.1", 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
            stub = pb_grpc.FermiStub(channel)
            poll(lambda: server.servicer.runtime is not None, "the model to load")
            request = pb.GenerateRequest(prompt="Hello", max_new_tokens=3)
            metadata = [("traceparent", GRPC_TRACEPARENT)]
            responses = list(stub.Generate(request, metadata=metadata))
            assert responses[-1].usage.completion_tokens > 0
        root = "fermi.Fermi/Generate"
        spans = poll(lambda: (s := spans_of(exporter, GRPC_TRACE_ID)).get(root) and s, "the root")
        check_tree(spans, root, {"parse", "queue", "prefill", "decode", "stream"})
        attributes = spans[root][0].attributes
        assert attributes["rpc.grpc.status_code"] == "OK"
        assert attributes["rpc.method"] == "Generate" and attributes["rpc.system"] == "grpc"
        assert attributes["gen_ai.usage.output_tokens"] == responses[-1].usage.completion_tokens
    finally:
        server.stop(grace=0)


def test_grpc_error_status_on_the_span(exporter, runtime):
    server = GrpcServer(Settings(model="tiny-qwen3"), load=lambda settings: runtime)
    port = server.start("127.0.0.1", 0)
    trace_id = "11111111111111111111111111111111"
    metadata = [("traceparent", f"00-{trace_id}-2222222222222222-01")]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
            poll(lambda: server.servicer.runtime is not None, "the model to load")
            with pytest.raises(grpc.RpcError) as error:
                list(pb_grpc.FermiStub(channel).Generate(pb.GenerateRequest(), metadata=metadata))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        spans = poll(lambda: spans_of(exporter, trace_id).get("fermi.Fermi/Generate"), "root")
        assert spans[0].attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    finally:
        server.stop(grace=0)


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector stub: keeps every ExportTraceServiceRequest it is sent."""

    received: list[ExportTraceServiceRequest] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces":
            Collector.received.append(ExportTraceServiceRequest.FromString(body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_otlp_export_from_the_standard_variables(tiny_artifact):
    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "fermi-under-test",
        "HF_HUB_OFFLINE": "1",
        "FERMI_API_KEY": "",
    }
    try:
        with serve(str(tiny_artifact), env=env) as running:
            body = {"messages": USER, "max_tokens": 2}
            assert httpx.post(running.url + "/v1/chat/completions", json=body).is_success

            def names() -> set[str]:
                return {
                    span.name
                    for request in Collector.received
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                    for span in scope.spans
                }

            poll(lambda: "POST /v1/chat/completions" in names(), "spans at the collector")
            assert {"parse", "queue", "prefill", "decode"} <= names()
            resource = Collector.received[0].resource_spans[0].resource
            service = {a.key: a.value.string_value for a in resource.attributes}["service.name"]
            assert service == "fermi-under-test"
    finally:
        collector.shutdown()


def test_no_variables_no_sdk():
    check = (
        "import sys, fermi.tracing as t, fermi.openai_server.server, fermi.grpc_server.server\n"
        "print(t.setup({}), t.setup({'OTEL_TRACES_EXPORTER': 'none'}), "
        "any(m.startswith('opentelemetry.sdk') for m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["False", "False", "False"], out.stderr
