"""`fermi serve grpc`: the token-streaming gRPC server, a thin adapter over the shared runtime.

Why the synchronous grpc server (one worker thread per in-flight stream) rather than grpc.aio:
the runtime's generation is a blocking iterator that decodes in the thread that pulls it, with a
thread-safe `cancel()`, so a handler can simply iterate it. grpc runs `context.add_callback`
callbacks when an RPC ends -- a client cancel, an expired deadline, a dropped connection -- on
its own thread; ours calls `gen.cancel()`, the runtime stops within one decode step and ends
with `Finished(cancelled)`, which the handler still consumes (it drains the generation when grpc
drops the stream at a yield), so the session is released with its KV cache and every stream is
counted. With grpc.aio the cancel arrives as `CancelledError` inside the handler task and would
abandon `gen.aiter()` midway, skipping that orderly end. The thread cost is bounded: the runtime
refuses requests beyond `engine_pool + max_queue` at once (QueueFull), and the pool has room
beyond that for unary RPCs (health, ResetSession, ...).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, fields

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fermi import logs, tracing
from fermi.constraints import check_tool_parameters
from fermi.errors import (
    FermiError,
    GenerationTimeout,
    InvalidRequest,
    QueueFull,
    SessionBusy,
    SessionNotFound,
)
from fermi.exposure import exposure_warning
from fermi.grpc_server import fermi_pb2 as pb
from fermi.grpc_server import fermi_pb2_grpc as pb_grpc
from fermi.grpc_server.guard import GuardInterceptor, server_credentials, tenant_of
from fermi.requests import (
    Finished,
    GenerationRequest,
    Message,
    OutputFormat,
    SamplingParams,
    TextDelta,
    ToolCallDelta,
)
from fermi.security import KeyRing, keys_from_settings, short_id
from fermi.settings import Settings
from fermi.stop_signals import STOP_SIGNALS, ignore_stop_signals

log = logging.getLogger("fermi.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Fermi"].full_name  # "fermi.Fermi"
_SERVER_NUMBERS = itertools.count()  # names each server's handler threads apart
HANDLER_EXIT_S = 5.0  # after the runtime stopped: how long exit waits for handler threads
STOP_GRACE_S = 2.0  # then: how long the ended streams have to send their final status


class ModelLoading(FermiError):
    def __init__(self) -> None:
        super().__init__("the model is still loading; retry when health reports SERVING")


class GenerationCancelled(FermiError):
    def __init__(self) -> None:
        super().__init__("generation was cancelled by the server")


class ServerDraining(FermiError):
    def __init__(self) -> None:
        super().__init__("the server is draining before it stops; send this to another instance")


class ServerShuttingDown(FermiError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down; the generation was ended before it finished")


# ---------------------------------------------------------------------------------------------
# The one error mapping of this transport: exception type -> status code. The most specific
# class in an exception's MRO wins (ContextLengthExceeded is an InvalidRequest). Anything else
# is INTERNAL, logged with its traceback; the server keeps serving.
STATUS_FOR: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    SessionBusy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    ModelLoading: grpc.StatusCode.UNAVAILABLE,
    GenerationTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    GenerationCancelled: grpc.StatusCode.CANCELLED,
    ServerDraining: grpc.StatusCode.UNAVAILABLE,
    ServerShuttingDown: grpc.StatusCode.UNAVAILABLE,
}

# Runtime parameter names -> the request fields a gRPC client sets.
FIELD_FOR_PARAM = {
    "messages": "prompt",
    "max_tokens": "max_new_tokens",
    "repetition_penalty": "repeat_penalty",
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            details = str(exc) or cls.__name__
            if isinstance(exc, InvalidRequest) and exc.param:
                field = FIELD_FOR_PARAM.get(exc.param, exc.param)
                if field not in details:
                    details = f"{field}: {details}"
            return STATUS_FOR[cls], details
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


@contextlib.contextmanager
def error_status(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn any exception raised in the block into the mapped status on `context`."""
    try:
        yield
    except GeneratorExit:  # the stream's consumer went away; nothing to report
        raise
    except Exception as e:
        code, details = status_for(e)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("request failed")
        context.abort(code, details)


# ---------------------------------------------------------------------------------------------
# Wire <-> runtime objects.

