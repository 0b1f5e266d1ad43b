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
from dataclasses import dataclass
from typing import Any

from sanic import Request, Sanic
from sanic.handlers import ErrorHandler
from sanic.response import HTTPResponse, empty, json, raw

from fermi.errors import FermiError
from fermi.openai_server import formatters as fmt
from fermi.openai_server.errors import ModelLoading, ShuttingDown, Unauthorized, map_error
from fermi.openai_server.guard import GuardedProtocol, classify_oversized, submit_off_loop
from fermi.openai_server.metrics import CONTENT_TYPE, Metrics
from fermi.openai_server.schemas import check_model, parse_chat, parse_json, parse_responses
from fermi.requests import Event, Finished, TextDelta
from fermi.security import ANONYMOUS, keys_from_settings
from fermi.settings import Settings

log = logging.getLogger("fermi.openai")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
ROUTES: list[tuple[Callable, str, str]] = []  # (handler, uri, method), filled by @route


def route(uri: str, method: str = "GET"):
    def register(handler):
        ROUTES.append((handler, uri, method))
        return handler

    return register


# -- routes ----------------------------------------------------------------------------------


@route("/health")
async def health(request: Request) -> HTTPResponse:
    runtime = request.app.ctx.runtime
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
    check_model(model_id, _runtime(request).model_id)
    return _json(_model_card(request))


@route("/v1/sessions/<session_id>", "DELETE")
async def delete_session(request: Request, session_id: str) -> HTTPResponse:
    """Forget one of the caller's sessions: another key's session answers 404 like a missing
    one."""
    _runtime(request).reset_session(session_id, tenant=request.ctx.tenant)
    return _json({"id": session_id, "object": "session", "deleted": True})


@route("/v1/chat/completions", "POST")
async def chat_completions(request: Request) -> HTTPResponse | None:
    runtime = _runtime(request)
    call = parse_chat(parse_json(request.body))
    check_model(call.model, runtime.model_id)
    meta = fmt.Meta(fmt.new_id("chatcmpl-"), runtime.model_id, call.generation.session_id)
    call.generation.tenant = request.ctx.tenant
    generation = await submit_off_loop(runtime, call.generation)
    if call.stream:
        return await _stream(request, generation, fmt.ChatStream(meta, call.include_usage))
    reasoning, answer, finished = await _collect(request, generation)
    return _json(fmt.chat_completion(meta, reasoning, answer, finished), meta)


@route("/v1/responses", "POST")
async def responses(request: Request) -> HTTPResponse | None:
    runtime = _runtime(request)
    call = parse_responses(parse_json(request.body))
    check_model(call.model, runtime.model_id)
    meta = fmt.Meta(fmt.new_id("resp_"), runtime.model_id, call.generation.session_id)
    call.generation.tenant = request.ctx.tenant
    generation = await submit_off_loop(runtime, call.generation)
    if call.stream:
        return await _stream(request, generation, fmt.ResponseStream(meta, call))
    reasoning, answer, finished = await _collect(request, generation)
    return _json(fmt.response_final(meta, call, reasoning, answer, finished), meta)


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
    if runtime is None:
        raise ModelLoading("the model is still loading; retry shortly")
    return runtime


def _model_card(request: Request) -> dict[str, Any]:
    runtime = _runtime(request)
    return fmt.model_card(runtime.model_id, request.app.ctx.loaded_at, runtime.context_length)


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
        yield item
        if isinstance(item, Finished):
            return


@asynccontextmanager
async def _events(request: Request, generation) -> AsyncIterator[AsyncIterator[Event]]:
    """The generation's events, timed and counted. However the block is left (done, failed, or
    the handler cancelled because the client went away) the generation is closed: cancelled
    within one decode step if running, its session and queue place freed if it never ran."""
    ctx = request.app.ctx
    queue: asyncio.Queue = asyncio.Queue()
    pump = asyncio.create_task(_pump(ctx.metrics.observe(generation.aiter()), queue.put_nowait))
    ctx.pumps.add(pump)
    pump.add_done_callback(ctx.pumps.discard)
    try:
        yield _drain(queue, ctx)
    except asyncio.CancelledError:
        ctx.metrics.generations.labels("disconnected").inc()
        raise
    finally:
        generation.close()


async def _collect(request: Request, generation) -> tuple[str, str, Finished]:
    parts: dict[str, list[str]] = {"reasoning": [], "answer": []}
    finished = None
    async with _events(request, generation) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                parts[event.kind].append(event.text)
            else:
                finished = event
    assert finished is not None, "the runtime ends every generation with Finished"
    return "".join(parts["reasoning"]), "".join(parts["answer"]), finished


