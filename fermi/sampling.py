"""Token sampling: small pure logits transforms, request/model default resolution, a Sampler.

Each `apply_*` function takes a 1-D float logits vector and returns a new one (the input is never
modified; a transform that has nothing to do may return its input). Masked entries become -inf.
They raise ValueError naming the allowed range; requests are validated earlier, in
`resolve_sampling`, which raises InvalidRequest naming the field.

Sampler interface (one Sampler per generation; it keeps the token counts the penalties need, so a
step costs O(distinct tokens seen) instead of re-counting the whole sequence):

    sampler = Sampler(resolve_sampling(params, generation_config, thinking, advice), seed)
    sampler.reset(prompt_ids)            # start a sequence
    token = sampler.sample_token(logits) # SampledToken(id, logprob, top_logprobs), recorded
    token_id = sampler.sample(logits)    # the same, the id only
    sampler.accept(token_id)             # record a token that was not sampled (forced), if any

A `constraint` (constrained decoding, fermi/constraints.py) is any object with
`allowed_ids(vocab)` -> the (n,) int array of token ids allowed next, or None when anything goes,
and `accept(token)`. After the penalties and logit_bias the draw works on the allowed ids only (a
whole-vocab top-k over mostly -inf logits would be slow: numpy's argpartition degrades on ties),
and every drawn token is passed to `accept`.

Order of operations: repetition penalty, presence/frequency penalty, logit_bias, the
constraint's allowed ids, then greedy argmax when temperature is 0, else temperature, top-k,
top-p, min-p and a draw from the softmax. After top-k the later steps work on the k candidates
only, and top-p selects its nucleus by histogram passes, so no step sorts the whole vocabulary.

Logprobs (when the Sampler is built with `logprobs` set) come from the distribution the token was
drawn from: the log-softmax of the logits after penalties, logit_bias, the constraint, temperature
and the top-k/top-p/min-p filters (vLLM's `processed_logprobs`). Tokens the filters removed have
no probability and are never listed. Greedy decoding (temperature 0) reports the penalised, biased
distribution at temperature 1 with no filters, since a one-hot distribution says nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fermi.errors import InvalidRequest
from fermi.requests import SamplingParams

NEG_INF = np.float32(-np.inf)
TOP_P_SORT = 1024  # apply_top_p sorts at most this many candidates (histogram passes first)
TOP_P_BINS = 256
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound

# Defaults when neither the model nor its family says anything: OpenAI's and vLLM's.
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


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


def apply_logit_bias(
    logits: np.ndarray, bias: Mapping[int, float], force: bool = True
) -> np.ndarray:
    """OpenAI's logit_bias: add bias[id] (in [-100, 100]) to the logit of token id. -100 bans a
    token and 100 forces it (as OpenAI documents them: the effect of values in between depends
    on the model); ids beyond the logits are ignored. force=False only adds the +100 (what a
    constraint that allows none of the forced tokens falls back to)."""
    if not bias:
        return logits
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
    inside = ids < logits.size
    out = logits.copy()
    out[ids[inside]] += values[inside]
    banned = ids[inside][values[inside] <= -100]
    out[banned] = NEG_INF
    forced = ids[inside][values[inside] >= 100]
    if forced.size and force:  # only forced tokens stay (the best of them if several)
        keep = forced[np.argmax(out[forced])] if forced.size > 1 else forced[0]
        out = np.where(np.arange(out.size) == keep, out, NEG_INF).astype(np.float32)
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
    (the most probable token is always kept). p = 1 means off.

    Selection without a full sort: the logits are binned into TOP_P_BINS equal-width bins, the
    bin where the cumulative mass (from the top) reaches p is found from per-bin sums, the
    bins above it are kept whole and only that bin's members are looked at again, until at
    most TOP_P_SORT candidates remain and are sorted. Each pass is O(n) numpy work; flat logits
    (a large nucleus) cost a few passes instead of an O(V log V) sort."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    keep = _nucleus(logits, _softmax(logits.astype(np.float64)), p)
    out = np.full_like(logits, NEG_INF)
    out[keep] = logits[keep]
    return out


def _nucleus(logits: np.ndarray, probs: np.ndarray, p: float) -> np.ndarray:
    """Indices of the top-p nucleus; `probs` is the softmax of `logits` (float64)."""
    candidates = np.flatnonzero(probs > 0)
    kept: list[np.ndarray] = []
    need = p  # mass still to cover from `candidates`
    while candidates.size > TOP_P_SORT:
        values = logits[candidates]
        low, high = float(values.min()), float(values.max())
        if low == high:  # all tied: any of them will do, in index order (a stable sort's)
            count = min(candidates.size, int(np.ceil(need / probs[candidates[0]] - 1e-9)))
            kept.append(candidates[: max(count, 1)])
            return np.concatenate(kept)
        scale = TOP_P_BINS / (high - low)
        bins = np.minimum(((values - low) * scale).astype(np.int64), TOP_P_BINS - 1)
        mass = np.bincount(bins, weights=probs[candidates], minlength=TOP_P_BINS)
        above = np.cumsum(mass[::-1])[::-1] - mass  # mass of the bins above each bin
        edge = _edge_bin(above, mass, need)
        kept.append(candidates[bins > edge])
        need -= above[edge]
        candidates = candidates[bins == edge]
    order = candidates[np.argsort(-logits[candidates], kind="stable")]
    sorted_probs = probs[order]
    # A token is kept while the mass before it is still below what is needed.
    kept.append(order[(np.cumsum(sorted_probs) - sorted_probs) < need])
    return np.concatenate(kept)


def _edge_bin(above: np.ndarray, mass: np.ndarray, need: float) -> int:
    """The highest bin where the mass from the top first reaches `need` (the bin that holds
    the nucleus' last token)."""
    reached = np.flatnonzero(above + mass >= need)
    return int(reached[-1]) if reached.size else int(np.flatnonzero(mass)[0])


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
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> [-100, 100]

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
    if params.seed is not None and not (isinstance(params.seed, int) and params.seed >= -1):
        raise InvalidRequest(
            f"seed must be a non-negative integer (or -1 for a random one), got {params.seed!r}",
            "seed",
        )
    for token_id, bias in (params.logit_bias or {}).items():
        if not (isinstance(token_id, int) and token_id >= 0):
            raise InvalidRequest(
                f"logit_bias keys must be token ids, got {token_id!r}", "logit_bias"
            )
        if not (_is_number(bias) and -100 <= bias <= 100):
            raise InvalidRequest(
                f"logit_bias values must be in [-100, 100], got {bias!r} for token {token_id}",
                "logit_bias",
            )


def sampling_defaults(
    generation_config: Mapping[str, object] | None,
    advice: Mapping[str, Mapping[str, float]] | None,
    thinking: bool,
) -> tuple[dict[str, float], str]:
    """The model's default temperature, top_p, top_k, min_p and repetition_penalty for one
    request mode, and their source; the one place this is decided.

    1. "generation_config": the model's generation_config.json sets any of those values (or
       `do_sample: false`, which means greedy); it wins in both thinking modes, and what it
       leaves out is neutral.
    2. "family_advice": else the family's advice by mode, `advice` = {"thinking": {...},
       "non_thinking": {...}} (the manifest's sampling_advice, from the architecture spec).
    3. "neutral": else NEUTRAL.
    Values in generation_config.json outside the request ranges are ignored, never blamed on a
    request.
    """
    config = dict(generation_config or {})
    own = {name: config[name] for name in NEUTRAL if _valid(name, config.get(name))}
    greedy = config.get("do_sample") is False
    if own or greedy:
        values = {**NEUTRAL, **own}
        if greedy:
            values["temperature"] = 0.0  # the model asks for greedy decoding
        return values, "generation_config"
    mode = (advice or {}).get("thinking" if thinking else "non_thinking")
    if mode:
        return {**NEUTRAL, **mode}, "family_advice"
    return dict(NEUTRAL), "neutral"


def resolve_sampling(
    params: SamplingParams,
    generation_config: Mapping[str, object] | None,
    thinking: bool,
    advice: Mapping[str, Mapping[str, float]] | None = None,
) -> ResolvedSampling:
    """Request values win; the rest are the model's defaults (`sampling_defaults`)."""
    validate_sampling(params)
    defaults, _ = sampling_defaults(generation_config, advice, thinking)

    def pick(name: str) -> float:
        requested = getattr(params, name)
        return requested if requested is not None else defaults[name]

    return ResolvedSampling(
        temperature=float(pick("temperature")),
        top_p=float(pick("top_p")),
        top_k=int(pick("top_k")),
        min_p=float(pick("min_p")),
        repetition_penalty=float(pick("repetition_penalty")),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        logit_bias={int(k): float(v) for k, v in (params.logit_bias or {}).items()},
    )


@dataclass(frozen=True)
class SampledToken:
    """One sampled token. `logprob` (natural log) and `top_logprobs` ((id, logprob) pairs, most
    probable first) are None / empty when the Sampler was not asked for them; see the module
    docstring for the distribution they come from."""

    id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class Sampler:
    """Picks the next token; see the module docstring for the reset/sample/accept protocol.

    `logprobs`: None computes none; k in [0, MAX_LOGPROBS] gives each SampledToken its logprob
    and the k most probable alternatives. `constraint`: see the module docstring."""

    def __init__(
        self,
        resolved: ResolvedSampling,
        seed: int | None = None,
        logprobs: int | None = None,
        constraint=None,
    ):
        self.resolved = resolved
        self.logprobs = logprobs
        self.constraint = constraint
        # seed None or -1: fresh OS entropy
        self.rng = np.random.default_rng(None if seed is None or seed < 0 else seed)
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
        """Pick a token from a 1-D logits vector and record it; returns its id."""
        return self.sample_token(logits).id

    def sample_token(self, logits: np.ndarray) -> SampledToken:
        """Pick a token from a 1-D logits vector (V,), record it, and return it with its
        logprobs when the Sampler was asked for them."""
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        allowed = None if self.constraint is None else self.constraint.allowed_ids(logits.size)
        values, candidates = self._distribution(logits, allowed)
        index = self._draw(values)
        token = int(candidates[index]) if candidates is not None else index
        self.accept(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        if self.logprobs is None:
            return SampledToken(token)
        return _with_logprobs(token, index, values, candidates, self.logprobs)

    def _distribution(
        self, logits: np.ndarray, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The processed logits the draw uses, over `candidates` (None: the whole vocab):
        penalties and logit_bias over the whole vocabulary, then the filters over the `allowed`
        ids (all when None)."""
        r = self.resolved
        logits = apply_repetition_penalty(logits, self._seen_ids, r.repetition_penalty)
        logits = apply_presence_frequency_penalty(
            logits, self._counts, r.presence_penalty, r.frequency_penalty
        )
        biased = apply_logit_bias(logits, r.logit_bias)
        if allowed is None:
            if not (biased > NEG_INF).any():
                raise InvalidRequest("logit_bias bans every token", param="logit_bias")
            return self._filter(biased)
        if not (biased[allowed] > NEG_INF).any():
            # The tokens logit_bias forces are none of those the response format or tool call
            # allows here: the format wins, and the +100 only adds (the output stays valid).
            biased = apply_logit_bias(logits, r.logit_bias, force=False)
            if not (biased[allowed] > NEG_INF).any():
                raise InvalidRequest(
                    "logit_bias bans every token the response format or tool call allows "
                    "at this point of the output",
                    param="logit_bias",
                )
        values, candidates = self._filter(biased[allowed])
        return values, allowed if candidates is None else allowed[candidates]

    def _filter(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Greedy keeps every logit; else top-k, temperature, top-p and min-p, returning the
        surviving values and their indices into `logits` (None: all of them)."""
        r = self.resolved
        if r.greedy:
            return logits, None
        # Narrow to the top-k candidates first so the rest works on k values, not the vocab.
        if 0 < r.top_k < logits.size:
            candidates = np.argpartition(logits, -r.top_k)[-r.top_k :]
            values = logits[candidates]
        else:
            candidates, values = None, logits
        values = apply_temperature(values, r.temperature)
        values = apply_min_p(apply_top_p(values, r.top_p), r.min_p)
        if candidates is None and (r.top_p < 1 or r.min_p > 0):
            # Draw (and score) over the survivors only, not the whole vocabulary.
            candidates = np.flatnonzero(values > NEG_INF)
            values = values[candidates]
        return values, candidates

    def _draw(self, values: np.ndarray) -> int:
        if self.resolved.greedy:
            return int(np.argmax(values))
        probs = _softmax(values.astype(np.float64))
        cumulative = np.cumsum(probs)
        # side="right" never lands on a zero-probability (masked) entry.
        index = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], "right"))
        if index >= probs.size:  # float rounding at the very top
            index = int(np.flatnonzero(probs)[-1])
        return index


def log_softmax(values: np.ndarray) -> np.ndarray:
    """log(softmax(values)) in float64; -inf entries stay -inf. (..., V) -> (..., V)."""
    values = values.astype(np.float64)
    top = values.max(axis=-1, keepdims=True)
    return values - top - np.log(np.exp(values - top).sum(axis=-1, keepdims=True))


def top_entries(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k largest finite entries of a (V,) logprob vector as (index, logprob), largest
    first (ties in index order)."""
    k = min(k, int(np.isfinite(logprobs).sum()))
    if k <= 0:
        return []
    head = np.argpartition(-logprobs, k - 1)[:k] if k < logprobs.size else np.arange(k)
    head = head[np.lexsort((head, -logprobs[head]))]
    return [(int(i), float(logprobs[i])) for i in head]


def _with_logprobs(
    token: int, index: int, values: np.ndarray, candidates: np.ndarray | None, k: int
) -> SampledToken:
    logprobs = log_softmax(values)
    top = top_entries(logprobs, k)
    if candidates is not None:
        top = [(int(candidates[i]), lp) for i, lp in top]
    return SampledToken(token, float(logprobs[index]), tuple(top))
