"""Logprobs in OpenAI's three shapes, from the runtime's SampledTokens.

- chat (`choices[].logprobs.content[]`) and responses (`output_text.logprobs[]`, and each
  `response.output_text.delta`'s `logprobs`): per token `{token, logprob, bytes, top_logprobs:
  [{token, logprob, bytes}]}`.
- completions (legacy): per choice `{tokens, token_logprobs, top_logprobs: [{token: logprob}],
  text_offset}`, parallel lists; a prompt's first token (with echo) has null logprobs. Each
  position's `top_logprobs` holds the sampled (or echoed) token beside the k best, as OpenAI's
  legacy completions and vLLM answer: up to k + 1 entries. Chat's and responses' `top_logprobs`
  are the k best only, as OpenAI's are; the chosen token is the entry's own `token`.
"""

from __future__ import annotations

from typing import Any

from fermi.sampling import SampledToken
from fermi.token_text import TokenText

FLOOR = -9999.0  # what OpenAI reports for a token with no probability (JSON has no -inf)


def _number(logprob: float) -> float:
    return max(logprob, FLOOR)


def _entry(text: TokenText, token_id: int, logprob: float) -> dict[str, Any]:
    token, raw = text.piece(token_id)
    return {"token": token, "logprob": _number(logprob), "bytes": list(raw)}


def token_entries(text: TokenText, tokens: list[SampledToken]) -> list[dict[str, Any]]:
    """The chat / responses list for `tokens`."""
    return [
        {
            **_entry(text, t.id, t.logprob),
            "top_logprobs": [_entry(text, i, lp) for i, lp in t.top_logprobs],
        }
        for t in tokens
    ]


class LegacyLogprobs:
    """Builds completions' parallel lists for one choice; `text_offset` counts characters
    from the start of the choice's text (the echoed prompt included)."""

    def __init__(self, text: TokenText, offset: int = 0):
        self.text = text
        self.offset = offset

    def block(self, tokens: list[SampledToken | None], ids: list[int]) -> dict[str, Any]:
        """The lists for `ids` (their SampledTokens, None where a token has no logprob)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}  # fmt: skip
        for token_id, t in zip(ids, tokens, strict=True):
            piece, _ = self.text.piece(token_id)
            out["tokens"].append(piece)
            out["token_logprobs"].append(None if t is None else _number(t.logprob))
            out["top_logprobs"].append(None if t is None else self._top(t))
            out["text_offset"].append(self.offset)
            self.offset += len(piece)
        return out

    def _top(self, t: SampledToken) -> dict[str, float]:
        """The k best and the token itself (last, where it is not among them; its own logprob
        where another id spells the same text)."""
        top = {self.text.piece(i)[0]: _number(lp) for i, lp in t.top_logprobs}
        top[self.text.piece(t.id)[0]] = _number(t.logprob)
        return top


def merge_legacy(blocks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Join LegacyLogprobs blocks into one (None when there are none)."""
    if not blocks:
        return None
    return {key: [v for b in blocks for v in b[key]] for key in blocks[0]}
