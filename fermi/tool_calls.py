"""Tool calls in the model's output: the text inside the tool-call tags, parsed as it streams;
and the rules that the tool results sent back answer those calls (`check_tool_results`).

Hermes format (Qwen2.5, Qwen3, NousResearch Hermes; vLLM's `hermes` parser): each block holds
one JSON object `{"name": "...", "arguments": {...}}`. While a block streams, the name is sent as
soon as it is complete, then the arguments' JSON text fragment by fragment (the closing brace of
the outer object is held back until more text shows it was not the last one). When the block
closes, the whole object is parsed; a closed block that is not such an object is given back as
text. A block the output ends inside (max_tokens) never is: it is a call with the arguments so far
once its name is complete, else nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from fermi.errors import InvalidRequest
from fermi.requests import Message

TOOL_CALL_FORMATS = ("hermes",)
# `{"name": "<json string>", "arguments": ` with any JSON whitespace.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
# A block cut off early: the name, if complete, and whatever of the arguments followed it.
_CUT = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")(?:\s*,\s*"arguments"\s*:\s*(.*))?', re.S
)


def new_call_id() -> str:
    """OpenAI-style tool call id: `call_` and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCallPiece:
    """What one feed produces for call `index`: header (id, name) and/or argument text."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text

    def as_openai(self) -> dict:
        """OpenAI's shape of an assistant message's tool call."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class HermesToolCalls:
    """Parses successive tool-call blocks (the text between the tags) of one output.

    feed(text) -> pieces to stream now; end() closes the current block and returns
    (pieces, None) or, when the block is not a tool call, ([], its raw text with the tags).
    `calls` lists the complete calls so far.
    """

    tags: tuple[str, str] = ("<tool_call>", "</tool_call>")
    calls: list[ParsedCall] = field(default_factory=list)
    _buf: str = ""
    _id: str | None = None
    _name: str | None = None
    _sent: int = 0  # characters of arguments text already sent

    @property
    def index(self) -> int:
        return len(self.calls)

    def feed(self, text: str) -> list[ToolCallPiece]:
        self._buf += text
        pieces = []
        if self._name is None:
            head = _HEAD.match(self._buf)
            if head is None:
                return []
            try:
                name = json.loads(head.group(1))
            except ValueError:
                return []
            self._id, self._name = new_call_id(), name
            self._buf = self._buf[head.end() :]
            pieces.append(ToolCallPiece(self.index, self._id, name, ""))
        if self._sent == 0:
            self._buf = self._buf.lstrip()
        ready = _without_outer_close(self._buf)
        if len(ready) > self._sent:
            fragment, self._sent = ready[self._sent :], len(ready)
            if pieces:
                pieces[0].arguments = fragment
            else:
                pieces.append(ToolCallPiece(self.index, None, None, fragment))
        return pieces

    def end(self, closed: bool = True) -> tuple[list[ToolCallPiece], str | None]:
        """The block closed (closed=False: the output ended inside it, e.g. at max_tokens).
        An unclosed block never comes back as text: a call whose name is complete is kept with
        the arguments text it got so far (vLLM's hermes parser does the same), anything
        shorter is dropped."""
        buf, name, call_id, sent = self._buf, self._name, self._id, self._sent
        self._buf, self._name, self._id, self._sent = "", None, None, 0
        if name is None:
            pieces, plain = self._whole(buf, closed)
            return (pieces, plain) if closed or pieces else self._cut(buf)
        arguments = _without_outer_close(buf.lstrip())
        pieces = []
        if len(arguments) > sent:
            pieces.append(ToolCallPiece(self.index, None, None, arguments[sent:]))
        self.calls.append(ParsedCall(call_id, name, arguments))
        return pieces, None

    def _cut(self, text: str) -> tuple[list[ToolCallPiece], None]:
        """An unclosed block that is not a whole JSON object: its call, if the name is there."""
        match = _CUT.match(text)
        try:
            name = json.loads(match.group(1)) if match else None
        except ValueError:
            name = None
        if not isinstance(name, str):
            return [], None
        arguments = _without_outer_close((match.group(2) or "").strip())
        call = ParsedCall(new_call_id(), name, arguments)
        self.calls.append(call)
        return [ToolCallPiece(len(self.calls) - 1, call.id, call.name, arguments)], None

    def _whole(self, text: str, closed: bool) -> tuple[list[ToolCallPiece], str | None]:
        """A block whose head did not stream in the usual order: parse it whole."""
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            return [], self.tags[0] + text + (self.tags[1] if closed else "")
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call = ParsedCall(new_call_id(), obj["name"], arguments)
        self.calls.append(call)
        return [ToolCallPiece(len(self.calls) - 1, call.id, call.name, arguments)], None


