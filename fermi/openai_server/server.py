"""The Sanic app: routes, middleware (auth, CORS, request metrics) and the runtime's lifecycle.

One process, one runtime: Sanic runs in single-process mode (no worker manager, no reloader),
the model loads in a thread after the socket is listening (GET /health answers 503 until then),
and generation runs in the runtime's worker threads through `Generation.aiter()`, so the event
loop only moves bytes. Leaving a stream early (the client went away, so Sanic cancels the
handler task) closes the generation, which stops it within one decode step."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote

from sanic import Request, Sanic
from sanic.exceptions import (
    BadRequest,
    ExpectationFailed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
)
from sanic.handlers import ErrorHandler
from sanic.response import HTTPResponse, empty, json, raw
from sanic.signals import Event as SanicEvent

from fermi import logs, tracing
from fermi.errors import FermiError, GenerationTimeout
from fermi.exposure import exposure_warning
from fermi.fim import render_fim
from fermi.openai_server import completions as cmpl
from fermi.openai_server import formatters as fmt
from fermi.openai_server.errors import (
    ModelLoading,
    ServerDraining,
    ShuttingDown,
    Unauthorized,
    map_error,
)
from fermi.openai_server.guard import (
    GuardedProtocol,
    classify_oversized,
    submit_all_off_loop,
    submit_off_loop,
)
from fermi.openai_server.metrics import CONTENT_TYPE, Metrics
from fermi.openai_server.schemas import check_model, parse_chat, parse_json, parse_responses
from fermi.requests import Event, Finished, PromptLogprobs, TextDelta, ToolCallDelta
from fermi.security import ANONYMOUS, keys_from_settings
from fermi.settings import Settings
from fermi.stop_signals import STOP_SIGNALS, ignore_stop_signals

log = logging.getLogger("fermi.openai")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CORS_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
TOKENIZER_ROUTES = ("/tokenize", "/detokenize")  # keyed like /v1 (llama-server keys them too)
# What Sanic raises when it cannot read a request (answered before any key check)
UNREAD_ERRORS = (BadRequest, PayloadTooLarge, RequestTimeout, ExpectationFailed)
ROUTES: list[tuple[Callable, str, str]] = []  # (handler, uri, method), filled by @route


def route(uri: str, method: str = "GET"):
    def register(handler):
        ROUTES.append((handler, uri, method))
        return handler

    return register


# -- routes ----------------------------------------------------------------------------------


@route("/health")
async def health(request: Request) -> HTTPResponse:
    """loading (503) -> ok (200) -> draining (503, after SIGTERM/SIGINT)."""
    runtime = request.app.ctx.runtime
    if request.app.ctx.draining:
        return json({"status": "draining"}, status=503)
    if runtime is None:
        return json({"status": "loading"}, status=503, headers={"Retry-After": "1"})
    return json({"status": "ok", "model": runtime.model_id})


@route("/metrics")
async def metrics(request: Request) -> HTTPResponse:
    runtime = request.app.ctx.runtime
    body = request.app.ctx.metrics.render(runtime.stats() if runtime else None)
    return raw(body, content_type=CONTENT_TYPE)


@route("/v1/models")
async def list_models(request: Request) -> HTTPResponse:
    return _json(fmt.model_list(_model_card(request)))


@route("/v1/models/<model_id:path>")
async def get_model(request: Request, model_id: str) -> HTTPResponse:
    """The model card under any of its names; another raises ModelNotFound (404). The id is
    percent-decoded once, so `org%2Fmy-model` (what openai-python sends) and a plain
    `org/my-model` both name "org/my-model"."""
    if not model_id:  # GET /v1/models/ is the list
        return await list_models(request)
    check_model(unquote(model_id), _runtime(request).info.names)
    return _json(_model_card(request))


@route("/v1/sessions/<session_id:path>", "DELETE")
async def delete_session(request: Request, session_id: str) -> HTTPResponse:
    """Forget one of the caller's sessions: another key's session answers 404 like a missing
    one. The id is percent-decoded once, so `user%2F42` (or a plain `user/42`) names the session
    "user/42"."""
    session_id = unquote(session_id)
    _runtime(request).reset_session(session_id, tenant=request.ctx.tenant)
    return _json({"id": session_id, "object": "session", "deleted": True})


LARGE_BODY = 64 * 1024  # bytes: parsed in a worker thread from this size on


async def _parse(request: Request, parser):
    """`parser` (a route's body parser) of the request's JSON object (parse_json). A large
    body is parsed and checked in a worker thread: walking a prompt of a million token ids,
    or 75,000 messages, takes the GIL for a second, and from a thread the interpreter hands it
    back to the event loop every few milliseconds."""
    if len(request.body or b"") < LARGE_BODY:
        return parser(parse_json(request.body))
    return await asyncio.to_thread(lambda: parser(parse_json(request.body)))


@route("/v1/chat/completions", "POST")
async def chat_completions(request: Request) -> HTTPResponse | None:
    runtime = _runtime(request)
    with tracing.child("parse"):
        call = await _parse(request, parse_chat)
        check_model(call.model, runtime.info.names)
    meta = fmt.Meta(fmt.new_id("chatcmpl-"), runtime.model_id, call.generation.session_id)
    text = runtime.token_text if call.logprobs else None
    call.generation.tenant = request.ctx.tenant
    generation = await submit_off_loop(runtime, call.generation)
    may_call = fmt.may_call_tools(call.generation)
    if call.stream:
        running = fmt.RunningUsage(generation.prompt_tokens) if call.continuous_usage else None
        frames = fmt.ChatStream(
            meta, call.include_usage, call.generation.n, text, may_call, running
        )
        return await _stream(request, generation, frames)
    choices, _, finished = await _collect(request, generation, call.generation.n)
    return _json(fmt.chat_completion(meta, choices, finished, text, may_call), meta)


@route("/v1/responses", "POST")
async def responses(request: Request) -> HTTPResponse | None:
    runtime = _runtime(request)
    with tracing.child("parse"):
        call = await _parse(request, parse_responses)
        check_model(call.model, runtime.info.names)
    meta = fmt.Meta(fmt.new_id("resp_"), runtime.model_id, call.generation.session_id)
    text = runtime.token_text if call.logprobs else None
    call.generation.tenant = request.ctx.tenant
    generation = await submit_off_loop(runtime, call.generation)
    if call.stream:
        return await _stream(request, generation, fmt.ResponseStream(meta, call, text))
    choices, _, finished = await _collect(request, generation, 1)
    return _json(fmt.response_final(meta, call, choices[0], finished, text), meta)


async def _submit_prompts(request: Request, runtime, call: cmpl.CompletionCall):
    """Submit the call's prompts (each FIM-rendered with its suffix) as generations queued
    together, all or none (runtime.submit_all): one prompt is its Generation, several a
    PromptBatch of them."""
    requests = []
    for prompt in call.prompts:
        if call.suffix is not None:
            prompt = render_fim(runtime.fim, prompt, call.suffix)
        requests.append(replace(call.generation, prompt=prompt, tenant=request.ctx.tenant))
    generations = await submit_all_off_loop(runtime, requests)
    if len(generations) == 1:
        return generations[0]
    return cmpl.PromptBatch(generations, call.generation.n)


@route("/v1/completions", "POST")
async def completions(request: Request) -> HTTPResponse | None:
    runtime = _runtime(request)
    with tracing.child("parse"):
        call = await _parse(request, cmpl.parse_completions)
        check_model(call.model, runtime.info.names)
    meta = fmt.Meta(fmt.new_id("cmpl-"), runtime.model_id, None)
    texts = [p if isinstance(p, str) else await asyncio.to_thread(runtime.decode, p, "prompt")
             for p in call.prompts]  # fmt: skip
    frames = cmpl.CompletionFrames(meta, call, runtime.token_text, texts)
    generation = await _submit_prompts(request, runtime, call)
    if call.stream:
        running = fmt.RunningUsage(generation.prompt_tokens) if call.continuous_usage else None
        return await _stream(request, generation, cmpl.CompletionStream(frames, running))
    _, events, finished = await _collect(request, generation, len(frames.choices))
    return _json(frames.body(events, finished))


@route("/tokenize", "POST")
async def tokenize(request: Request) -> HTTPResponse:
    runtime = _runtime(request)
    call = await _parse(request, cmpl.parse_tokenize)
    check_model(call.model, runtime.info.names)
    if call.messages is not None:
        ids = await asyncio.to_thread(
            runtime.tokenize_messages, call.messages, call.thinking, call.add_generation_prompt
        )
    else:
        ids = await asyncio.to_thread(runtime.encode_special, call.text, call.add_special)
    return _json(cmpl.tokenize_body(call, ids, runtime.token_text, runtime.context_length))


@route("/detokenize", "POST")
async def detokenize(request: Request) -> HTTPResponse:
    runtime = _runtime(request)
    model, ids = await _parse(request, cmpl.parse_detokenize)
    check_model(model, runtime.info.names)
    return _json(cmpl.detokenize_body(await asyncio.to_thread(runtime.decode, ids)))


async def preflight(request: Request, **_: Any) -> HTTPResponse:
    """CORS preflight; the response middleware adds Allow-Origin when the origin is allowed."""
    asked = request.headers.get("access-control-request-headers")
    return empty(
        headers={
            "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": asked or "authorization, content-type",
            "Access-Control-Max-Age": "600",
        }
    )


# -- helpers ---------------------------------------------------------------------------------


def _runtime(request: Request):
    runtime = request.app.ctx.runtime
    if request.app.ctx.draining:
        raise ServerDraining("the server is shutting down; retry on another instance")
    if runtime is None:
        raise ModelLoading("the model is still loading; retry shortly")
    return runtime


def _model_card(request: Request) -> dict[str, Any]:
    return fmt.model_card(_runtime(request).info, request.app.ctx.loaded_at)


def _json(body: dict[str, Any], meta: fmt.Meta | None = None) -> HTTPResponse:
    headers = {"X-Session-Id": meta.session_id} if meta and meta.session_id else None
    return json(body, headers=headers, dumps=fmt.dumps)


@dataclass
class _Failed:
    error: Exception


async def _pump(events: AsyncIterator[Event], put: Callable[[object], None]) -> None:
    """Move a generation's events into a queue from a task of its own, so that a generation
    cancelled under a departed client still runs to its Finished(cancelled), and is counted."""
    try:
        async for event in events:
            put(event)
    except Exception as e:
        put(_Failed(e))


async def _drain(queue: asyncio.Queue, ctx) -> AsyncIterator[Event]:
    while True:
        item = await queue.get()
        if isinstance(item, _Failed):
            raise item.error
        if isinstance(item, Finished) and item.finish_reason == "cancelled" and ctx.stopping:
            raise ShuttingDown("the server is shutting down; retry on another instance or later")
        if isinstance(item, Finished) and item.finish_reason == "timeout":
            raise GenerationTimeout(ctx.settings.timeout_ms)
        yield item
        if isinstance(item, Finished):
            return


async def _record(access: logs.AccessRecord, events: AsyncIterator[Event]):
    """Pass events through, noting the first token's time and the final counts."""
    async for event in events:
        if isinstance(event, TextDelta):
            access.first_token()
        elif isinstance(event, Finished):
            access.finished(event)
        yield event


@asynccontextmanager
async def _events(request: Request, generation) -> AsyncIterator[AsyncIterator[Event]]:
    """The generation's events, timed and counted. However the block is left (done, failed, or
    the handler cancelled because the client went away) the generation is closed: cancelled
    within one decode step if running, its session and queue place freed if it never ran."""
    ctx = request.app.ctx
    queue: asyncio.Queue = asyncio.Queue()
    observed = ctx.metrics.observe(
        generation.aiter(), lambda: request.ctx.disconnected, generation.choices
    )
    events = _record(request.ctx.access, observed)
    pump = asyncio.create_task(_pump(events, queue.put_nowait))
    request.ctx.pump = pump
    ctx.pumps.add(pump)
    pump.add_done_callback(ctx.pumps.discard)
    try:
        yield _drain(queue, ctx)
    except asyncio.CancelledError:  # also Sanic's RequestCancelled from a send
        _log_disconnect(request)  # before the close below: the metrics say "disconnected"
        raise
    finally:
        generation.close()


def _log_disconnect(request: Request) -> None:
    """The client went away mid-generation: its access line says 499 (nginx's "client closed
    request") and is written once the generation has ended, with its counts and finish reason
    (cancelled, unless it ended on its own first)."""
    access, pump = request.ctx.access, getattr(request.ctx, "pump", None)
    access.status = 499
    request.ctx.disconnected = True  # finish_response leaves the line to us
    if pump is not None and not pump.done():
        pump.add_done_callback(lambda _: _account(request))
        return
    access.finish_reason = access.finish_reason or "cancelled"
    _account(request)


def _account(request: Request) -> None:
    """Count the request in /metrics and write its access line, both once and with the same
    status (`request.ctx.access.status`)."""
    access = request.ctx.access
    if access.emitted:
        return
    request.app.ctx.metrics.requests.labels(_route_name(request), str(access.status)).inc()
    access.emit()


def _route_name(request: Request) -> str:
    return f"/{request.route.path}" if request.route else "unmatched"


async def _collect(
    request: Request, generation, n: int
) -> tuple[list[fmt.ChoiceText], list[Event], Finished]:
    """Every event of a generation, and the text and tool calls of each of its `n` choices."""
    choices = [fmt.ChoiceText(i) for i in range(n)]
    parts = [{"reasoning": [], "answer": []} for _ in range(n)]
    events: list[Event] = []
    async with _events(request, generation) as stream:
        async for event in stream:
            events.append(event)
            if isinstance(event, ToolCallDelta):
                choices[event.choice].add_tool_call(event)
            elif isinstance(event, TextDelta):
                parts[event.index][event.kind].append(event.text)
                if event.kind == "answer":
                    choices[event.index].tokens.extend(event.logprobs)
    finished = events[-1]
    assert isinstance(finished, Finished), "the runtime ends every generation with Finished"
    for choice, texts in zip(choices, parts, strict=True):
        choice.reasoning, choice.answer = "".join(texts["reasoning"]), "".join(texts["answer"])
    return choices, events, finished


@asynccontextmanager
async def _stream_span() -> AsyncIterator[None]:
    with tracing.child("stream"):
        yield


async def _stream(request: Request, generation, frames):
    """Write an SSE stream (frames: a ChatStream, ResponseStream or CompletionStream); a
    failure after the headers went out is reported in-band."""
    headers = dict(SSE_HEADERS)
    if frames.meta.session_id:
        headers["X-Session-Id"] = frames.meta.session_id
    request.ctx.streaming = True  # the access log is written when the stream ends
    ended = False
    try:
        async with _events(request, generation) as events, _stream_span():
            response = await request.respond(content_type="text/event-stream", headers=headers)
            await response.send(frames.start())
            try:
                async for event in events:
                    await response.send(_frame(frames, event))
            except Exception as e:
                if not isinstance(e, ShuttingDown | GenerationTimeout):
                    log.exception("generation failed mid-stream")
                await response.send(frames.error(map_error(e)))
            await response.eof()
            ended = True
    finally:
        if ended:
            request.ctx.access.status = 200
            _account(request)
        else:  # the client went away (the handler was cancelled, or a send failed)
            _log_disconnect(request)


def _frame(frames, event: Event) -> str:
    if isinstance(event, TextDelta | ToolCallDelta):
        return frames.text(event)
    if isinstance(event, PromptLogprobs):
        return frames.prompt(event) if hasattr(frames, "prompt") else ""
    return frames.finish(event)


# -- app -------------------------------------------------------------------------------------


class OpenAIErrorHandler(ErrorHandler):
    """Every error, Sanic's own (404, 405, 413) included, in OpenAI's shape."""

    def default(self, request: Request, exception: BaseException) -> HTTPResponse:
        exception = classify_oversized(request, exception)
        if isinstance(exception, NotFound) and request is not None:
            # Sanic's own message drops the leading slash, and names nothing for "/".
            exception = NotFound(f"no route {request.method} {request.path} on this server")
        err = map_error(exception)
        if err.status >= 500 and not isinstance(exception, FermiError | asyncio.CancelledError):
            log.error("unhandled error on %s", request.path if request else "?", exc_info=exception)
        return json(fmt.error_body(err), status=err.status, headers=err.headers, dumps=fmt.dumps)


def allowed_origin(settings: Settings, origin: str | None) -> str | None:
    allowed = {o.strip() for o in settings.cors_origins.split(",") if o.strip()}
    if not origin or not allowed:
        return None
    return "*" if "*" in allowed else origin if origin in allowed else None


async def note_error(request: Request, exception: BaseException) -> None:
    """Remember the error Sanic is about to answer (signal http.lifecycle.exception), so that
    `authorize` can tell a request Sanic could not read."""
    request.ctx.error = exception


async def authorize(request: Request) -> None:
    """Set `request.ctx.tenant` from the bearer key; /v1 routes, /tokenize and /detokenize
    refuse a missing or unknown key with 401 (Unauthorized) when keys are configured (/health
    and /metrics stay open). A request Sanic could not read (malformed framing, too large, not
    received in time) is answered with that error instead: no handler runs for it, and a
    malformed head leaves no headers, so no key, to check."""
    request.ctx.tenant = ANONYMOUS
    protected = request.path.startswith("/v1") or request.path in TOKENIZER_ROUTES
    if not protected or request.method == "OPTIONS":
        return
    if isinstance(getattr(request.ctx, "error", None), UNREAD_ERRORS):
        return
    tenant = request.app.ctx.keys.tenant_for_header(request.headers.get("authorization"))
    if tenant is None:
        raise Unauthorized("Incorrect or missing API key: send 'Authorization: Bearer <key>'")
    request.ctx.tenant = tenant


async def start_request(request: Request) -> None:
    """Open the request's access record and root span (the caller's traceparent continued)."""
    route = f"/{request.route.path}" if request.route else request.path
    request.ctx.access = access = logs.AccessRecord("http", request.method, request.path)
    request.ctx.streaming = False
    request.ctx.disconnected = False
    attributes = {"http.request.method": request.method, "http.route": route}
    access.span = tracing.start_request(f"{request.method} {route}", request.headers, attributes)
    tracing.activate(access.span)  # this request's task: the handler's spans are children


async def finish_response(request: Request, response: HTTPResponse) -> None:
    """Count the request and write its access log line (a stream's, or a departed client's,
    when its generation ends) and add CORS headers (also to streams and errors)."""
    access = getattr(request.ctx, "access", None)
    if access is None:  # answered without the request middleware (no access record)
        request.app.ctx.metrics.requests.labels(_route_name(request), str(response.status)).inc()
    elif not request.ctx.streaming and not request.ctx.disconnected:
        access.status = response.status
        _account(request)
    origin = allowed_origin(request.app.ctx.settings, request.headers.get("origin"))
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Session-Id"
        response.headers["Vary"] = "Origin"


async def load_runtime(app: Sanic, load: Callable[[Settings], Any]) -> None:
    """Load the model off the loop; a failure stops the server (run() re-raises it)."""
    settings = app.ctx.settings
    try:
        runtime = await asyncio.to_thread(load, settings)
    except Exception as e:
        app.ctx.load_error = e
        log.error("could not load %s: %s", settings.model, e)
        app.stop()
        return
    app.ctx.loaded_at = int(time.time())
    app.ctx.runtime = runtime
    app.ctx.metrics.loaded.set(1)
    host, port = app.ctx.address
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    warning = exposure_warning(host, settings)
    logs.log_ready(url, runtime.info, runtime.engine.device, settings, warning)


async def drain(app: Sanic, timeout_s: float) -> None:
    """Stop taking requests (/health says draining, /v1 routes 503), let running generations
    finish for up to `timeout_s` seconds, then stop the server. A second signal stops at once:
    what still generates ends now with the in-band "shutting down" error."""
    if app.ctx.draining:
        log.info("second signal: stopping now")
        app.ctx.stopping = True
        runtime = app.ctx.runtime
        if runtime is not None and hasattr(runtime, "cancel_all"):
            runtime.cancel_all()
        _stop_once(app)
        return
    app.ctx.draining = True
    log.info("draining: %d generation(s) in flight", len(app.ctx.pumps))
    deadline = time.monotonic() + timeout_s
    while app.ctx.pumps and time.monotonic() < deadline and not app.ctx.stop_requested:
        await asyncio.sleep(0.05)
    _stop_once(app)


def _stop_once(app: Sanic) -> None:
    """Sanic's stop may be asked once: a second call during its shutdown stops the event loop
    under its cleanup (RuntimeError, exit 1)."""
    if not app.ctx.stop_requested:
        app.ctx.stop_requested = True
        app.stop()


async def start_stopping(app: Sanic) -> None:
    """SIGTERM: open streams get the grace period to finish; one second before it ends, what
    still generates is cancelled and told "shutting down" in-band (503 for a non-streamed
    request), so that no client is left with a stream cut without an explanation."""
    app.ctx.stopping = True
    runtime = app.ctx.runtime
    if runtime is None or not hasattr(runtime, "cancel_all"):
        return
    delay = max(0.0, app.config.GRACEFUL_SHUTDOWN_TIMEOUT - 1.0)
    asyncio.get_running_loop().call_later(delay, runtime.cancel_all)


async def stop_generations(app: Sanic) -> None:
    """After the grace period: cancel what still generates and wait until it left the engine,
    so the process exits cleanly (a decode step cut off at exit aborts it). From here on a
    signal has nothing left to stop, so SIGINT and SIGTERM are ignored (fermi/stop_signals.py)."""
    if app.ctx.signals_handled:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)  # else the loop's close restores the default action
        ignore_stop_signals()
    runtime = app.ctx.runtime
    if runtime is not None and hasattr(runtime, "shutdown"):
        await asyncio.to_thread(runtime.shutdown)


