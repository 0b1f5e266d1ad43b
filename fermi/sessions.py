"""Sessions: a conversation's history plus the KV cache of the tokens it has already seen.

A new turn reuses the cache for the longest common token prefix and prefills only the rest.
Idle sessions are evicted least-recently-used first by TTL, by count and by total KV memory;
a session that is generating is never evicted."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from fermi.errors import SessionBusy, SessionNotFound
from fermi.kv_cache import KVCache
from fermi.requests import Message


@dataclass
class Session:
    id: str
    history: list[Message] = field(default_factory=list)
    cache: KVCache | None = None
    tokens: list[int] = field(default_factory=list)  # the ids whose KV is in `cache`
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    persistent: bool = True  # one-shot sessions are dropped when their request ends

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0


@dataclass
class SessionLimits:
    ttl_s: float
    max_sessions: int
    max_kv_bytes: int


class SessionStore:
    def __init__(self, limits: SessionLimits, clock=time.monotonic):
        self.limits = limits
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def acquire(self, session_id: str | None, create: bool = True) -> Session:
        """Mark a session busy and return it; a missing id makes a new (one-shot) session."""
        with self._lock:
            if session_id is None:
                session = Session(id=uuid.uuid4().hex, persistent=False)
            else:
                session = self._sessions.get(session_id)
                if session is None:
                    if not create:
                        raise SessionNotFound(session_id)
                    session = Session(id=session_id)
                elif session.busy:
                    raise SessionBusy(session_id)
            session.busy = True
            session.last_used = self._clock()
            if session.persistent:
                self._sessions[session.id] = session
            return session

    def release(self, session: Session) -> None:
        with self._lock:
            session.busy = False
            session.last_used = self._clock()
            self._evict_locked()

    def reset(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionNotFound(session_id)
            if session.busy:
                raise SessionBusy(session_id)
            del self._sessions[session_id]

    def evict(self) -> None:
        with self._lock:
            self._evict_locked()

    def _evict_locked(self) -> None:
        now = self._clock()
        for sid in [
            s.id
            for s in self._sessions.values()
            if not s.busy and now - s.last_used > self.limits.ttl_s
        ]:
            del self._sessions[sid]
        idle = sorted((s for s in self._sessions.values() if not s.busy), key=lambda s: s.last_used)
        while idle and (
            len(self._sessions) > self.limits.max_sessions
            or self._kv_bytes_locked() > self.limits.max_kv_bytes
        ):
            del self._sessions[idle.pop(0).id]

    def _kv_bytes_locked(self) -> int:
        return sum(s.kv_bytes for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def kv_bytes(self) -> int:
        with self._lock:
            return self._kv_bytes_locked()