THINKING = {
    pb.THINKING_UNSPECIFIED: None,
    pb.THINKING_AUTO: "auto",
    pb.THINKING_ON: "on",
    pb.THINKING_OFF: "off",
}
KIND = {"answer": pb.TEXT_KIND_ANSWER, "reasoning": pb.TEXT_KIND_REASONING}
FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}


def _f32(value: float) -> float:
    """The decimal a client most likely meant (proto floats are 32-bit: 0.7 -> 0.699999988)."""
    return float(f"{value:.7g}")


def _sampled(request: pb.GenerateRequest, name: str, legacy: str | None = None) -> float | None:
    """`sampling.<name>` when set (0 included), else the legacy field when non-zero, else None."""
    if request.sampling.HasField(name):
        return _f32(getattr(request.sampling, name))
    value = getattr(request, legacy) if legacy else 0.0
    return _f32(value) if value else None


def _tools(request: pb.GenerateRequest) -> list[dict]:
    """The request's tools in OpenAI's shape (what chat templates read). Raises
    InvalidRequest naming the field: an empty name, parameters_json that is not a JSON object,
    or not a JSON schema of an object the grammar compiler takes."""
    tools = []
    for i, tool in enumerate(request.tools):
        function: dict = {"name": tool.name}
        if not tool.name:
            raise InvalidRequest(f"tools[{i}].name must not be empty", param=f"tools[{i}].name")
        if tool.description:
            function["description"] = tool.description
        if tool.parameters_json:
            param = f"tools[{i}].parameters_json"
            function["parameters"] = _json_object(tool.parameters_json, param)
            check_tool_parameters(tool.name, function["parameters"], param)
        tools.append({"type": "function", "function": function})
    return tools


def _json_object(text: str, param: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidRequest(f"{param} is not valid JSON: {e}", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON object", param=param)
    return value


def to_generation_request(request: pb.GenerateRequest, session_id: str | None) -> GenerationRequest:
    """The runtime request of a Generate call; with no session_id the runtime mints one and
    keeps the session (unclaimed until the client sends the id back). Raises InvalidRequest
    naming the field; tool_results that answer no call of the session's last turn, answer one
    twice or leave one unanswered are refused by the runtime, which holds the session (an empty
    tool_call_id answers the first call not answered yet)."""
    results = [
        Message("tool", r.content, tool_call_id=r.tool_call_id or None)
        for r in request.tool_results
    ]
    if not (request.prompt.strip() or results):
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if request.thinking not in THINKING:
        raise InvalidRequest(f"thinking: unknown value {request.thinking}", param="thinking")
    messages = [Message("system", request.system_prompt)] if request.system_prompt else []
    messages += results
    if request.prompt.strip():
        messages.append(Message("user", request.prompt))
    schema = request.json_schema
    output = (
        OutputFormat("json_schema", _json_object(schema, "json_schema"), "json_schema")
        if schema
        else None
    )
    s = request.sampling
    sampling = SamplingParams(
        temperature=_sampled(request, "temperature", "temperature"),
        top_p=_sampled(request, "top_p", "top_p"),
        top_k=s.top_k if s.HasField("top_k") else None,
        min_p=_sampled(request, "min_p"),
        repetition_penalty=_sampled(request, "repeat_penalty", "repeat_penalty"),
        presence_penalty=_sampled(request, "presence_penalty") or 0.0,
        frequency_penalty=_sampled(request, "frequency_penalty") or 0.0,
        seed=s.seed if s.HasField("seed") else None,
    )
    return GenerationRequest(
        messages=messages,
        max_new_tokens=request.max_new_tokens or None,
        sampling=sampling,
        stop=list(request.stop),
        thinking=THINKING[request.thinking],
        session_id=session_id,
        keep_session=session_id is None,
        append=True,  # the server keeps the history: the prompt is a new turn
        ignore_eos=request.ignore_eos,
        tools=_tools(request),
        tool_choice=request.tool_choice or "auto",
        parallel_tool_calls=not request.HasField("parallel_tool_calls")
        or request.parallel_tool_calls,
        output_format=output,
    )


def delta_message(session_id: str, delta: TextDelta | ToolCallDelta) -> pb.GenerateResponse:
    if isinstance(delta, ToolCallDelta):
        return pb.GenerateResponse(
            token_id=delta.token_ids[-1] if delta.token_ids else 0,
            session_id=session_id,
            kind=pb.TEXT_KIND_TOOL_CALL,
            token_ids=delta.token_ids,
            tool_call=pb.ToolCall(
                index=delta.index, id=delta.id or "", name=delta.name or "",
                arguments=delta.arguments,
            ),
        )  # fmt: skip
    return pb.GenerateResponse(
        token=delta.text,
        token_id=delta.token_ids[-1] if delta.token_ids else 0,
        session_id=session_id,
        kind=KIND[delta.kind],
        token_ids=delta.token_ids,
    )


def final_message(session_id: str, done: Finished) -> pb.GenerateResponse:
    u = done.usage
    return pb.GenerateResponse(
        session_id=session_id,
        finish_reason=FINISH[done.finish_reason],
        usage=pb.Usage(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            reasoning_tokens=u.reasoning_tokens,
            cached_tokens=u.cached_tokens,
        ),
        thinking=done.thinking,
        dropped_turns=done.dropped_turns,
    )


# ---------------------------------------------------------------------------------------------


@dataclass
class ServerStats:
    """Generate streams since start, by how they ended (thread-safe counters)."""

    stop: int = 0
    length: int = 0
    cancelled: int = 0
    deadline_exceeded: int = 0
    failed: int = 0  # an unexpected error (INTERNAL)
    refused: int = 0  # refused before generating (a mapped status: bad request, busy, ...)
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def count(self, outcome: str, completion_tokens: int = 0) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            self.completion_tokens += completion_tokens

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self)}


