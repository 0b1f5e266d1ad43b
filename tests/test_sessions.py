"""Session store: busy refusal and eviction by each limit (TTL, count, KV memory)."""

import numpy as np
import pytest

from fermi.errors import SessionBusy, SessionNotFound
from fermi.kv_cache import KVCache
from fermi.sessions import SessionLimits, SessionStore


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def store(ttl=100.0, count=10, kv=1 << 30):
    clock = Clock()
    return SessionStore(SessionLimits(ttl_s=ttl, max_sessions=count, max_kv_bytes=kv), clock), clock


def filled_cache(tokens: int) -> KVCache:
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=4, dtype=np.float32)
    cache.offset = tokens  # 2 * 1 * 1 * 4 * 4 = 32 bytes per token
    return cache


def test_busy_session_is_refused_until_released():
    s, _ = store()
    session = s.acquire("a")
    with pytest.raises(SessionBusy):
        s.acquire("a")
    s.release(session)
    assert s.acquire("a") is session


def test_one_shot_sessions_are_not_kept():
    s, _ = store()
    session = s.acquire(None)
    s.release(session)
    assert session.id not in s and len(s) == 0


def test_reset_unknown_and_known():
    s, _ = store()
    with pytest.raises(SessionNotFound):
        s.reset("nope")
    s.release(s.acquire("a"))
    s.reset("a")
    assert "a" not in s


def test_ttl_eviction_skips_busy_sessions():
    s, clock = store(ttl=10)
    idle = s.acquire("idle")
    s.release(idle)
    busy = s.acquire("busy")
    clock.now = 50
    s.evict()
    assert "idle" not in s and "busy" in s
    s.release(busy)  # released now: last_used is fresh, so it stays
    assert "busy" in s


def test_count_eviction_is_lru():
    s, clock = store(count=2)
    for i, name in enumerate(["a", "b", "c"]):
        clock.now = i
        s.release(s.acquire(name))
    assert "a" not in s and "b" in s and "c" in s


def test_kv_memory_eviction_is_lru():
    s, clock = store(kv=32 * 25)  # room for 25 tokens
    for i, name in enumerate(["a", "b"]):
        clock.now = i
        session = s.acquire(name)
        session.cache = filled_cache(10)
        s.release(session)
    assert "a" in s and "b" in s
    clock.now = 5
    session = s.acquire("c")
    session.cache = filled_cache(10)
    s.release(session)
    assert "a" not in s and "b" in s and "c" in s
    assert s.kv_bytes == 32 * 20
