"""The front: a thin ASGI pass-through between Ray Serve's HTTP proxy and the replicas.

It reads the request body (at most `max_body_bytes`), derives the routing key
(fermi/ray_serve/routing.py), forwards scope and body to a replica through `forward` and relays
the replica's ASGI messages back unchanged, adding one header, `X-Fermi-Replica`, that names
the replica which answered. Everything else (routes, validation, auth, streaming, errors) is
the replica's: the OpenAI server's own Sanic app.

What only the front can see is a replica that dies:
- before the replica accepted the request (it was routed to a replica that was already gone):
  routed again, up to `attempts` times, so that requests sent after a failure still succeed;
- after it accepted, before the response started: 503 `replica_failed`;
- during an SSE stream: the stream ends with an in-band error event (OpenAI's error shape;
  `event: error` on /v1/responses), as any failure during a stream does.

No Ray here: `forward` raises ReplicaGone for a dead replica (app.py maps Ray's errors)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from sanic.exceptions import PayloadTooLarge

from fermi.errors import FermiError
from fermi.openai_server.errors import RETRY, ApiError, map_error
from fermi.openai_server.formatters import dumps, error_body, sse
from fermi.ray_serve.bridge import Message, portable_scope
from fermi.ray_serve.routing import routing_key

log = logging.getLogger("fermi.ray")

ACCEPTED = "fermi.accepted"  # a replica's first message: {"type": ACCEPTED, "replica": name}
REPLICA_HEADER = b"x-fermi-replica"
Forward = Callable[[dict[str, Any], bytes, str | None], AsyncIterator[Message]]


class ReplicaGone(Exception):
    """The replica serving a request died or became unreachable."""


def replica_failed(detail: str) -> ApiError:
    return ApiError(
        503,
        f"the replica serving this request failed ({detail}); retry the request",
        "server_error",
        code="replica_failed",
        headers=RETRY,
    )


class Front:
    """ASGI app: `Front(forward, max_body_bytes)(scope, receive, send)`."""

    def __init__(self, forward: Forward, max_body_bytes: int, attempts: int = 3):
        self.forward = forward
        self.max_body_bytes = max_body_bytes
        self.attempts = attempts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(receive, self.max_body_bytes)
        if body is None:
            await send_error(
                send, map_error(PayloadTooLarge("Request body exceeds the size limit"))
            )
            return
        key = routing_key(scope["method"], scope["path"], body)
        await self.relay(portable_scope(scope), body, key, send)

    async def relay(self, scope: dict[str, Any], body: bytes, key: str | None, send) -> None:
        """Forward to a replica, routing again while none accepted the request."""
        for attempt in range(1, self.attempts + 1):
            messages = self.forward(scope, body, key)
            try:
                accepted = await anext(messages)
            except ReplicaGone as e:
                log.warning("no replica took %s %s (try %d): %s", scope["method"],
                            scope["path"], attempt, e)  # fmt: skip
                await asyncio.sleep(0.2 * attempt)
                continue
            except FermiError as e:  # refused before any replica took it (queue_full)
                await send_error(send, map_error(e))
                return
            await self._relay_accepted(scope, messages, accepted.get("replica", ""), send)
            return
        await send_error(send, replica_failed("no replica could take it"))

    async def _relay_accepted(self, scope, messages, replica: str, send) -> None:
        started, streaming = False, False
        try:
            async for message in messages:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message["headers"],
                               (REPLICA_HEADER, replica.encode())]}  # fmt: skip
                    started, streaming = True, _is_sse(message["headers"])
                await send(message)
        except ReplicaGone as e:
            log.error("replica %s failed during %s %s: %s", replica, scope["method"],
                      scope["path"], e)  # fmt: skip
            await _fail(scope, send, replica_failed(f"replica {replica} is gone"), started,
                        streaming)  # fmt: skip
        except Exception:  # a replica-side bug: still an OpenAI-shaped answer
            log.exception("replica %s raised during %s %s", replica, scope["method"],
                          scope["path"])  # fmt: skip
            err = ApiError(
                500, "internal error in the replica", "server_error", code="internal_error"
            )
            await _fail(scope, send, err, started, streaming)


async def _fail(scope, send, err: ApiError, started: bool, streaming: bool) -> None:
    """End a request with `err`: as the response, or in-band once a stream started."""
    if not started:
        await send_error(send, err)
    elif streaming:
        body = _sse_error(scope, err)
        await send({"type": "http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def send_error(send, err: ApiError) -> None:
    """An OpenAI-shaped error response, as the OpenAI server's error handler writes it."""
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    body = dumps(error_body(err)).encode()
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _sse_error(scope: dict[str, Any], err: ApiError) -> bytes:
    """The in-band error that ends a stream: OpenAI's `error` event on /v1/responses, an
    error chunk and [DONE] on chat and completions (as their stream formatters write it)."""
    if scope["path"] == "/v1/responses":
        event = {"type": "error", "code": err.code, "message": err.message, "param": err.param}
        return sse(event, event="error").encode()
    return (sse(error_body(err)) + "data: [DONE]\n\n").encode()


def _is_sse(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
               for k, v in headers)  # fmt: skip


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
