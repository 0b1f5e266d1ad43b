"""Checks on a parsed request body that JSON itself lets through: lone UTF-16 surrogates
(`"\\ud800"` is valid JSON but no valid text: it would fail later, in the tokenizer or while
writing a header) and nesting deeper than any real request needs. Each gives InvalidRequest
(400) naming the JSON path of the offending value.

Raw NUL bytes and other control characters never get this far: JSON forbids them (400 from
the parser). The escape `\\u0000` is valid text, and stays accepted: a byte-level model can
emit U+0000, and a client must be able to send its answer back in the next turn."""

from __future__ import annotations

import json
from typing import Any

from fermi.errors import InvalidRequest

MAX_DEPTH = 128  # arrays and objects inside each other


def check_body(data: Any) -> None:
    """Walk a parsed JSON value (iteratively: no recursion on hostile depth). Raises
    InvalidRequest for a string (key or value) that is not valid Unicode text, and for nesting
    deeper than MAX_DEPTH."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_DEPTH:
            raise InvalidRequest(f"the request body nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else key
                _check_text(key, child)
                stack.append((item, child, depth + 1))
        else:  # numbers need no check, and a prompt of token ids may hold a million of them
            stack.extend(
                (item, f"{path}[{i}]", depth + 1)
                for i, item in enumerate(value)
                if isinstance(item, str | dict | list)
            )


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        param = _param(path)
        raise InvalidRequest(
            f"{param or 'the body'} holds an invalid Unicode character (a lone surrogate)",
            param=param,
        ) from None


def _param(path: str) -> str | None:
    """The JSON path as safe ASCII (it may hold the hostile characters), at most 200."""
    return json.dumps(path)[1:-1][:200] or None  # JSON escapes: \u0000, \ud800
