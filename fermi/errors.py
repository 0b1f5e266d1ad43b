"""Errors that cross the runtime boundary; each transport maps them to its own status codes."""

from __future__ import annotations


class FermiError(Exception):
    """Base class: the message is meant for the user, one line, no traceback."""


class InvalidRequest(FermiError):
    """A request field is missing or out of range; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int):
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, but the request "
            f"needs {prompt_tokens + max_new_tokens} ({prompt_tokens} in the prompt, "
            f"{max_new_tokens} for the completion).",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length


class SessionBusy(FermiError):
    def __init__(self, session_id: str):
        super().__init__(f"session {session_id!r} is busy with another request; retry when it ends")
        self.session_id = session_id


class SessionNotFound(FermiError):
    def __init__(self, session_id: str):
        super().__init__(f"session {session_id!r} does not exist (or has expired)")
        self.session_id = session_id


class GenerationTimeout(FermiError):
    """A generation ran past the server's time limit (settings.timeout_ms, from submit to the
    last token, queue wait included) and was ended by the runtime."""

    def __init__(self, timeout_ms: int):
        super().__init__(f"generation exceeded the server's time limit of {timeout_ms} ms")
        self.timeout_ms = timeout_ms


class QueueFull(FermiError):
    """The runtime's wait queue is at its bound; the client should retry later."""


class ModelNotFound(FermiError):
    """A model id or path that cannot be resolved (not cached offline, unknown id, no network)."""


class ArtifactError(FermiError):
    """An artifact directory is missing a file, has a corrupt one, or a bad manifest."""


class UnsupportedArchitecture(FermiError):
    pass


class DeviceUnavailable(FermiError):
    pass