async def _stream(request: Request, generation, frames: fmt.ChatStream | fmt.ResponseStream):
    """Write an SSE stream; a failure after the headers went out is reported in-band."""
    headers = dict(SSE_HEADERS)
    if frames.meta.session_id:
        headers["X-Session-Id"] = frames.meta.session_id
    async with _events(request, generation) as events:
        response = await request.respond(content_type="text/event-stream", headers=headers)
        await response.send(frames.start())
        try:
            async for event in events:
                is_text = isinstance(event, TextDelta)
                await response.send(frames.text(event) if is_text else frames.finish(event))
        except Exception as e:
            if not isinstance(e, ShuttingDown):
                log.exception("generation failed mid-stream")
            await response.send(frames.error(map_error(e)))
        await response.eof()


# -- app -------------------------------------------------------------------------------------


class OpenAIErrorHandler(ErrorHandler):
    """Every error, Sanic's own (404, 405, 413) included, in OpenAI's shape."""

    def default(self, request: Request, exception: BaseException) -> HTTPResponse:
        exception = classify_oversized(request, exception)
        err = map_error(exception)
        if err.status >= 500 and not isinstance(exception, FermiError | asyncio.CancelledError):
            log.error("unhandled error on %s", request.path if request else "?", exc_info=exception)
        return json(fmt.error_body(err), status=err.status, headers=err.headers, dumps=fmt.dumps)


def allowed_origin(settings: Settings, origin: str | None) -> str | None:
    allowed = {o.strip() for o in settings.cors_origins.split(",") if o.strip()}
    if not origin or not allowed:
        return None
    return "*" if "*" in allowed else origin if origin in allowed else None


async def authorize(request: Request) -> None:
    """Set `request.ctx.tenant` from the bearer key; /v1 routes refuse a missing or unknown key
    with 401 when keys are configured (/health and /metrics stay open)."""
    request.ctx.tenant = ANONYMOUS
    if not request.path.startswith("/v1") or request.method == "OPTIONS":
        return
    tenant = request.app.ctx.keys.tenant_for_header(request.headers.get("authorization"))
    if tenant is None:
        raise Unauthorized("Incorrect or missing API key: send 'Authorization: Bearer <key>'")
    request.ctx.tenant = tenant


async def finish_response(request: Request, response: HTTPResponse) -> None:
    """Count the request and add CORS headers (also to streams and errors)."""
    name = f"/{request.route.path}" if request.route else "unmatched"
    request.app.ctx.metrics.requests.labels(name, str(response.status)).inc()
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
    log.info("model %s loaded (context %d)", runtime.model_id, runtime.context_length)


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
    so the process exits cleanly (a decode step cut off at exit aborts it)."""
    runtime = app.ctx.runtime
    if runtime is not None and hasattr(runtime, "shutdown"):
        await asyncio.to_thread(runtime.shutdown)


def create_app(settings: Settings, load: Callable[[Settings], Any] | None = None) -> Sanic:
    if load is None:
        from fermi.runtime import Runtime

        load = Runtime.load
    app = Sanic("fermi_openai", error_handler=OpenAIErrorHandler())
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
    app.ctx.loaded_at = 0
    app.ctx.metrics = Metrics()
    app.ctx.pumps = set()  # running _pump tasks (held so they are not collected)
    for handler, uri, method in ROUTES:
        app.add_route(handler, uri, methods=[method], name=handler.__name__)
    for i, uri in enumerate(sorted({uri for _, uri, _ in ROUTES if uri.startswith("/v1")})):
        app.add_route(preflight, uri, methods=["OPTIONS"], name=f"preflight_{i}")
    app.on_request(authorize)
    app.on_response(finish_response)

    async def start_loading(app: Sanic) -> None:
        app.add_task(load_runtime(app, load))

    app.after_server_start(start_loading)
    app.before_server_stop(start_stopping)
    app.after_server_stop(stop_generations)
    return app


def run(settings: Settings, host: str, port: int) -> None:
    """Serve until interrupted (the `fermi serve openai` command)."""
    app = create_app(settings)
    try:
        app.run(
            host=host,
            port=port,
            single_process=True,
            auto_reload=False,
            access_log=False,
            motd=False,
            protocol=GuardedProtocol,
        )
    except OSError as e:  # the address is taken or not this machine's
        raise FermiError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if app.ctx.load_error is not None:
        raise app.ctx.load_error
