"""Token sampling: small pure logits transforms, request/model/Qwen default resolution, a Sampler.

Each `apply_*` function takes a 1-D float logits vector and returns a new one (the input is never
modified; a transform that has nothing to do may return its input). Masked entries become -inf.
They raise ValueError naming the allowed range; requests are validated earlier, in
`resolve_sampling`, which raises InvalidRequest naming the field.

Sampler interface (one Sampler per generation; it keeps the token counts the penalties need, so a
step costs O(distinct tokens seen) instead of re-counting the whole sequence):

    sampler = Sampler(resolve_sampling(params, generation_config, thinking), seed)
    sampler.reset(prompt_ids)            # start a sequence
    token = sampler.sample(logits)       # picks a token and records it as generated
    sampler.accept(token_id)             # record a token that was not sampled (forced), if any

A `constraint` (constrained decoding, fermi/constraints.py) is any object with
`allowed_ids(vocab)` -> the (n,) int array of token ids allowed next, or None when anything goes,
and `accept(token)`. After the penalties the draw works on the allowed ids only (a whole-vocab
top-k over mostly -inf logits would be slow: numpy's argpartition degrades on ties), and every
drawn token is passed to `accept`.

Order of operations: repetition penalty, presence/frequency penalty, then greedy argmax when
temperature is 0, else temperature, top-k, top-p, min-p and a draw from the softmax. After top-k
the later steps work on the k candidates only, so a step avoids sorting the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fermi.errors import InvalidRequest
from fermi.requests import SamplingParams

NEG_INF = np.float32(-np.inf)
TOP_P_HEAD = 1024  # apply_top_p sorts only this many candidates when they hold mass >= p

# Qwen's advice (Qwen3 model cards): thinking mode / non-thinking mode.
QWEN_THINKING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
QWEN_NON_THINKING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}


def apply_repetition_penalty(
    logits: np.ndarray, token_ids: Iterable[int], penalty: float
) -> np.ndarray:
    """HF/vLLM repetition penalty over the distinct `token_ids` (prompt + generated):
    positive logits are divided by `penalty`, negative ones multiplied."""
    if not penalty > 0:
        raise ValueError(f"repetition penalty must be > 0, got {penalty}")
    if penalty == 1.0:
        return logits
    ids = token_ids if isinstance(token_ids, np.ndarray) else list(token_ids)
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    ids = ids[ids < logits.size]  # ids the logits do not cover cannot be penalised
    if ids.size == 0:
        return logits
    out = logits.copy()
    picked = out[ids]
    out[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def apply_presence_frequency_penalty(
    logits: np.ndarray, counts: Mapping[int, int], presence: float, frequency: float
) -> np.ndarray:
    """OpenAI penalties over generated tokens: logit -= presence + frequency * count."""
    if not counts or (presence == 0 and frequency == 0):
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    inside = ids < logits.size
    out = logits.copy()
    out[ids[inside]] -= presence + frequency * n[inside]
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide by temperature (> 0; temperature 0 means greedy and is handled by the caller)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 here (0 means greedy), got {temperature}")
    return logits if temperature == 1.0 else logits / np.float32(temperature)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (exactly k; ties broken arbitrarily). k = 0 means off."""
    if k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {k}")
    if k == 0 or k >= logits.size:
        return logits
    keep = np.argpartition(logits, -k)[-k:]
    out = np.full_like(logits, NEG_INF)
    out[keep] = logits[keep]
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the most probable tokens whose cumulative probability first reaches p
    (the most probable token is always kept). p = 1 means off."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    probs = _softmax(logits)
    # Sorting a whole vocabulary is slow; the nucleus usually lies within the top few hundred.
    candidates = np.arange(probs.size)
    if probs.size > TOP_P_HEAD:
        head = np.argpartition(probs, -TOP_P_HEAD)[-TOP_P_HEAD:]
        if probs[head].sum() >= p:
            candidates = head
    order = candidates[np.argsort(-probs[candidates], kind="stable")]
    sorted_probs = probs[order]
    # A token is kept while the mass before it is still below p.
    keep = order[(np.cumsum(sorted_probs, dtype=np.float64) - sorted_probs) < p]
    out = np.full_like(logits, NEG_INF)
    out[keep] = logits[keep]
    return out


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's. 0 means off."""
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if min_p == 0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    threshold = logits.max() + np.log(np.float32(min_p))
    return np.where(logits >= threshold, logits, NEG_INF).astype(logits.dtype, copy=False)


