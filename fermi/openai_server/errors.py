"""The one exception -> HTTP status mapping of the OpenAI server. Handlers raise; the app's error
handler and the stream writers both come here, and formatters.error_body shapes the result."""

from __future__ import annotations

from asyncio import CancelledError
from dataclasses import dataclass, field

from sanic.exceptions import SanicException

from fermi.errors import (
    ContextLengthExceeded,
    FermiError,
    GenerationTimeout,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    SessionBusy,
    SessionNotFound,
)


class Unauthorized(FermiError):
    """A /v1 route without the right `Authorization: Bearer <FERMI_API_KEY>`."""


class ModelLoading(FermiError):
    """The runtime is still loading (or failed to load)."""


class ServerDraining(FermiError):
    """The server got SIGTERM/SIGINT and finishes what is running before it stops."""


class ShuttingDown(FermiError):
    """The server is stopping and cancelled this generation (503, retry elsewhere or later)."""


class UriTooLong(FermiError):
    """The request line is longer than the server reads (414)."""


class HeadersTooLarge(FermiError):
    """The request's header block is larger than the server reads (431)."""


@dataclass(frozen=True)
class ApiError:
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


RETRY = {"Retry-After": "1"}


def map_error(exc: BaseException) -> ApiError:
    message = str(exc) or type(exc).__name__
    match exc:
        case ContextLengthExceeded():
            return ApiError(400, message, param=exc.param, code="context_length_exceeded")
        case InvalidRequest():
            return ApiError(400, message, param=exc.param)
        case ModelNotFound():
            return ApiError(404, message, param="model", code="model_not_found")
        case SessionNotFound():
            return ApiError(404, message, param="session_id", code="session_not_found")
        case SessionBusy():
            return ApiError(409, message, param="session_id", code="session_busy")
        case QueueFull():
            return ApiError(429, message, "rate_limit_error", code="queue_full", headers=RETRY)
        case Unauthorized():
            return ApiError(401, message, code="invalid_api_key")
        case GenerationTimeout():  # like a gateway's 504: the answer did not come in time
            return ApiError(504, message, "server_error", code="timeout")
        case ShuttingDown():
            return ApiError(
                503, message, "server_error", code="server_shutting_down", headers=RETRY
            )
        case UriTooLong():
            return ApiError(414, message, code="uri_too_long")
        case HeadersTooLarge():
            return ApiError(431, message, code="request_header_fields_too_large")
        case ModelLoading():
            return ApiError(503, message, "server_error", code="model_loading", headers=RETRY)
        case ServerDraining():
            return ApiError(503, message, "server_error", code="server_draining")
        case SanicException():
            return _sanic_error(exc, message)
        case CancelledError():  # the client went away; nobody will read this
            return ApiError(499, "client closed the request", code="client_closed_request")
        case _:
            return ApiError(
                500, f"internal error: {message}", "server_error", code="internal_error"
            )


SANIC_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    503: "service_unavailable",
}


def _sanic_error(exc: SanicException, message: str) -> ApiError:
    status = exc.status_code
    if status == 413:
        message = f"{message}: the request body is over the server's limit (FERMI_MAX_BODY_BYTES)"
    kind = "server_error" if status >= 500 else "invalid_request_error"
    headers = {k: str(v) for k, v in (exc.headers or {}).items()}  # 405's Allow, for one
    return ApiError(status, message, kind, code=SANIC_CODES.get(status), headers=headers)
