"""Sessions: a conversation's history plus a pin on the prefix-cache entry (fermi/prefix_cache.py)
holding the KV of the tokens it has already seen.

A new turn reuses that KV for the longest common token prefix and prefills only the rest.
Idle sessions are evicted least-recently-used first by TTL, by count and by total KV memory;
a session that is generating is never evicted. A background timer (`start_reaper`) applies the
TTL even when no request arrives.

Every session belongs to a tenant (the API key that created it, fermi/security.py): ids live
in one namespace per tenant, so another key's "abc" is a different session, and asking for a
session of another tenant is answered exactly as for one that does not exist."""

from __future__ import annotations

import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field

from fermi.errors import SessionBusy, SessionNotFound
from fermi.prefix_cache import Entry
from fermi.requests import Message
from fermi.security import ANONYMOUS, short_id


def new_session_id() -> str:
    """A server-minted session id: 128 random bits, 22 URL-safe characters."""
    return secrets.token_urlsafe(16)


@dataclass
class Session:
    id: str
    tenant: str = ANONYMOUS
    history: list[Message] = field(default_factory=list)
    cache: Entry | None = None  # its latest prefix-cache entry, pinned while the session is kept
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    persistent: bool = True  # one-shot sessions are dropped when their request ends
    # A session minted by the server for a client that named none stays "unclaimed" until the
    # client sends its id back: it expires sooner and is evicted first.
    claimed: bool = True
    stored: bool = False  # in the store: only once its first request was accepted

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0


@dataclass
class SessionLimits:
    ttl_s: float
    max_sessions: int
    max_kv_bytes: int
    unclaimed_ttl_s: float = 300.0


def _key(tenant: str, session_id: str) -> str | tuple[str, str]:
    """The store's key: the anonymous tenant's sessions are keyed by their id alone."""
    return session_id if tenant == ANONYMOUS else (tenant, session_id)


class SessionStore:
    def __init__(self, limits: SessionLimits, clock=time.monotonic):
        self.limits = limits
        self._clock = clock
        self._sessions: dict[str | tuple[str, str], Session] = {}
        # New sessions whose first request is being prepared: busy, not yet kept.
        self._pending: dict[str | tuple[str, str], Session] = {}
        self._lock = threading.Lock()
        self._reaper_stop: threading.Event | None = None

    def acquire(
        self,
        session_id: str | None,
        create: bool = True,
        tenant: str = ANONYMOUS,
        mint: bool = False,
    ) -> Session:
        """Mark a session busy and return it. A missing id makes a one-shot session, or with
        `mint` a kept one under a new server-minted id (unclaimed until the id comes back).
        A new session enters the store only at `commit`, once its request was accepted, so a
        refused request leaves nothing behind. Raises SessionBusy, SessionNotFound."""
        with self._lock:
            if session_id is None:
                sid = new_session_id()
                session = Session(id=sid, tenant=tenant, persistent=mint, claimed=not mint)
            else:
                key = _key(tenant, session_id)
                session = self._sessions.get(key) or self._pending.get(key)
                if session is None:
                    if not create:
                        raise SessionNotFound(session_id)
                    session = self._pending[key] = Session(id=session_id, tenant=tenant)
                elif session.busy:
                    raise SessionBusy(session_id)
                else:
                    session.claimed = True
            session.busy = True
            session.last_used = self._clock()
            return session

    def commit(self, session: Session) -> None:
        """The session's request was accepted: keep a new persistent session in the store."""
        with self._lock:
            key = _key(session.tenant, session.id)
            self._pending.pop(key, None)
            if session.persistent and not session.stored:
                session.stored = True
                self._sessions[key] = session

    def release(self, session: Session) -> None:
        """The request on `session` ended (or was refused: then a new session is dropped)."""
        with self._lock:
            if self._pending.get(key := _key(session.tenant, session.id)) is session:
                del self._pending[key]  # never committed: its request was refused
            session.busy = False
            session.last_used = self._clock()
            self._evict_locked()

    def reset(self, session_id: str, tenant: str = ANONYMOUS) -> Session:
        """Drop a session; returns it (its pinned KV is then the caller's to forget)."""
        with self._lock:
            key = _key(tenant, session_id)
            session = self._sessions.get(key)
            if session is None:
                raise SessionNotFound(session_id)
            if session.busy:
                raise SessionBusy(session_id)
            self._drop_locked(key)
            return session

    def evict(self) -> None:
        with self._lock:
            self._evict_locked()

    def start_reaper(self, interval_s: float | None = None) -> None:
        """Apply the TTL on a timer (a daemon thread) as well as when requests end; every
        `interval_s` seconds (default: a quarter of the shortest TTL, 0.05 to 30 s)."""
        if self._reaper_stop is not None:
            return
        shortest = min(self.limits.ttl_s, self.limits.unclaimed_ttl_s)
        interval = interval_s if interval_s is not None else min(max(shortest / 4, 0.05), 30.0)
        stop = self._reaper_stop = threading.Event()
        store = weakref.ref(self)  # the thread must not keep a dropped store (and its KV) alive

        def reap() -> None:
            while not stop.wait(interval):
                if (alive := store()) is None:
                    return
                alive.evict()
                del alive

        threading.Thread(target=reap, name="fermi-session-reaper", daemon=True).start()

    def stop_reaper(self) -> None:
        if self._reaper_stop is not None:
            self._reaper_stop.set()
            self._reaper_stop = None

    def _expired(self, session: Session, now: float) -> bool:
        ttl = self.limits.ttl_s
        if not session.claimed:
            ttl = min(ttl, self.limits.unclaimed_ttl_s)
        return not session.busy and now - session.last_used > ttl

    def _evict_locked(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            self._drop_locked(key)
        while (
            len(self._sessions) > self.limits.max_sessions
            or self._kv_bytes_locked() > self.limits.max_kv_bytes
        ):
            victim = self._victim_locked()
            if victim is None:
                break  # everything left is generating
            self._drop_locked(_key(victim.tenant, victim.id))

    def _victim_locked(self) -> Session | None:
        """The idle session to evict first: an unclaimed one, else one of the tenant holding
        the most KV memory (so one key's flood of new sessions evicts its own first), least
        recently used within. With a single tenant this is plain LRU."""
        held: dict[str, int] = {}
        for s in self._sessions.values():
            held[s.tenant] = held.get(s.tenant, 0) + s.kv_bytes + 1  # +1: count sessions too
        idle = (s for s in self._sessions.values() if not s.busy)
        return min(idle, key=lambda s: (s.claimed, -held[s.tenant], s.last_used), default=None)

    def _drop_locked(self, key) -> None:
        session = self._sessions.pop(key)
        session.stored = False

    def _kv_bytes_locked(self) -> int:
        return sum(s.kv_bytes for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        """Whether the anonymous tenant has this session (see `has` for other tenants)."""
        return self.has(session_id)

    def has(self, session_id: str, tenant: str = ANONYMOUS) -> bool:
        return _key(tenant, session_id) in self._sessions

    @property
    def kv_bytes(self) -> int:
        with self._lock:
            return self._kv_bytes_locked()

    def describe(self, session: Session) -> str:
        """How logs name a session: its id truncated."""
        return short_id(session.id)
