"""Text state machines over streamed model output: stop strings, and the output channels
(reasoning, answer, tool calls) that the model's tags switch between.

Text arrives in arbitrary chunks (one token's text at a time). Both machines hold back exactly the
text that could still turn into a match, so a stop string or a tag split across chunks is never
half-emitted, and the result does not depend on where the chunks were cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def _partial_suffix(text: str, patterns: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `patterns`."""
    longest = min(len(text), max((len(p) for p in patterns), default=1) - 1)
    for n in range(longest, 0, -1):
        tail = text[-n:]
        if any(p.startswith(tail) for p in patterns):
            return n
    return 0


class StopMatcher:
    """Cuts the output before the first stop string.

    When several stops occur, the one that ends first wins (that is what a token-by-token check
    sees); on a tie, the longer one. After a hit every feed returns ("", True).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        hits = [(start + len(s), start) for s in self.stops if (start := buf.find(s)) >= 0]
        if hits:
            _, start = min(hits)  # earliest end, then earliest start (the longer stop)
            self.stopped, self._held = True, ""
            return buf[:start], True
        keep = _partial_suffix(buf, self.stops)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The output ended: what was held back is plain text after all."""
        held, self._held = self._held, ""
        return held


Channel = Literal["reasoning", "answer", "tool_call", "tool_call_end"]
Piece = tuple[Channel, str]


@dataclass(frozen=True)
class State:
    """One row of the channel table.

    channel: where this state's text goes. exits: (tag, next state) pairs. strip_head: drop the
    whitespace right after entering. trim_before_exit: drop the whitespace right before an exit
    tag. trim_at_end: drop trailing whitespace when the output ends here. decide_at_start: the
    state only looks at the very start of the output (after whitespace): an exit tag there is
    taken, anything else hands the text, verbatim, to `fallback`. A state with `closes` marks the
    end of each of its blocks with a ("tool_call_end", closing tag) piece.
    """

    channel: Channel
    exits: tuple[tuple[str, str], ...] = ()
    strip_head: bool = False
    trim_before_exit: bool = False
    trim_at_end: bool = False
    decide_at_start: bool = False
    fallback: str = ""
    closes: bool = False


def channel_table(
    reasoning_tags: tuple[str, str] | list[str] | None,
    tool_call_tags: tuple[str, str] | list[str] | None,
) -> dict[str, State]:
    """The transitions of one model family, as data (mlx-lm's TextStateMachine, vLLM's reasoning
    and tool parsers). States: "start" (the output may open a reasoning block), "reasoning",
    "answer" (verbatim), "after" (answer after a block: its leading whitespace dropped),
    "tool_call". Without tool-call tags the answer is never split; Qwen emits
    `<think>\\n...\\n</think>\\n\\n answer <tool_call>\\n{json}\\n</tool_call>`."""
    tool_exits: tuple[tuple[str, str], ...] = ()
    table: dict[str, State] = {}
    if tool_call_tags:
        open_tag, close_tag = tool_call_tags
        tool_exits = ((open_tag, "tool_call"),)
        table["tool_call"] = State("tool_call", ((close_tag, "after"),), closes=True)
    table["answer"] = State("answer", tool_exits, trim_before_exit=True)
    table["after"] = State("answer", tool_exits, strip_head=True, trim_before_exit=True)
    if reasoning_tags:
        open_tag, close_tag = reasoning_tags
        table["start"] = State(
            "answer", ((open_tag, "reasoning"),), decide_at_start=True, fallback="answer"
        )
        table["reasoning"] = State(
            "reasoning",
            ((close_tag, "after"),),
            strip_head=True,
            trim_before_exit=True,
            trim_at_end=True,
        )
    return table


QWEN_TABLE = channel_table((THINK_OPEN, THINK_CLOSE), None)


class OutputChannels:
    """Splits streamed output into channels by the tags of a `channel_table`.

    Feed text in any chunks; each feed returns (channel, text) pieces, holding back exactly the
    text that could still be the start of a tag (and whitespace that a tag would drop), so the
    result does not depend on where the chunks were cut. A block never closed stays in its
    channel to the end.

    Counting reasoning tokens: feed one token's text at a time and read `last_kind` afterwards;
    it is "reasoning" for every token from the opening tag through the closing one.
    """

    def __init__(self, table: dict[str, State], initial: str):
        if initial not in table:
            raise ValueError(f"no state {initial!r} in the channel table")
        self.table = table
        self.state = initial
        self._at_head = table[initial].strip_head
        self._held = ""
        self.last_kind: Channel = table[initial].channel

    @property
    def in_reasoning(self) -> bool:
        return self.table[self.state].channel == "reasoning"

    def feed(self, text: str) -> list[Piece]:
        kinds = {self.table[self.state].channel}
        pieces: list[Piece] = []
        buf, self._held = self._held + text, ""
        while buf:
            buf = self._step(buf, pieces)
            kinds.add(self.table[self.state].channel)
        self.last_kind = "reasoning" if "reasoning" in kinds else self.table[self.state].channel
        return _merge(pieces)

    def flush(self) -> list[Piece]:
        """The output ended: what was held back, in the channel it was in."""
        held, self._held = self._held, ""
        state = self.table[self.state]
        if state.decide_at_start:
            return [(self.table[state.fallback].channel, held)] if held else []
        if state.trim_at_end:
            held = held.rstrip()
        return [(state.channel, held)] if held else []

    def _enter(self, name: str) -> None:
        self.state = name
        self._at_head = self.table[name].strip_head

    def _step(self, buf: str, pieces: list[Piece]) -> str:
        """Consume a prefix of `buf`, append pieces, maybe change state or hold text; return
        what is left to process ("" when done)."""
        state = self.table[self.state]
        tags = [tag for tag, _ in state.exits]
        if self._at_head:
            buf = buf.lstrip()
            self._at_head = not buf
            if not buf:
                return ""
        if state.decide_at_start:
            body = buf.lstrip()
            for tag, target in state.exits:
                if body.startswith(tag):
                    self._enter(target)
                    return body[len(tag) :]
            if any(tag.startswith(body) for tag in tags):  # whitespace, or a partial tag
                self._held = buf
                return ""
            self._enter(state.fallback)
            return buf
        hits = [(at, tag, target) for tag, target in state.exits if (at := buf.find(tag)) >= 0]
        if hits:
            at, tag, target = min(hits)
            text = buf[:at]
            pieces.append((state.channel, text.rstrip() if state.trim_before_exit else text))
            if state.closes:
                pieces.append(("tool_call_end", tag))
            self._enter(target)
            return buf[at + len(tag) :]
        keep = len(buf) - _partial_suffix(buf, tags)
        if state.trim_before_exit and tags:
            keep = len(buf[:keep].rstrip())
        pieces.append((state.channel, buf[:keep]))
        self._held = buf[keep:]
        return ""


def reasoning_splitter(start_in_reasoning: bool = False) -> OutputChannels:
    """Reasoning and answer only (Qwen's `<think>` tags): reasoning until `</think>` when the
    prompt opened the block, else a `<think>` at the very start opens it."""
    return OutputChannels(QWEN_TABLE, "reasoning" if start_in_reasoning else "start")


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Drop empty pieces and join neighbours of the same kind (block ends are kept)."""
    out: list[Piece] = []
    for kind, text in pieces:
        if kind == "tool_call_end":
            out.append((kind, text))
            continue
        if not text:
            continue
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out
