"""Which top-level request fields each route takes, and what happens to the rest.

Every field a route's parser reads is honoured (the parser marks it as used). Of the others:
- INFORMATIONAL fields change nothing a local server does (`store`, `metadata`, `user`, ...):
  accepted, logged at debug level, ignored.
- PENDING fields (none today) would be accepted and ignored while a feature is being built.
- Any other field is refused with 400 naming it: a known OpenAI field fermi cannot honour
  (`audio`, `prediction`, `web_search_options`, ...) and a field no API defines alike. vLLM
  instead ignores unknown fields with a warning; a 400 is what tells a client that the thing it
  asked for will not happen.
"""

from __future__ import annotations

import logging

from fermi.errors import InvalidRequest

log = logging.getLogger("fermi.openai")

INFORMATIONAL = frozenset(
    {"store", "metadata", "user", "safety_identifier", "prompt_cache_key",
     "prompt_cache_retention"}
)  # fmt: skip
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
    "best_of": "best_of must equal n (or be 1)",
    "background": "background responses are not supported",
    "conversation": "stored conversations are not supported; resend the conversation in input",
    "prompt": "prompt templates are not supported",
    "max_tool_calls": "max_tool_calls is not supported",
    "truncation": "only truncation 'disabled' is supported",
}


def check_fields(data: dict, used: set[str], route: str) -> None:
    """Raise InvalidRequest for the first field of `data` that is neither used by the route's
    parser, informational, nor pending; null values count as absent."""
    for name, value in data.items():
        if value is None or name in used or name in PENDING[route]:
            continue
        if name in INFORMATIONAL:
            log.debug("ignoring informational field %s", name)
            continue
        reason = UNSUPPORTED.get(name, "unknown field for this route")
        raise InvalidRequest(f"{name}: {reason}", param=name)
