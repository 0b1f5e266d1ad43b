"""Sampler transforms on hand-made vectors, default resolution, and the Sampler itself."""

from __future__ import annotations

import numpy as np
import pytest

from fermi.errors import InvalidRequest
from fermi.requests import SamplingParams
from fermi.sampling import (
    NEUTRAL,
    ResolvedSampling,
    Sampler,
    apply_min_p,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    resolve_sampling,
    sampling_defaults,
)

INF = np.inf


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def log_probs(*probs: float) -> np.ndarray:
    return np.log(np.array(probs, dtype=np.float32))


# --- transforms ---------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = vec(2.0, -2.0, 1.0, -1.0, 0.5)
    out = apply_repetition_penalty(logits, [0, 1, 1, 0], 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, -1.0, 0.5])
    np.testing.assert_allclose(logits, [2.0, -2.0, 1.0, -1.0, 0.5])  # input untouched
    assert apply_repetition_penalty(logits, [0, 1], 1.0) is logits
    assert apply_repetition_penalty(logits, [], 1.5) is logits


def test_presence_and_frequency_penalty():
    logits = vec(1.0, 1.0, 1.0, 1.0)
    out = apply_presence_frequency_penalty(logits, {1: 1, 3: 3}, presence=0.5, frequency=0.25)
    np.testing.assert_allclose(out, [1.0, 0.25, 1.0, -0.25])
    negative = apply_presence_frequency_penalty(logits, {2: 2}, presence=-1.0, frequency=0.0)
    np.testing.assert_allclose(negative, [1.0, 1.0, 2.0, 1.0])
    assert apply_presence_frequency_penalty(logits, {}, 1.0, 1.0) is logits


def test_top_k_keeps_exactly_k():
    logits = vec(0.1, 3.0, -1.0, 2.0, 0.5)
    out = apply_top_k(logits, 2)
    assert np.isfinite(out).sum() == 2
    np.testing.assert_allclose(out[[1, 3]], [3.0, 2.0])
    assert np.all(np.isneginf(out[[0, 2, 4]]))
    assert apply_top_k(logits, 0) is logits
    assert apply_top_k(logits, 10) is logits


def test_top_p_keeps_smallest_set_reaching_p():
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    assert list(np.isfinite(apply_top_p(logits, 0.7))) == [True, True, False, False]
    assert list(np.isfinite(apply_top_p(logits, 0.8))) == [True, True, False, False]
    assert list(np.isfinite(apply_top_p(logits, 0.81))) == [True, True, True, False]
    assert list(np.isfinite(apply_top_p(logits, 0.1))) == [True, False, False, False]
    assert apply_top_p(logits, 1.0) is logits


@pytest.mark.parametrize("scale", [3.0, 0.01])  # peaked (fast path) and flat (full sort)
@pytest.mark.parametrize("p", [0.3, 0.9])
def test_top_p_on_a_large_vocab_matches_a_full_sort(scale, p):
    logits = np.random.default_rng(5).normal(0, scale, 50000).astype(np.float32)
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    count = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1
    expected = np.zeros(logits.size, dtype=bool)
    expected[order[:count]] = True
    kept = np.isfinite(apply_top_p(logits, p))
    assert abs(int(kept.sum()) - count) <= 1  # float32 vs float64 rounding at the boundary
    assert (kept & ~expected).sum() <= 1 and (expected & ~kept).sum() <= 1


def test_min_p_masks_relative_to_top():
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    # threshold 0.4 * 0.5 = 0.2: keeps 0.5 and 0.3
    assert list(np.isfinite(apply_min_p(logits, 0.4))) == [True, True, False, False]
    assert list(np.isfinite(apply_min_p(logits, 0.2))) == [True, True, True, False]
    assert list(np.isfinite(apply_min_p(logits, 1.0))) == [True, False, False, False]
    assert apply_min_p(logits, 0.0) is logits


def test_temperature():
    np.testing.assert_allclose(apply_temperature(vec(1.0, -2.0), 0.5), [2.0, -4.0])


@pytest.mark.parametrize(
    "call, range_text",
    [
        (lambda x: apply_top_p(x, 0.0), "(0, 1]"),
        (lambda x: apply_top_p(x, 1.5), "(0, 1]"),
        (lambda x: apply_min_p(x, -0.1), "[0, 1]"),
        (lambda x: apply_top_k(x, -1), ">= 0"),
        (lambda x: apply_temperature(x, 0.0), "> 0"),
        (lambda x: apply_repetition_penalty(x, [0], 0.0), "> 0"),
    ],
)
def test_transforms_reject_out_of_range(call, range_text):
    with pytest.raises(ValueError, match=range_text.replace("(", r"\(").replace("[", r"\[")):
        call(vec(1.0, 2.0))


