"""Routing keys: which replica's cache a request wants, read from its path and JSON body.

A key names the cache a request would reuse, so that requests with the same key go to the
same replica (fermi/ray_serve/router.py places keys on a consistent-hash ring):

- `session:<id>`: a request naming a `session_id` (chat, responses) and
  `DELETE /v1/sessions/{id}`: the replica that holds that session's KV cache.
- `prefix:<sha256>`: a stock client's request without a session: a hash of the conversation's
  opening (its system/developer messages and first user message; the Responses API's
  `instructions` and first input item; the first PREFIX_CHARS characters or PREFIX_IDS token
  ids of a completion prompt). Later turns of the same conversation resend that opening, so
  they land where its prefix was prefilled before.
- None: everything else (models, health, metrics, tokenizer routes): the least loaded replica.

Only routing is decided here: the body is parsed leniently and anything unexpected gives None,
because the replica parses the same body strictly and answers bad input with its own 400."""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import unquote

PREFIX_CHARS = 1024  # characters of a completion prompt that make its prefix key
PREFIX_IDS = 256  # token ids of a completion prompt given as ids
SESSIONS_PATH = "/v1/sessions/"
OPENING_ROLES = {"system", "developer"}


def routing_key(method: str, path: str, body: bytes) -> str | None:
    """The routing key of one HTTP request (method, URL path without the query, raw body), or
    None when no replica holds anything it can reuse. Never raises."""
    if method == "DELETE" and path.startswith(SESSIONS_PATH):
        session_id = unquote(path.removeprefix(SESSIONS_PATH))
        return f"session:{session_id}" if session_id else None
    if method != "POST" or path not in OPENINGS:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    session_id = data.get("session_id")
    if isinstance(session_id, str) and session_id:
        return f"session:{session_id}"
    try:
        opening = OPENINGS[path](data)
    except (TypeError, KeyError, AttributeError):
        return None
    return None if opening is None else f"prefix:{_digest(opening)}"


def chat_opening(data: dict[str, Any]) -> list[Any] | None:
    """System and developer messages up to and including the first user message."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        return None
    opening = []
    for message in messages:
        opening.append(message)
        if message.get("role") not in OPENING_ROLES:
            break
    return opening or None


def responses_opening(data: dict[str, Any]) -> list[Any] | None:
    """`instructions` and the input's first items up to the first non-system one."""
    items = data.get("input")
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        return None
    opening: list[Any] = [data.get("instructions")]
    for item in items:
        opening.append(item)
        if not isinstance(item, dict) or item.get("role") not in OPENING_ROLES:
            break
    return opening


def completion_opening(data: dict[str, Any]) -> Any:
    """The prompt's first PREFIX_CHARS characters (or PREFIX_IDS token ids); a batch of prompts
    is keyed by its first."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt[:PREFIX_CHARS]
    if isinstance(prompt, list) and prompt:
        return prompt[:PREFIX_IDS]
    return None


OPENINGS = {
    "/v1/chat/completions": chat_opening,
    "/v1/responses": responses_opening,
    "/v1/completions": completion_opening,
}


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]
