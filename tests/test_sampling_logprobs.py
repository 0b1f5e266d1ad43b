"""The sampler's logprobs, logit_bias and top-p selection, on hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest

from fermi import sampling
from fermi.errors import InvalidRequest
from fermi.requests import SamplingParams
from fermi.sampling import (
    ResolvedSampling,
    Sampler,
    apply_logit_bias,
    apply_top_p,
    log_softmax,
    validate_sampling,
)

GREEDY = ResolvedSampling(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
HOT = ResolvedSampling(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)


def full_sort_nucleus(logits: np.ndarray, p: float) -> set[int]:
    """The textbook definition: sort everything, keep while the mass before is below p."""
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    return set(order[before < p].tolist())


@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 8.0])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.95, 0.999])
def test_top_p_keeps_exactly_the_sorted_nucleus(scale, p):
    logits = (np.random.default_rng(7).normal(size=50_000) * scale).astype(np.float32)
    kept = set(np.flatnonzero(np.isfinite(apply_top_p(logits, p))).tolist())
    assert kept == full_sort_nucleus(logits, p)


def test_top_p_on_tied_logits_keeps_enough_of_them():
    kept = np.isfinite(apply_top_p(np.zeros(10_000, np.float32), 0.25))
    assert kept.sum() == 2500 and kept[:2500].all()


def test_top_p_never_sorts_the_whole_vocabulary(monkeypatch):
    sizes = []
    real = np.argsort

    def spy(a, *args, **kwargs):
        sizes.append(np.size(a))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(sampling.np, "argsort", spy)
    flat = (np.random.default_rng(1).normal(size=151_936) * 0.1).astype(np.float32)
    apply_top_p(flat, 0.95)
    assert sizes and max(sizes) <= sampling.TOP_P_SORT


def test_logit_bias_bans_forces_and_shifts():
    logits = np.array([3.0, 2.0, 1.0, 0.0], np.float32)
    assert np.isneginf(apply_logit_bias(logits, {0: -100})[0])
    forced = apply_logit_bias(logits, {3: 100})
    assert np.isfinite(forced).tolist() == [False, False, False, True]
    assert apply_logit_bias(logits, {2: 5.0})[2] == 6.0
    sampler = Sampler(ResolvedSampling(**{**HOT.__dict__, "logit_bias": {0: -100}}), seed=0)
    assert 0 not in {sampler.sample(logits) for _ in range(200)}
    sampler = Sampler(ResolvedSampling(**{**HOT.__dict__, "logit_bias": {2: 100}}), seed=0)
    assert {sampler.sample(logits) for _ in range(50)} == {2}


@pytest.mark.parametrize(
    "bias", [{1: 101}, {1: -100.5}, {-1: 3}, {"7": 1}, {1: True}, {1: float("nan")}]
)
def test_logit_bias_out_of_range_names_the_field(bias):
    with pytest.raises(InvalidRequest) as e:
        validate_sampling(SamplingParams(logit_bias=bias))
    assert e.value.param == "logit_bias"


def test_seed_minus_one_is_a_random_seed():
    validate_sampling(SamplingParams(seed=-1))
    logits = np.zeros(1000, np.float32)
    runs = {tuple(Sampler(HOT, -1).sample(logits) for _ in range(5)) for _ in range(4)}
    assert len(runs) > 1
    with pytest.raises(InvalidRequest):
        validate_sampling(SamplingParams(seed=-2))


def test_greedy_logprobs_are_the_model_distribution():
    logits = np.array([0.5, 2.0, -1.0, 1.0], np.float32)
    token = Sampler(GREEDY, logprobs=3).sample_token(logits)
    expected = log_softmax(logits)
    assert token.id == 1 and token.logprob == pytest.approx(expected[1])
    assert [i for i, _ in token.top_logprobs] == [1, 3, 0]
    assert [lp for _, lp in token.top_logprobs] == pytest.approx(expected[[1, 3, 0]])


def test_sampled_logprobs_come_from_the_filtered_distribution():
    logits = np.random.default_rng(3).normal(size=500).astype(np.float32)
    resolved = ResolvedSampling(temperature=0.7, top_p=0.9, top_k=20, min_p=0.0)
    sampler = Sampler(resolved, seed=5, logprobs=20)
    for _ in range(20):
        token = sampler.sample_token(logits)
        top = dict(token.top_logprobs)
        assert token.id in top and top[token.id] == pytest.approx(token.logprob)
        assert set(top) <= set(np.argsort(-logits)[:20].tolist())  # only top-k survivors
        assert sum(np.exp(list(top.values()))) == pytest.approx(1.0)  # the nucleus is whole
        lps = [lp for _, lp in token.top_logprobs]
        assert lps == sorted(lps, reverse=True)


def test_no_logprobs_unless_asked():
    token = Sampler(HOT, seed=0).sample_token(np.zeros(10, np.float32))
    assert token.logprob is None and token.top_logprobs == ()
    token = Sampler(HOT, seed=0, logprobs=0).sample_token(np.zeros(10, np.float32))
    assert token.logprob == pytest.approx(np.log(0.1)) and token.top_logprobs == ()