@dataclass(frozen=True)
class ResolvedSampling:
    """Concrete sampling values for one generation (no None left)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# field -> (check, the allowed range as the user reads it after "must be")
RANGES = {
    "temperature": (lambda v: 0 <= v <= 2, "in [0, 2] (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0 (0 = off)"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: 0 < v <= 2, "in (0, 2] (1 = off)"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
}


def _valid(name: str, value: object) -> bool:
    check, _ = RANGES[name]
    return _is_number(value) and bool(check(value))  # NaN fails every comparison


def validate_sampling(params: SamplingParams) -> None:
    """Raise InvalidRequest (param = the field) for the first out-of-range request value."""
    for name in RANGES:
        value = getattr(params, name)
        if value is not None and not _valid(name, value):
            raise InvalidRequest(f"{name} must be {RANGES[name][1]}, got {value!r}", name)
    if params.seed is not None and not (isinstance(params.seed, int) and params.seed >= 0):
        raise InvalidRequest(f"seed must be a non-negative integer, got {params.seed!r}", "seed")


def resolve_sampling(
    params: SamplingParams, generation_config: Mapping[str, object] | None, thinking: bool
) -> ResolvedSampling:
    """Request values win; then the model's generation_config.json; then Qwen's advice.

    generation_config.json holds the thinking-mode values (Qwen3 ships temperature 0.6, top_p
    0.95, top_k 20), so with thinking off its temperature/top_p/top_k/min_p are not used: values
    the request leaves unset come from Qwen's non-thinking advice instead. `do_sample: false` and
    repetition_penalty are not mode-specific and apply in both modes. Invalid values in
    generation_config.json are ignored (the advice is used), never blamed on the request.
    """
    validate_sampling(params)
    config = dict(generation_config or {})
    advice = QWEN_THINKING if thinking else QWEN_NON_THINKING
    mode_specific = ("temperature", "top_p", "top_k", "min_p")

    def pick(name: str, fallback: float) -> float:
        requested = getattr(params, name)
        if requested is not None:
            return requested
        if (thinking or name not in mode_specific) and _valid(name, config.get(name)):
            return config[name]  # type: ignore[return-value]
        return fallback

    temperature = pick("temperature", advice["temperature"])
    if params.temperature is None and config.get("do_sample") is False:
        temperature = 0.0  # the model asks for greedy decoding
    return ResolvedSampling(
        temperature=float(temperature),
        top_p=float(pick("top_p", advice["top_p"])),
        top_k=int(pick("top_k", advice["top_k"])),
        min_p=float(pick("min_p", advice["min_p"])),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
    )


class Sampler:
    """Picks the next token; see the module docstring for the reset/sample/accept protocol."""

    def __init__(self, resolved: ResolvedSampling, seed: int | None = None, constraint=None):
        self.resolved = resolved
        self.constraint = constraint
        self.rng = np.random.default_rng(seed)  # seed None: fresh OS entropy
        self.reset([])

    def reset(self, prompt_ids: Iterable[int]) -> None:
        """Start a new sequence whose prompt is `prompt_ids`."""
        self._seen: set[int] = set(prompt_ids)  # distinct prompt + generated ids
        self._seen_ids = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
        self._counts: dict[int, int] = {}  # generated ids only

    def accept(self, token_id: int) -> None:
        """Record a generated token (sample() does this for the tokens it picks)."""
        self._counts[token_id] = self._counts.get(token_id, 0) + 1
        if token_id not in self._seen:
            self._seen.add(token_id)
            self._seen_ids = np.append(self._seen_ids, token_id)

    def sample(self, logits: np.ndarray) -> int:
        """Pick a token from a 1-D logits vector and record it."""
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        allowed = None
        if self.constraint is not None:
            allowed = self.constraint.allowed_ids(logits.size)
        token = self._pick(logits, allowed)
        self.accept(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        return token

    def _pick(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """Penalties over the whole vocabulary, then a draw among the `allowed` ids (all when
        None)."""
        r = self.resolved
        logits = apply_repetition_penalty(logits, self._seen_ids, r.repetition_penalty)
        logits = apply_presence_frequency_penalty(
            logits, self._counts, r.presence_penalty, r.frequency_penalty
        )
        if allowed is None:
            return self._draw(logits)
        return int(allowed[self._draw(logits[allowed])])

    def _draw(self, logits: np.ndarray) -> int:
        """An index into `logits`: greedy, or top-k, temperature, top-p, min-p and a draw."""
        r = self.resolved
        if r.greedy:
            return int(np.argmax(logits))
        # Narrow to the top-k candidates first so the rest works on k values, not the vocab.
        if 0 < r.top_k < logits.size:
            candidates = np.argpartition(logits, -r.top_k)[-r.top_k :]
            values = logits[candidates]
        else:
            candidates, values = None, logits
        values = apply_temperature(values, r.temperature)
        values = apply_min_p(apply_top_p(values, r.top_p), r.min_p)
        probs = _softmax(values.astype(np.float64))
        cumulative = np.cumsum(probs)
        # side="right" never lands on a zero-probability (masked) entry.
        index = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], "right"))
        if index >= probs.size:  # float rounding at the very top
            index = int(np.flatnonzero(probs)[-1])
        return int(candidates[index]) if candidates is not None else index
