"""Text state machines over streamed model output: stop strings and the `<think>` block.

Text arrives in arbitrary chunks (one token's text at a time). Both machines hold back exactly the
text that could still turn into a match, so a stop string or a tag split across chunks is never
half-emitted, and the result does not depend on where the chunks were cut.
"""

from __future__ import annotations

from fermi.requests import TextKind

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


Piece = tuple[TextKind, str]


class ReasoningSplitter:
    """Splits output into reasoning (inside `<think>...</think>`) and answer.

    Qwen emits `<think>\\n...\\n</think>\\n\\n answer`. The reasoning excludes the tags and the
    whitespace just inside them; the answer excludes the whitespace right after `</think>`.
    With start_in_reasoning=True (the prompt already opened the block) the output is reasoning
    until `</think>`. Otherwise a `<think>` at the start (after optional whitespace) opens
    reasoning, and without one everything, verbatim, is answer. A block that is never closed is
    reasoning to the end.

    Counting reasoning tokens: feed one token's text at a time and read `last_kind` afterwards;
    it is "reasoning" for every token from `<think>` through `</think>`.
    """

    # States: "start" (deciding whether output opens with <think>), "reasoning_head" (dropping
    # whitespace after <think>), "reasoning", "answer_head" (dropping whitespace after
    # </think>), "answer".
    def __init__(self, start_in_reasoning: bool = False):
        self._state = "reasoning_head" if start_in_reasoning else "start"
        self._held = ""
        self.last_kind: TextKind = "reasoning" if start_in_reasoning else "answer"

    @property
    def in_reasoning(self) -> bool:
        return self._state in ("reasoning_head", "reasoning")

    def feed(self, text: str) -> list[Piece]:
        was_reasoning = self.in_reasoning
        pieces: list[Piece] = []
        buf, self._held = self._held + text, ""
        while buf:
            buf = getattr(self, "_" + self._state)(buf, pieces)
        self.last_kind = "reasoning" if was_reasoning or self.in_reasoning else "answer"
        return _merge(pieces)

    def flush(self) -> list[Piece]:
        held, self._held = self._held, ""
        if self._state == "start":
            return [("answer", held)] if held else []
        if self._state == "reasoning" and held.rstrip():
            return [("reasoning", held.rstrip())]
        return []

    # Each handler consumes a prefix of `buf`, appends pieces, may change state or hold text,
    # and returns what is left to process ("" when done).
    def _start(self, buf: str, pieces: list[Piece]) -> str:
        body = buf.lstrip()
        if body.startswith(THINK_OPEN):
            self._state = "reasoning_head"
            return body[len(THINK_OPEN) :]
        if THINK_OPEN.startswith(body):  # all whitespace, or a partial "<think>"
            self._held = buf
            return ""
        self._state = "answer"
        return buf

    def _reasoning_head(self, buf: str, pieces: list[Piece]) -> str:
        body = buf.lstrip()
        if body:
            self._state = "reasoning"
        return body

    def _reasoning(self, buf: str, pieces: list[Piece]) -> str:
        end = buf.find(THINK_CLOSE)
        if end >= 0:
            pieces.append(("reasoning", buf[:end].rstrip()))
            self._state = "answer_head"
            return buf[end + len(THINK_CLOSE) :]
        # Hold a possible partial "</think>" and the whitespace before it.
        keep = len(buf[: len(buf) - _partial_suffix(buf, [THINK_CLOSE])].rstrip())
        pieces.append(("reasoning", buf[:keep]))
        self._held = buf[keep:]
        return ""

    def _answer_head(self, buf: str, pieces: list[Piece]) -> str:
        body = buf.lstrip()
        if body:
            self._state = "answer"
        return body

    def _answer(self, buf: str, pieces: list[Piece]) -> str:
        pieces.append(("answer", buf))
        return ""


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Drop empty pieces and join neighbours of the same kind."""
    out: list[Piece] = []
    for kind, text in pieces:
        if not text:
            continue
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out