# --- resolve_sampling -----------------------------------------------------------------------

QWEN_CONFIG = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
ADVICE = {
    "thinking": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    "non_thinking": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0},
}


def test_request_values_win():
    params = SamplingParams(temperature=1.2, top_p=0.5, top_k=5, min_p=0.1, repetition_penalty=1.3)
    config = {**QWEN_CONFIG, "repetition_penalty": 1.05}
    for thinking in (True, False):
        r = resolve_sampling(params, config, thinking, ADVICE)
        assert r == ResolvedSampling(1.2, 0.5, 5, 0.1, 1.3, 0.0, 0.0)


@pytest.mark.parametrize("thinking", [True, False])
def test_generation_config_wins_in_both_modes_over_family_advice(thinking):
    config = {"temperature": 0.9, "top_p": 0.85, "top_k": 40, "repetition_penalty": 1.1}
    r = resolve_sampling(SamplingParams(top_k=7), config, thinking, ADVICE)
    assert (r.temperature, r.top_p, r.top_k, r.min_p, r.repetition_penalty) == (
        0.9,
        0.85,
        7,
        0.0,  # not in the config: neutral, not the advice
        1.1,
    )
    assert sampling_defaults(config, ADVICE, thinking)[1] == "generation_config"


def test_family_advice_only_without_generation_config_values():
    """Qwen3's advice applies to a model of that family that ships no sampling values (the eos
    ids alone are not sampling values)."""
    config = {"eos_token_id": [1, 2]}
    think = resolve_sampling(SamplingParams(), config, True, ADVICE)
    assert (think.temperature, think.top_p, think.top_k, think.min_p) == (0.6, 0.95, 20, 0.0)
    plain = resolve_sampling(SamplingParams(), None, False, ADVICE)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p) == (0.7, 0.8, 20, 0.0)
    assert plain.repetition_penalty == 1.0 and not plain.greedy
    assert sampling_defaults(config, ADVICE, True)[1] == "family_advice"


@pytest.mark.parametrize("thinking", [True, False])
def test_neutral_defaults_without_config_or_advice(thinking):
    """A family that advises nothing (Llama) and a config without sampling values: OpenAI's and
    vLLM's neutral values, whatever the thinking mode."""
    r = resolve_sampling(SamplingParams(), {"bos_token_id": 1}, thinking)
    assert (r.temperature, r.top_p, r.top_k, r.min_p, r.repetition_penalty) == (1, 1, 0, 0, 1)
    assert sampling_defaults({}, None, thinking) == (NEUTRAL, "neutral")


def test_do_sample_false_means_greedy_unless_request_sets_temperature():
    config = {"do_sample": False, "temperature": 0.6}
    assert resolve_sampling(SamplingParams(), config, True, ADVICE).greedy
    assert resolve_sampling(SamplingParams(), config, False, ADVICE).greedy
    assert resolve_sampling(SamplingParams(temperature=0.3), config, True).temperature == 0.3
    assert resolve_sampling(SamplingParams(), {"do_sample": False}, False, ADVICE).greedy


def test_invalid_generation_config_values_are_ignored():
    config = {"temperature": 7.0, "top_p": "x"}
    assert sampling_defaults(config, ADVICE, True) == (
        {**NEUTRAL, **ADVICE["thinking"]},
        "family_advice",
    )
    config["top_k"] = 30
    r = resolve_sampling(SamplingParams(), config, thinking=True, advice=ADVICE)
    assert (r.temperature, r.top_p, r.top_k) == (1.0, 1.0, 30)


@pytest.mark.parametrize(
    "field, value, range_text",
    [
        ("temperature", -0.1, "[0, 2]"),
        ("temperature", 2.5, "[0, 2]"),
        ("temperature", float("nan"), "[0, 2]"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.01, "(0, 1]"),
        ("top_k", -1, ">= 0"),
        ("top_k", 2.5, ">= 0"),
        ("min_p", 1.5, "[0, 1]"),
        ("repetition_penalty", 0.0, "(0, 2]"),
        ("repetition_penalty", 2.1, "(0, 2]"),
        ("presence_penalty", -2.5, "[-2, 2]"),
        ("frequency_penalty", 3.0, "[-2, 2]"),
        ("temperature", True, "[0, 2]"),
    ],
)
def test_invalid_request_values_name_the_param(field, value, range_text):
    with pytest.raises(InvalidRequest) as info:
        resolve_sampling(SamplingParams(**{field: value}), QWEN_CONFIG, thinking=True)
    assert info.value.param == field
    assert range_text in str(info.value)


