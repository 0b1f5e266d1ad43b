"""Which fields each route takes, and what happens to the rest.

Every field a route's parser reads is honoured (the parser marks it as used). Of the others:
- INFORMATIONAL fields change nothing a local server does (`store`, `metadata`, `user`, ...):
  type-checked as OpenAI types them, then accepted, logged at debug level and ignored.
- PENDING fields (none today) would be accepted and ignored while a feature is being built.
- Any other field is refused with 400 naming it: a known OpenAI field fermi cannot honour
  (`audio`, `prediction`, `web_search_options`, ...), a field of another route (`prompt` or
  `best_of` on chat) and a field no API defines alike. vLLM instead ignores unknown fields with
  a warning; a 400 is what tells a client that the thing it asked for will not happen.

Objects inside the body that fermi parses (messages, content parts, `text`, `reasoning`,
`stream_options`, ...) follow the same rule through check_keys: a key the parser did not read
is a 400 naming its full path (`messages[0].extra`), unless the object's parser lists it as
one that clients are known to send back and that changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping
from typing import Any

from fermi.errors import InvalidRequest

log = logging.getLogger("fermi.openai")

# name -> the JSON type OpenAI gives it ("metadata": an object of at most 16 string values).
INFORMATIONAL = {
    "store": "boolean",
    "metadata": "metadata",
    "user": "string",
    "safety_identifier": "string",
    "prompt_cache_key": "string",
    "prompt_cache_retention": "string",
}
MAX_METADATA_KEYS = 16  # OpenAI's limits on metadata
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
PENDING: dict[str, frozenset[str]] = {
    "chat": frozenset(),
    "responses": frozenset(),
    "completions": frozenset(),
}
# Known OpenAI fields fermi cannot honour, with the reason a 400 gives.
UNSUPPORTED = {
    "functions": "the deprecated functions API is not supported; send tools instead",
    "function_call": "the deprecated functions API is not supported; send tool_choice instead",
    "audio": "audio output is not supported",
    "modalities": 'only ["text"] output is supported',
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "service_tier": "only the auto and default service tiers exist here",
    "verbosity": "verbosity is not supported",
    "best_of": "unknown field for this route (best_of belongs to /v1/completions)",
    "background": "background responses are not supported",
    "conversation": "stored conversations are not supported; resend the conversation in input",
    "prompt": "prompt templates are not supported",
    "max_tool_calls": "max_tool_calls is not supported",
    "truncation": "only truncation 'disabled' is supported",
}
# Where a route reads a name differently from UNSUPPORTED's reading (a field of another route).
ROUTE_UNSUPPORTED = {
    "chat": {
        "prompt": "not a chat completions field; send the conversation in messages, or a raw "
        "prompt to /v1/completions",
    },
}
UNKNOWN = "unknown field for this route"


def check_fields(data: dict, used: set[str], route: str) -> None:
    """Raise InvalidRequest for the first field of `data` that is neither used by the route's
    parser, informational, nor pending (null values count as absent), and for an informational
    field of the wrong type (check_informational)."""
    unknown = first_unknown(data, used, PENDING[route].union(INFORMATIONAL))
    if unknown is not None:
        reasons = ROUTE_UNSUPPORTED.get(route, {})
        reason = reasons.get(unknown) or UNSUPPORTED.get(unknown, UNKNOWN)
        raise InvalidRequest(f"{unknown}: {reason}", param=unknown)
    for name, value in data.items():
        if name in INFORMATIONAL:  # also where the route reads it (Responses echoes metadata)
            check_informational(name, value)
            if name not in used and value is not None:
                log.debug("ignoring informational field %s", name)


def check_keys(
    data: dict,
    used: set[str],
    where: str,
    ignored: Container[str] = (),
    reasons: Mapping[str, str] | None = None,
) -> None:
    """Raise InvalidRequest naming `where.key` for the first non-null key of the object at
    `where` that its parser did not read and that is not `ignored` (keys clients send back
    that change nothing); `reasons` words the refusal of known keys."""
    unknown = first_unknown(data, used, ignored)
    if unknown is not None:
        reason = (reasons or {}).get(unknown, "unknown field for this object")
        raise InvalidRequest(f"{where}.{unknown}: {reason}", param=f"{where}.{unknown}")


def first_unknown(data: dict, used: set[str], ignored: Container[str]) -> str | None:
    """The first key of `data` with a non-null value that is neither used nor ignored."""
    return next(
        (k for k, v in data.items() if v is not None and k not in used and k not in ignored),
        None,
    )


def check_informational(name: str, value: Any) -> None:
    """Raise InvalidRequest on `name` unless `value` (an INFORMATIONAL field's) is null or of
    the type OpenAI gives it."""
    kind = INFORMATIONAL[name]
    if value is None:
        return
    if kind == "boolean" and not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a boolean, got {type(value).__name__}", name)
    if kind == "string" and not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, got {type(value).__name__}", name)
    if kind == "metadata":
        _check_metadata(value)


def _check_metadata(value: Any) -> None:
    if not isinstance(value, dict):
        raise InvalidRequest(f"metadata must be an object, got {type(value).__name__}", "metadata")
    if len(value) > MAX_METADATA_KEYS:
        raise InvalidRequest(
            f"metadata: at most {MAX_METADATA_KEYS} keys, got {len(value)}", "metadata"
        )
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise InvalidRequest(
                f"metadata: keys are at most {MAX_METADATA_KEY_CHARS} characters, got {key!r}",
                "metadata",
            )
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE_CHARS:
            raise InvalidRequest(
                f"metadata: values must be strings of at most {MAX_METADATA_VALUE_CHARS} "
                f"characters, got {key!r}: {item!r:.40}",
                "metadata",
            )
