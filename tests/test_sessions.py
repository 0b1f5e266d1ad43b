"""Session store: busy refusal, eviction by each limit (TTL, count, KV memory), tenants'
namespaces, nothing kept for a refused request, unclaimed minted sessions, the TTL timer."""

import time

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


def use(s: SessionStore, session_id, tenant="", mint=False):
    """One accepted request on a session: acquire, commit, release."""
    session = s.acquire(session_id, tenant=tenant, mint=mint)
    s.commit(session)
    s.release(session)
    return session


def filled_cache(tokens: int) -> KVCache:
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=4, dtype=np.float32)
    cache.offset = tokens  # 2 * 1 * 1 * 4 * 4 = 32 bytes per token
    return cache


def test_busy_session_is_refused_until_released():
    s, _ = store()
    session = s.acquire("a")
    with pytest.raises(SessionBusy):  # even before its first request was accepted
        s.acquire("a")
    s.commit(session)
    with pytest.raises(SessionBusy):
        s.acquire("a")
    s.release(session)
    assert s.acquire("a") is session


def test_one_shot_sessions_are_not_kept():
    s, _ = store()
    session = use(s, None)
    assert session.id not in s and len(s) == 0


def test_reset_unknown_and_known():
    s, _ = store()
    with pytest.raises(SessionNotFound):
        s.reset("nope")
    use(s, "a")
    s.reset("a")
    assert "a" not in s


def test_ttl_eviction_skips_busy_sessions():
    s, clock = store(ttl=10)
    use(s, "idle")
    busy = s.acquire("busy")
    s.commit(busy)
    clock.now = 50
    s.evict()
    assert "idle" not in s and "busy" in s
    s.release(busy)  # released now: last_used is fresh, so it stays
    assert "busy" in s


def test_count_eviction_is_lru():
    s, clock = store(count=2)
    for i, name in enumerate(["a", "b", "c"]):
        clock.now = i
        use(s, name)
    assert "a" not in s and "b" in s and "c" in s


def test_kv_memory_eviction_is_lru():
    s, clock = store(kv=32 * 25)  # room for 25 tokens
    for i, name in enumerate(["a", "b"]):
        clock.now = i
        session = s.acquire(name)
        s.commit(session)
        session.cache = filled_cache(10)
        s.release(session)
    assert "a" in s and "b" in s
    clock.now = 5
    session = s.acquire("c")
    s.commit(session)
    session.cache = filled_cache(10)
    s.release(session)
    assert "a" not in s and "b" in s and "c" in s
    assert s.kv_bytes == 32 * 20


def test_tenants_have_separate_namespaces():
    s, _ = store()
    mine = use(s, "chat", tenant="alice")
    theirs = s.acquire("chat", tenant="bob")  # the same id: a new, empty session of bob's
    assert theirs is not mine and not theirs.history
    s.commit(theirs)
    s.release(theirs)
    with pytest.raises(SessionNotFound):  # reset answers as for a missing session
        s.reset("chat", tenant="carol")
    with pytest.raises(SessionNotFound):
        s.acquire("chat", create=False, tenant="carol")
    s.reset("chat", tenant="bob")
    assert s.has("chat", "alice") and not s.has("chat", "bob") and "chat" not in s


def test_a_refused_request_keeps_nothing_and_evicts_nothing():
    s, clock = store(count=2)
    for i, name in enumerate(["a", "b"]):
        clock.now = i
        use(s, name)
    for i in range(50):  # requests refused after acquire (queue full, context too long ...)
        s.release(s.acquire(f"flood-{i}"))
    assert len(s) == 2 and "a" in s and "b" in s
    assert not s._pending


def test_minted_sessions_are_unclaimed_until_the_id_comes_back():
    s, clock = store(count=3)
    s.limits.unclaimed_ttl_s = 5
    minted = use(s, None, mint=True)
    assert len(minted.id) >= 22 and minted.id in s and not minted.claimed
    kept = use(s, None, mint=True)
    use(s, kept.id)  # the client sent it back
    assert kept.claimed
    clock.now = 6
    s.evict()
    assert minted.id not in s and kept.id in s  # unclaimed: the shorter TTL


def test_unclaimed_sessions_are_evicted_first():
    s, clock = store(count=2)
    use(s, "claimed")
    clock.now = 1
    minted = use(s, None, mint=True)
    clock.now = 2
    use(s, "newer")
    assert minted.id not in s and "claimed" in s and "newer" in s


def test_minted_ids_are_unguessable():
    ids = {use(store()[0], None, mint=True).id for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 22 for i in ids)


def test_ttl_is_applied_by_a_timer():
    s = SessionStore(SessionLimits(ttl_s=0.2, max_sessions=10, max_kv_bytes=1 << 30))
    use(s, "idle")
    s.start_reaper(interval_s=0.05)
    try:
        deadline = time.monotonic() + 30
        while "idle" in s:  # no request ends: only the timer can evict it
            assert time.monotonic() < deadline, "the reaper never evicted the idle session"
            time.sleep(0.05)
    finally:
        s.stop_reaper()


def test_a_tenant_flooding_new_sessions_evicts_its_own_first():
    s, clock = store(count=4)
    use(s, "mine", tenant="alice")
    for i in range(20):  # bob's flood of accepted requests, each with a new id
        clock.now = 1 + i
        use(s, f"flood-{i}", tenant="bob")
    assert s.has("mine", "alice") and len(s) == 4