def _without_outer_close(text: str) -> str:
    """The arguments text without the `}` that closes the outer object, if it ends the text."""
    body = text.rstrip()
    if body.endswith("}"):
        body = body[:-1].rstrip()
    return body


@dataclass(frozen=True)
class ToolFields:
    """How a transport names what tool-result errors blame. `where(i)`: the path of
    `messages[i]` ("messages[3]", "input[4]", "tool_results[0]"); `role` and `call_id`: the
    suffixes of a tool result's fields blamed when it answers no call / names a wrong or
    answered id; `unanswered(i, ks)`: the error for calls `ks` (indices into
    `messages[i].tool_calls`) that no tool result answers. `result`, `results`, `turn` and `before`:
    the transport's own words for a tool result, several, the turn of calls it answers, and
    where those calls are."""

    where: Callable[[int], str]
    unanswered: Callable[[int, list[int]], InvalidRequest]
    role: str = ""
    call_id: str = ".tool_call_id"
    result: str = "a tool result"
    results: str = "tool results"
    turn: str = "an assistant turn with tool_calls"
    before: str = "of the assistant turn it follows"


def check_tool_results(messages: list[Message], fields: ToolFields, first: int = 0) -> None:
    """The tool results of a conversation answer the calls before them, as OpenAI requires.

    A tool message must follow an assistant turn with tool_calls (only other tool messages may
    come between them); its tool_call_id, when it has one, must be the id of one of that turn's
    calls not answered yet; without one it answers the first call not answered yet (chat
    templates pair results with calls in order). Every call of such a turn must be answered
    before the next message that is not a tool message, or the end of the list.

    `first`: only the tool messages from `messages[first]` on are checked, and only the turns
    at or after it, or answered by them, must have every call answered (a session's earlier
    history is not judged again). Raises InvalidRequest on `where(i) + fields.role` for a tool
    message that follows no turn with calls, or whose turn has no call left to answer; on
    `where(i) + fields.call_id` for an id that is none of the turn's calls' or whose call is
    answered already; and `fields.unanswered(i, ks)` for a turn left with calls `ks`
    unanswered."""
    turn: int | None = None  # the assistant turn whose results are being read
    slots: dict[str, list[int]] = {}  # its calls' indices by id, not answered yet, last first
    first_with: dict[str, int] = {}  # the index of its first call with each id
    answered: dict[int, int] = {}  # call index -> the tool message that answered it
    next_free = 0  # no call before this index is unanswered

    def close() -> None:
        if turn is None or not (turn >= first or answered):
            return
        missing = [k for k in range(len(messages[turn].tool_calls)) if k not in answered]
        if missing:
            raise fields.unanswered(turn, missing)

    for i, message in enumerate(messages):
        if message.role != "tool":
            close()
            calls = message.tool_calls if message.role == "assistant" else None
            turn = i if calls else None
            slots, first_with, answered, next_free = {}, {}, {}, 0
            for k in reversed(range(len(calls or []))):
                call_id = calls[k].get("id")
                slots.setdefault(call_id, []).append(k)
                first_with[call_id] = k
            continue
        if i < first:
            continue
        param, id_param = fields.where(i) + fields.role, fields.where(i) + fields.call_id
        if turn is None:
            raise InvalidRequest(
                f"{param}: {fields.result} must follow {fields.turn} (only other "
                f"{fields.results} may come between them)",
                param=param,
            )
        calls = messages[turn].tool_calls
        call_id = message.tool_call_id
        if call_id is None:
            while next_free in answered:
                next_free += 1
            if next_free == len(calls):
                raise InvalidRequest(
                    f"{param}: {fields.result} without an id answers the first call not answered "
                    f"yet, and every call of {fields.where(turn)} is answered already",
                    param=param,
                )
            answered[next_free] = i
            continue
        ks = slots.get(call_id)
        if call_id not in first_with:
            raise InvalidRequest(
                f"{id_param}: {call_id!r} is not the id of a call {fields.before} ("
                f"{id_list([call.get('id') for call in calls])})",
                param=id_param,
            )
        while ks and ks[-1] in answered:  # kept in reverse: the next call with this id last
            ks.pop()
        if not ks:
            earlier = fields.where(answered[first_with[call_id]])
            raise InvalidRequest(
                f"{id_param}: {call_id!r} is answered already, by {earlier}; a tool call takes "
                "one result",
                param=id_param,
            )
        answered[ks.pop()] = i
    close()


def id_list(ids: list, limit: int = 10) -> str:
    """Ids for an error message, comma-separated; past `limit`, the first ones and a count."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown if len(ids) <= limit else f"{shown}, ... ({len(ids)} in all)"
