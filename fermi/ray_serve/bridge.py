"""One HTTP request through an ASGI app, as a stream of ASGI messages.

A replica holds the OpenAI server's Sanic app in ASGI mode (the same routes, middleware, auth
and error mapping as `fermi serve openai`) and runs each request forwarded by the front through
`exchange`: the request's scope and whole body go in, the app's `http.response.start` and
`http.response.body` messages come out, one by one, so an SSE stream stays a stream. Leaving
the iteration early (the client went away, so Ray cancels the call) cancels the app's handler,
which closes its generation within one decode step, as a disconnect does in the plain server.

No Ray here: the module is plain asyncio, tested without a cluster."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[dict, Receive, Send], Awaitable[None]]
_END = object()
# The parts of an ASGI HTTP scope that travel from the front to a replica (plain data only).
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
              "query_string", "root_path", "headers", "client", "server")  # fmt: skip


def portable_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """The plain-data part of an ASGI HTTP scope, with `raw_path` filled in when the server
    left it out (ASGI makes it optional; Sanic reads it)."""
    portable = {key: scope[key] for key in SCOPE_KEYS if key in scope}
    portable["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    portable.setdefault("root_path", "")
    if not portable.get("raw_path"):
        portable["raw_path"] = scope["path"].encode("utf-8")
    return portable


async def exchange(app: ASGIApp, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
    """Run `app` on one request (`scope`, complete `body`) and yield its response messages
    until the last body message. Closing the iterator early cancels the app's handler."""
    out = _Outbox()
    disconnected = asyncio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        out.put(_plain(message))

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: out.put(_END))
    finished = False
    try:
        while (message := await out.get()) is not _END:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
                return
        task.result()  # the app ended without a response: its error, if it raised one
        raise RuntimeError("the app ended without sending a response")
    finally:
        if not finished and not task.done():
            disconnected.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(task)


class _Outbox:
    """The app's messages on their way out. Body messages that pile up before the caller takes
    them are joined into one: under load one Ray object carries several SSE events (each
    object costs more than its bytes), while an idle stream still sends every event at once."""

    def __init__(self):
        self._items: deque = deque()
        self._ready = asyncio.Event()

    def put(self, item) -> None:
        last = self._items[-1] if self._items else None
        if _open_body(last) and isinstance(item, dict) and item["type"] == "http.response.body":
            self._items[-1] = {**item, "body": last["body"] + item["body"]}
        else:
            self._items.append(item)
        self._ready.set()

    async def get(self):
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


def _open_body(item) -> bool:
    return isinstance(item, dict) and item["type"] == "http.response.body" and item["more_body"]


def _plain(message: Message) -> Message:
    """The message as plain data that pickles (Sanic sends its headers as a generator)."""
    if "headers" in message:
        message = {**message, "headers": [(bytes(k), bytes(v)) for k, v in message["headers"]]}
    if "body" in message:
        message = {
            **message,
            "body": bytes(message["body"]),
            "more_body": bool(message.get("more_body")),
        }
    return message


class Lifespan:
    """The ASGI lifespan protocol driven by hand: `start` runs the app's startup listeners
    (Sanic's before/after_server_start: the model starts loading), `stop` its shutdown ones
    (the runtime drains and shuts down)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._replies: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Raises RuntimeError with the app's message when its startup failed."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.ensure_future(self.app(scope, self._inbox.get, self._replies.put))
        await self._step("lifespan.startup")

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            await self._step("lifespan.shutdown")

    async def _step(self, kind: str) -> None:
        self._inbox.put_nowait({"type": kind})
        reply = await self._replies.get()
        if reply["type"] != f"{kind}.complete":
            raise RuntimeError(f"{kind} failed: {reply.get('message', '')}")