def test_invalid_seed():
    with pytest.raises(InvalidRequest) as info:
        resolve_sampling(SamplingParams(seed=-2), None, thinking=False)
    assert info.value.param == "seed"


# --- Sampler --------------------------------------------------------------------------------


def random_logits(seed: int, size: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, size).astype(np.float32)


def draw(resolved: ResolvedSampling, seed: int | None, steps: int = 30) -> list[int]:
    sampler = Sampler(resolved, seed)
    sampler.reset([1, 2, 3])
    return [sampler.sample(random_logits(i)) for i in range(steps)]


WARM = ResolvedSampling(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)


def test_greedy_is_argmax():
    greedy = ResolvedSampling(temperature=0.0, top_p=0.9, top_k=20, min_p=0.0)
    assert draw(greedy, seed=None) == [int(np.argmax(random_logits(i))) for i in range(30)]


def test_top_k_one_equals_greedy():
    top1 = ResolvedSampling(temperature=1.5, top_p=1.0, top_k=1, min_p=0.0)
    assert draw(top1, seed=None) == [int(np.argmax(random_logits(i))) for i in range(30)]


def test_seeded_runs_repeat_and_seeds_differ():
    assert draw(WARM, seed=7) == draw(WARM, seed=7)
    assert draw(WARM, seed=7) != draw(WARM, seed=8)
    assert draw(WARM, seed=None) != draw(WARM, seed=None)


def test_sampled_tokens_respect_masks():
    resolved = ResolvedSampling(temperature=1.0, top_p=0.9, top_k=5, min_p=0.0)
    sampler = Sampler(resolved, seed=0)
    logits = random_logits(3)
    allowed = set(np.argsort(-logits)[:5].tolist())
    assert {sampler.sample(logits) for _ in range(200)} <= allowed
    # top_p alone (full vocab): only the head of the distribution is ever drawn.
    head = ResolvedSampling(temperature=1.0, top_p=0.5, top_k=0, min_p=0.0)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1].tolist())
    sampler = Sampler(head, seed=1)
    assert {sampler.sample(logits) for _ in range(200)} <= nucleus


def test_sample_distribution_follows_probabilities():
    sampler = Sampler(WARM, seed=123)
    logits = log_probs(0.7, 0.2, 0.1)
    draws = np.bincount([sampler.sample(logits) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(draws, [0.7, 0.2, 0.1], atol=0.03)


def test_sampler_penalties_use_prompt_and_generated_tokens():
    # Token 0 leads by a little; a repetition penalty on it (seen in the prompt) flips greedy.
    logits = vec(2.0, 1.9, 0.0)
    base = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    sampler = Sampler(ResolvedSampling(**base, repetition_penalty=1.2), seed=0)
    sampler.reset([0])
    assert sampler.sample(logits) == 1
    # Presence/frequency penalties apply to generated tokens only: the first pick is 0.
    sampler = Sampler(ResolvedSampling(**base, presence_penalty=0.5), seed=0)
    sampler.reset([0])
    assert [sampler.sample(logits) for _ in range(3)] == [0, 1, 0]  # then both penalised alike
    sampler = Sampler(ResolvedSampling(**base, frequency_penalty=0.3), seed=0)
    sampler.reset([0])
    assert [sampler.sample(logits) for _ in range(4)] == [0, 1, 0, 1]
    sampler.accept(0)  # a forced token counts as generated too: 0 now has 3, 1 has 2
    assert sampler.sample(logits) == 1


def test_large_vocab_step_is_fast():
    import time

    resolved = ResolvedSampling(0.6, 0.95, 20, 0.0, repetition_penalty=1.1, presence_penalty=0.5)
    sampler = Sampler(resolved, seed=0)
    sampler.reset(range(2000))
    logits = random_logits(0, 151936)
    start = time.perf_counter()
    for _ in range(50):
        sampler.sample(logits)
    assert (time.perf_counter() - start) / 50 < 0.02
