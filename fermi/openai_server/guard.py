"""What keeps hostile connections from holding the HTTP server: a connection cap, a bound on
the time to receive a request (headers and body together), and request preparation (chat
template rendering and tokenization, which take seconds for a 4 MiB prompt) off the event loop.

Sanic measures its REQUEST_TIMEOUT only until the headers are in (from the last byte received)
and its RESPONSE_TIMEOUT from the last byte moved, so a client that sends headers and then stalls
or trickles its body would be held for the whole response timeout (hours: generations and queue
waits are long). `GuardedProtocol` answers 408 and closes such a connection once
`request_timeout_s` has passed since the request's first byte, the way Sanic ends its own
request timeout."""

from __future__ import annotations

import asyncio
import contextvars

from sanic.exceptions import PayloadTooLarge, RequestTimeout
from sanic.http import Stage
from sanic.server.protocols.http_protocol import HttpProtocol

from fermi.openai_server.errors import HeadersTooLarge, UriTooLong

BUSY_BODY = (
    b'{"error": {"message": "too many open connections; retry shortly", '
    b'"type": "server_error", "param": null, "code": "too_many_connections"}}'
)
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\n"
    + f"content-length: {len(BUSY_BODY)}\r\n\r\n".encode()
    + BUSY_BODY
)


class GuardedProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol with a connection cap (`app.config.FERMI_MAX_CONNECTIONS`)
    and a total time limit on receiving each request (`REQUEST_TIMEOUT`, seconds): headers
    and body together, counted from the request's first byte."""

    __slots__ = ("_refused", "_request_timer", "_silent_timer")

    def connection_made(self, transport) -> None:
        cap = self.app.config.get("FERMI_MAX_CONNECTIONS", 0)
        self._refused = bool(cap and len(self.connections) >= cap)
        self._request_timer: asyncio.TimerHandle | None = None
        self._silent_timer: asyncio.TimerHandle | None = None
        if self._refused:
            transport.write(BUSY_RESPONSE)
            transport.close()
            return
        super().connection_made(transport)
        # A connection that sends nothing is closed after the request timeout, not after the
        # keep-alive timeout Sanic gives an idle one: five silent sockets would otherwise hold
        # a cap of five for 30 s.
        self._silent_timer = self.loop.call_later(self.request_timeout, self._close_silent)

    def connection_lost(self, exc) -> None:
        for timer in (self._request_timer, self._silent_timer):
            if timer is not None:
                timer.cancel()
        if not self._refused:
            super().connection_lost(exc)

    def _close_silent(self) -> None:
        """No byte arrived within the request timeout of connecting: close, as nginx does with
        a connection that sends no request (no response: there is no request to answer)."""
        self._silent_timer = None
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._silent_timer is not None:
            self._silent_timer.cancel()
            self._silent_timer = None
        http = self.http
        if http is None or http.stage is Stage.IDLE:  # the first bytes of a request
            if self._request_timer is not None:
                self._request_timer.cancel()
            self._request_timer = self.loop.call_later(self.request_timeout, self._time_out)
        super().data_received(data)

    def _time_out(self) -> None:
        """The request began `request_timeout` seconds ago: if it is still being received,
        end it as Sanic ends its own request timeout (the connection task is cancelled with
        RequestTimeout as the error to answer: 408, `connection: close`). The rest of the
        body is not waited for, so the connection closes once the 408 is out."""
        self._request_timer = None
        http = self.http
        if http is None or self._task is None:
            return
        if http.stage is Stage.REQUEST or (http.stage is Stage.HANDLER and http.request_body):
            http.exception = RequestTimeout("Request Timeout: the request was not received in time")
            http.request_body = None  # else Sanic reads the rest of it before closing
            self._task.cancel()


async def submit_off_loop(runtime, request):
    """`runtime.submit` (template rendering, tokenization, admission) in a worker thread, so a
    huge prompt does not stall the event loop. If the handler is cancelled meanwhile (the
    client left), the generation it would have got is closed as soon as it exists, freeing its
    session and queue place."""
    return (await submit_all_off_loop(runtime, [request]))[0]


async def submit_all_off_loop(runtime, requests):
    """`runtime.submit_all` (all queued or none) off the loop, as `submit_off_loop`."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()  # the request's trace context goes along
    future = loop.run_in_executor(None, context.run, runtime.submit_all, requests)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_abandoned)
        raise


def _close_abandoned(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        for generation in future.result():
            generation.close()


def classify_oversized(request, exception: BaseException) -> BaseException:
    """Sanic answers a head (request line + headers) over REQUEST_MAX_HEADER_SIZE with the
    413 it also uses for bodies. The head was too large when Sanic could not even parse it
    (the request it reports has no route and no headers): then tell a long URL (414) from large
    headers (431) by where the first line ends."""
    if not isinstance(exception, PayloadTooLarge):
        return exception
    if request is not None and (request.route or request.headers):
        return exception  # a body over the limit
    limit = request.app.config.REQUEST_MAX_HEADER_SIZE if request is not None else 8192
    buffer = b""
    try:
        buffer = bytes(request.transport.get_protocol().recv_buffer[: limit + 2])
    except AttributeError:  # no transport or protocol left to read
        pass
    if b"\r\n" not in buffer:
        return UriTooLong(f"the request line is over the server's limit of {limit} bytes")
    return HeadersTooLarge(f"the request headers are over the server's limit of {limit} bytes")