class _Stopper:
    """Cancels one generation when its RPC ends early (client cancel or the client's deadline,
    a grpc callback) and remembers which. The server's own limit (FERMI_TIMEOUT_MS) is the
    runtime's: it ends the generation with finish_reason "timeout"."""

    def __init__(self, gen, context: grpc.ServicerContext) -> None:
        self.gen = gen
        self.reason: str | None = None  # "client" | "deadline"
        self._lock = threading.Lock()
        if not context.add_callback(lambda: self._on_rpc_end(context)):
            self._on_rpc_end(context)  # the RPC already ended

    def _on_rpc_end(self, context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        self._stop("deadline" if remaining is not None and remaining <= 0 else "client")

    def _stop(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
        self.gen.cancel()


class FermiServicer(pb_grpc.FermiServicer):
    def __init__(self, settings: Settings, stats: ServerStats, keys: KeyRing) -> None:
        self.settings = settings
        self.stats = stats
        self.keys = keys
        self.runtime = None  # set by GrpcServer once Runtime.load returns
        self.draining = False  # new generations are refused (GrpcServer.drain)
        self.shutting_down = False  # what still runs is being ended by the server
        self.streams = 0  # Generate calls in flight
        self._streams_lock = threading.Lock()

    def _runtime(self):
        if self.draining:
            raise ServerDraining()
        if self.runtime is None:
            raise ModelLoading()
        return self.runtime

    def _count_stream(self, delta: int) -> None:
        with self._streams_lock:
            self.streams += delta

    def Generate(self, request, context):
        self._count_stream(1)
        try:
            yield from self._generate(request, context)
        finally:
            self._count_stream(-1)

    def _generate(self, request, context):
        tenant = tenant_of(context, self.keys)
        with error_status(context):
            try:
                with tracing.child("parse"):
                    call = to_generation_request(request, request.session_id or None)
                call.tenant = tenant
                gen = self._runtime().submit(call)
            except Exception as e:
                internal = status_for(e)[0] is grpc.StatusCode.INTERNAL
                self.stats.count("failed" if internal else "refused")
                raise
            yield from self._stream(gen, gen.session_id, context)

    def _stream(self, gen, session_id: str, context) -> Iterator[pb.GenerateResponse]:
        started = time.perf_counter()
        stopper = _Stopper(gen, context)
        events = iter(gen)  # the runtime decodes in this thread, as we pull
        done: Finished | None = None
        span = tracing.tracer.start_span("stream")
        try:
            for event in events:  # to exhaustion: the runtime saves the session's KV last
                if isinstance(event, Finished):
                    done = event
                elif stopper.reason is not None:
                    # The RPC has ended: grpc blocks a yield after that for good (grpc#22874),
                    # so stop sending and let the runtime end the generation.
                    break
                elif isinstance(event, ToolCallDelta) or event.text:
                    yield delta_message(session_id, event)
        finally:
            span.end()
            if done is None:
                # grpc dropped the stream while we sat at a yield (the client went away), or
                # something failed: stop within a decode step and let the runtime end cleanly,
                # so the session keeps its KV cache and the partial turn.
                gen.cancel()
                done = _drain(events)
            events.close()
            gen.close()
            reason = stopper.reason or ("shutdown" if self.shutting_down else None)
            outcome = _outcome(done, reason)
            self.stats.count(outcome, done.usage.completion_tokens if done else 0)
            _log_end(session_id, outcome, done, started)
        if done.finish_reason == "timeout":
            raise GenerationTimeout(self.settings.timeout_ms)
        if done.finish_reason != "cancelled":
            yield final_message(session_id, done)
        elif stopper.reason is None:
            raise ServerShuttingDown() if self.shutting_down else GenerationCancelled()
        else:  # the RPC ended first (client cancel, its deadline, the server stopping): nobody
            # is left to tell, but the access log reports the RPC's real status, not OK
            deadline = stopper.reason == "deadline"
            context.set_code(
                grpc.StatusCode.DEADLINE_EXCEEDED if deadline else grpc.StatusCode.CANCELLED
            )

    def ResetSession(self, request, context):
        with error_status(context):
            if not request.session_id:
                raise InvalidRequest("session_id must not be empty", param="session_id")
            tenant = tenant_of(context, self.keys)
            self._runtime().reset_session(request.session_id, tenant=tenant)
            return pb.ResetSessionResponse()

    def ListModels(self, request, context):
        with error_status(context):
            info = self._runtime().info
            model = pb.Model(
                id=info.id,
                context_length=info.context_length,
                architecture=info.architecture,
                precision=info.precision,
                supports_thinking=info.supports_thinking,
                supports_tools=info.supports_tools,
                target=info.target,
                aliases=self.settings.served_names[1:],
            )
            return pb.ListModelsResponse(models=[model])

    def GetStats(self, request, context):
        with error_status(context):
            rt = self._runtime().stats()
            counts = self.stats.snapshot()
            return pb.GetStatsResponse(
                queue_depth=rt.queue_depth,
                running=rt.running,
                active_sessions=rt.active_sessions,
                kv_bytes=rt.kv_bytes,
                streams_stop=counts["stop"],
                streams_length=counts["length"],
                streams_cancelled=counts["cancelled"],
                streams_deadline_exceeded=counts["deadline_exceeded"],
                streams_failed=counts["failed"],
                streams_refused=counts["refused"],
                completion_tokens=counts["completion_tokens"],
            )


# Who stopped a generation -> how its stream is counted.
STOP_OUTCOME = {
    "client": "cancelled",
    "deadline": "deadline_exceeded",
    "shutdown": "cancelled",  # ended by the server's own drain limit
}


def _drain(events: Iterator) -> Finished | None:
    done = None
    try:
        for event in events:
            if isinstance(event, Finished):
                done = event
    except Exception:
        log.exception("generation failed while stopping")
    return done


def _outcome(done: Finished | None, stop_reason: str | None) -> str:
    """How a stream ended, for ServerStats."""
    if done is None:
        return "failed"  # an exception inside generation
    if done.finish_reason == "tool_calls":
        return "stop"  # the model ended its turn
    if done.finish_reason == "timeout":
        return "deadline_exceeded"  # the runtime's FERMI_TIMEOUT_MS
    if done.finish_reason != "cancelled":
        return done.finish_reason  # "stop" | "length", even if a stop signal raced the end
    return STOP_OUTCOME.get(stop_reason, "failed")


def _log_end(session_id: str, outcome: str, done: Finished | None, started: float) -> None:
    elapsed = time.perf_counter() - started
    if done is None:
        log.info("session %s: %s after %.2fs", short_id(session_id), outcome, elapsed)
        return
    u = done.usage
    log.info(
        "session %s: %s, %d prompt (%d cached) + %d completion tokens in %.2fs",
        short_id(session_id), outcome, u.prompt_tokens, u.cached_tokens, u.completion_tokens,
        elapsed,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------


class RequestInterceptor(grpc.ServerInterceptor):
    """Per RPC: the access log line (method, status, tokens, time to first token, total time)
    and the root span (continuing the caller's `traceparent` metadata), around every handler."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        if handler.unary_stream:
            return handler._replace(unary_stream=_observed_stream(handler.unary_stream, details))
        if handler.unary_unary:
            return handler._replace(unary_unary=_observed_unary(handler.unary_unary, details))
        return handler


def _begin(details) -> logs.AccessRecord:
    record = logs.AccessRecord("grpc", "rpc", details.method)
    service, _, method = details.method.strip("/").partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    metadata = dict(details.invocation_metadata or ())
    record.span = tracing.start_request(details.method.strip("/"), metadata, attributes)
    return record


def _status(context) -> str:
    code = context.code()
    return "OK" if code is None else code.name


def _observe(record: logs.AccessRecord, response) -> None:
    if not isinstance(response, pb.GenerateResponse):
        return
    if response.token or response.token_ids:
        record.first_token()
    if response.HasField("usage"):
        u = response.usage
        record.prompt_tokens, record.completion_tokens = u.prompt_tokens, u.completion_tokens
        record.cached_tokens = u.cached_tokens
        record.finish_reason = pb.FinishReason.Name(response.finish_reason)


def _observed_stream(behavior, details):
    def handle(request, context):
        record = _begin(details)
        token = tracing.activate(record.span)
        try:
            for response in behavior(request, context):
                _observe(record, response)
                yield response
            record.status = _status(context)
        except GeneratorExit:  # the client went away
            record.status = "CANCELLED"
            raise
        except BaseException:
            record.status = _status(context) if context.code() else "UNKNOWN"
            raise
        finally:
            tracing.deactivate(token)
            record.emit()

    return handle


def _observed_unary(behavior, details):
    def handle(request, context):
        record = _begin(details)
        token = tracing.activate(record.span)
        try:
            response = behavior(request, context)
            record.status = _status(context)
            return response
        except BaseException:
            record.status = _status(context) if context.code() else "UNKNOWN"
            raise
        finally:
            tracing.deactivate(token)
            record.emit()

    return handle


class GrpcServer:
    """The grpc server with the Fermi, health and reflection services. The port opens at once
    (health NOT_SERVING); the runtime loads in a background thread, then health says SERVING."""

    def __init__(self, settings: Settings, load: Callable[[Settings], object] | None = None):
        self.settings = settings
        self._load = load or _load_runtime
        self.stats = ServerStats()
        self.keys = keys_from_settings(settings)
        self.credentials = server_credentials(settings.grpc_tls_cert, settings.grpc_tls_key)
        self.servicer = FermiServicer(settings, self.stats, self.keys)
        self.health = health.HealthServicer()
        self.load_error: BaseException | None = None
        self._stopped = threading.Event()
        # Streams beyond engine_pool + max_queue are refused by the runtime at once, so this
        # many workers leave room for unary RPCs (health, ResetSession, ...) at full load.
        workers = settings.engine_pool + settings.max_queue + 8
        self._thread_prefix = f"fermi-grpc-{next(_SERVER_NUMBERS)}"
        self.executor = futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=self._thread_prefix
        )
        self.server = grpc.server(
            self.executor,
            # The access log sees every call, refused ones too; then the key check.
            interceptors=[RequestInterceptor(), GuardInterceptor(self.keys)],
            options=[("grpc.so_reuseport", 0)],  # a taken port is an error, not a shared one
            maximum_concurrent_rpcs=workers,  # beyond: RESOURCE_EXHAUSTED, not a growing backlog
        )
        self.address = ("127.0.0.1", 0)  # set by start()
        pb_grpc.add_FermiServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def start(self, host: str, port: int) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if self.credentials is not None:
                bound = self.server.add_secure_port(address, self.credentials)
            else:
                bound = self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise FermiError(f"cannot listen on {address}: {e}") from None
        if not bound:
            raise FermiError(f"cannot listen on {address}")
        self.server.start()
        self.address = (host, bound)
        tls = "TLS" if self.credentials is not None else "plaintext"
        log.info(
            "fermi gRPC listening on %s:%d (%s); loading %s", host, bound, tls, self.settings.model
        )
        threading.Thread(target=self._load_in_background, name="fermi-load", daemon=True).start()
        return bound

    def _load_in_background(self) -> None:
        try:
            runtime = self._load(self.settings)
        except BaseException as e:  # reported by wait(); the server stops
            self.load_error = e
            log.error("loading %s failed: %s", self.settings.model, e)
            self.stop(grace=0)
            return
        self.servicer.runtime = runtime
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        host, port = self.address
        scheme = "grpcs" if self.credentials is not None else "grpc"  # grpcs: TLS
        url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        warning = exposure_warning(host, self.settings)
        logs.log_ready(url, runtime.info, runtime.engine.device, self.settings, warning)

    def drain(self, grace_s: float | None = None, now: threading.Event | None = None) -> None:
        """The first SIGTERM/SIGINT: health says NOT_SERVING (to new channels too: the server
        still accepts them), new generations get UNAVAILABLE, and streams in flight may finish
        for up to `grace_s` seconds (default: FERMI_DRAIN_S) or until `now` is set (a second
        signal). What still runs then is ended with UNAVAILABLE "shutting down", and the server
        stops."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.servicer.draining = True
        log.info("draining: %d stream(s) in flight", self.servicer.streams)
        grace_s = self.settings.drain_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace_s
        now = now or threading.Event()
        while self.servicer.streams and time.monotonic() < deadline and not now.wait(0.05):
            pass
        self.servicer.shutting_down = True
        runtime = self.servicer.runtime
        if runtime is not None and hasattr(runtime, "cancel_all"):
            runtime.cancel_all()  # each stream ends within a decode step, with its status
        self.stop(grace=STOP_GRACE_S)

    def stop(self, grace: float | None = 5.0) -> None:
        """NOT_SERVING at once, then let in-flight streams finish for up to `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self._stopped.set()

    def wait(self) -> None:
        """Block until stopped; re-raise a model load failure. Waits in short slices: a
        signal the kernel delivers to another thread (grpc's and onnxruntime's threads can take
        it) does not wake the main thread, and Python runs the handler only when the main
        thread runs again."""
        while not self._stopped.wait(0.25):
            pass
        if self.load_error is not None:
            raise self.load_error

    def release_handlers(self, timeout_s: float) -> int:
        """After stop(): let idle handler threads go and wait up to `timeout_s` seconds for
        the busy ones to return; the number still running after that."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout_s
        for thread in self._handler_threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        return len(self._handler_threads())

    def _handler_threads(self) -> list[threading.Thread]:
        """The live threads of this server's handler pool (by their name prefix)."""
        prefix = self._thread_prefix + "_"
        return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def _load_runtime(settings: Settings):
    from fermi.runtime import Runtime

    return Runtime.load(settings)


def run(settings: Settings, host: str, port: int) -> None:
    """`fermi serve grpc`: serve until SIGINT/SIGTERM (then drain in-flight streams)."""
    logs.configure(settings.log_format)
    tracing.setup()
    server = GrpcServer(settings)
    server.start(host, port)

    draining, now = threading.Event(), threading.Event()

    def shutdown(signum, frame) -> None:
        # The first signal drains (in-flight streams may finish for FERMI_DRAIN_S); a second ends
        # them now, as `fermi serve openai` does.
        if draining.is_set():
            log.info("signal %d: stopping now", signum)
            now.set()
            return
        draining.set()
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.drain, kwargs={"now": now}, name="fermi-drain",
                         daemon=True).start()  # fmt: skip

    for sig in STOP_SIGNALS:
        signal.signal(sig, shutdown)
    try:
        server.wait()
    finally:
        ignore_stop_signals()  # stopped: nothing is left for a signal to do (stop_signals.py)
        runtime = server.servicer.runtime
        if runtime is not None and hasattr(runtime, "shutdown"):
            runtime.shutdown()  # nothing may still be decoding when the interpreter exits
        tracing.shutdown()
    stuck = server.release_handlers(HANDLER_EXIT_S)
    if stuck:
        # A handler that sent a message as the server finished stopping waits for a
        # completion grpc no longer delivers, and the interpreter would join its thread
        # forever. The engine is stopped and the logs are flushed: end the process here.
        log.warning("%d gRPC handler thread(s) still blocked inside grpc; exiting", stuck)
        logging.shutdown()
        os._exit(0)