def create_app(settings: Settings, load: Callable[[Settings], Any] | None = None) -> Sanic:
    if load is None:
        from fermi.runtime import Runtime

        load = Runtime.load
    app = Sanic("fermi_openai", error_handler=OpenAIErrorHandler(), configure_logging=False)
    app.config.REQUEST_MAX_SIZE = settings.max_body_bytes
    app.config.RESPONSE_TIMEOUT = 6 * 3600  # long generations and queue waits are normal
    app.config.REQUEST_TIMEOUT = settings.request_timeout_s  # headers + body (guard.py)
    app.config.KEEP_ALIVE_TIMEOUT = settings.keep_alive_timeout_s
    app.config.FERMI_MAX_CONNECTIONS = settings.max_connections
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 3.0
    app.ctx.settings = settings
    app.ctx.keys = keys_from_settings(settings)
    app.ctx.runtime = None
    app.ctx.stopping = False
    app.ctx.load_error = None
    app.ctx.draining = False
    app.ctx.stop_requested = False
    app.ctx.signals_handled = False  # SIGINT/SIGTERM drain this server (main thread only)
    app.ctx.address = ("127.0.0.1", 0)  # set by run(); the ready line prints it
    app.ctx.loaded_at = 0
    app.ctx.metrics = Metrics()
    app.ctx.pumps = set()  # running _pump tasks (held so they are not collected)
    app.ctx.tasks = set()  # the loading and draining tasks (likewise)
    for i, (handler, uri, method) in enumerate(ROUTES):
        methods = ["GET", "HEAD"] if method == "GET" else [method]  # HEAD wherever GET works
        app.add_route(handler, uri, methods=methods, name=f"{handler.__name__}_{i}")
    for i, uri in enumerate(sorted({uri for _, uri, _ in ROUTES})):  # every route a browser calls
        app.add_route(preflight, uri, methods=["OPTIONS"], name=f"preflight_{i}")
    app.add_signal(note_error, SanicEvent.HTTP_LIFECYCLE_EXCEPTION.value)
    app.on_request(start_request)
    app.on_request(authorize)
    app.on_response(finish_response)

    async def start_loading(app: Sanic) -> None:
        # Plain asyncio tasks (held in app.ctx): they also run where Sanic's own task registry
        # is not set up, as in a server embedded with create_server.
        def start(coroutine) -> None:
            task = asyncio.get_running_loop().create_task(coroutine)
            app.ctx.tasks.add(task)
            task.add_done_callback(app.ctx.tasks.discard)

        for sig in STOP_SIGNALS:
            try:
                asyncio.get_running_loop().add_signal_handler(
                    sig, lambda: start(drain(app, app.ctx.settings.drain_s))
                )
            except (ValueError, RuntimeError):  # not the main thread (a server embedded in tests)
                break
            app.ctx.signals_handled = True
        start(load_runtime(app, load))

    app.after_server_start(start_loading)
    app.before_server_stop(start_stopping)
    app.after_server_stop(stop_generations)
    return app


def run(settings: Settings, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then drain (the `fermi serve openai` command)."""
    logs.configure(settings.log_format)
    tracing.setup()
    app = create_app(settings)
    app.ctx.address = (host, port)
    try:
        app.run(
            host=host,
            port=port,
            single_process=True,
            auto_reload=False,
            access_log=False,
            motd=False,
            register_sys_signals=False,
            protocol=GuardedProtocol,
        )
    except OSError as e:  # the address is taken or not this machine's
        raise FermiError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    finally:
        ignore_stop_signals()
        tracing.shutdown()
    if app.ctx.load_error is not None:
        raise app.ctx.load_error
