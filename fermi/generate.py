"""The token loop, gpt-fast style: `prefill` the prompt, then `decode_one_token` until a stop.
Below text: it knows token ids, logits and the cache, nothing about chat or transports."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np

from fermi.engine import Engine
from fermi.kv_cache import KVCache
from fermi.sampling import SampledToken, Sampler

PREFILL_CHUNK = 512  # bounds the (chunk, vocab) logits buffer and attention scratch
SCORED_CHUNK = 128  # prefill chunk when every position's logits are kept: (128, V) float32
DECODE_ROOM = 64  # positions reserved past the prompt; the cache grows in steps after that


def prefill(
    engine: Engine,
    cache: KVCache,
    token_ids: list[int],
    on_logits: Callable[[int, np.ndarray], None] | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray | None:
    """Run the prompt through the model in chunks; returns the last position's logits (V,),
    or None when `cancel` was set between two chunks (the cache then holds the chunks done).
    With `on_logits`, every position's logits are computed and handed over chunk by chunk as
    (start, (S, V) logits), `start` indexing `token_ids` (prompt logprobs need them)."""
    cache.reserve(min(cache.offset + len(token_ids) + DECODE_ROOM, engine.manifest.context_length))
    logits = None
    step = PREFILL_CHUNK if on_logits is None else min(PREFILL_CHUNK, SCORED_CHUNK)
    for start in range(0, len(token_ids), step):
        if start and cancel is not None and cancel.is_set():
            return None
        chunk = token_ids[start : start + step]
        if on_logits is None:
            logits = engine.forward(chunk, cache)
            continue
        every = engine.forward(chunk, cache, last_only=False)
        on_logits(start, every)
        logits = every[-1].copy()
    assert logits is not None, "prefill needs at least one token"
    return logits


def decode_one_token(engine: Engine, cache: KVCache, token_id: int) -> np.ndarray:
    return engine.forward([token_id], cache)


def generate_tokens(
    engine: Engine,
    cache: KVCache,
    new_prompt_ids: list[int],
    prompt_ids: list[int],
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: set[int],
    cancel: threading.Event,
    on_logits: Callable[[int, np.ndarray], None] | None = None,
) -> Iterator[SampledToken]:
    """Yield sampled tokens (with their logprobs when the sampler computes them) one by one.
    `new_prompt_ids` are the prompt tokens not yet in the cache. The consumer stops early by
    closing the generator; the loop itself ends at eos, at max_new_tokens (pass no eos ids to
    decode a fixed count), or when `cancel` is set (checked once per decode step and between
    prefill chunks). `on_logits`
    receives the prefill's logits of every position (see `prefill`)."""
    sampler.reset(prompt_ids)
    logits = prefill(engine, cache, new_prompt_ids, on_logits, cancel)
    count = 0
    while logits is not None and count < max_new_tokens and not cancel.is_set():
        token = sampler.sample_token(logits)
        count += 1
        yield token
        if token.id in eos_ids or count >= max_new_tokens:
            return
        logits = decode_one_token(engine, cache, token.id)
