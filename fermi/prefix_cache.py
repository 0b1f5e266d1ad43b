"""Automatic prefix caching: the KV of finished sequences stays cached, and a new request that
starts with the same tokens copies it instead of prefilling them again (vLLM's automatic prefix
caching and llama-server's prompt cache do the same for any client). A 1k-token system prompt
is prefilled once for every client that sends it.

- Entries are partitioned by tenant (the API key, fermi/security.py): a lookup only ever sees
  its own tenant's entries, so no caller can learn another's prompts from cache timing.
- A named session pins its latest entry (`Entry.session`): the entry stays while the session is
  kept; the session store (fermi/sessions.py) decides when a session goes.
- Everything else is evicted least recently used first once the entries' bytes pass
  `max_bytes` (FERMI_KV_CACHE_MB); an entry larger than that is never kept. An entry whose
  tokens are a prefix of a newer entry's adds nothing and is dropped when the newer one arrives.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from fermi.kv_pool import KVBlock


@dataclass(eq=False)
class Entry:
    tenant: str
    tokens: np.ndarray  # (T,) int32: the token ids whose KV `block` holds
    block: KVBlock
    last_used: float = field(default_factory=time.monotonic)
    session: object = None  # the session that pins it (while that session is kept)

    @property
    def nbytes(self) -> int:
        return self.block.nbytes

    @property
    def pinned(self) -> bool:
        return self.session is not None and getattr(self.session, "stored", False)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    def __init__(self, max_bytes: int, clock=time.monotonic):
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: list[Entry] = []
        self._lock = threading.Lock()
        self.hits = 0  # lookups that reused at least one token
        self.lookups = 0

    def lookup(self, tenant: str, token_ids: list[int], limit: int) -> tuple[Entry | None, int]:
        """The tenant's entry sharing the longest prefix with `token_ids`, and that length
        (at most `limit` tokens); (None, 0) when none shares a token."""
        prompt = np.asarray(token_ids, dtype=np.int32)
        best, best_length = None, 0
        with self._lock:
            self.lookups += 1
            for entry in self._entries:
                if entry.tenant != tenant:
                    continue
                length = min(common_prefix(entry.tokens, prompt), limit)
                if length > best_length:
                    best, best_length = entry, length
            if best is not None:
                best.last_used = self._clock()
                self.hits += 1
        return best, best_length

    def insert(self, tenant: str, token_ids: list[int], block: KVBlock) -> Entry:
        """Keep `block` (the KV of `token_ids`) for later lookups; evicts least recently used
        entries as needed. A block larger than `max_bytes` is not kept and evicts nothing (it
        used to push every other entry out and then go itself); a session may still pin the
        returned entry."""
        entry = Entry(tenant, np.asarray(token_ids, dtype=np.int32), block, self._clock())
        if entry.nbytes > self.max_bytes:
            return entry
        with self._lock:
            self._entries = [e for e in self._entries if not self._covered(e, entry)]
            self._entries.append(entry)
            self._evict_locked()
        return entry

    def _covered(self, old: Entry, new: Entry) -> bool:
        """`old` adds nothing beside `new`: same tenant, unpinned, its tokens a prefix."""
        return (
            old.tenant == new.tenant
            and not old.pinned
            and len(old.tokens) <= len(new.tokens)
            and common_prefix(old.tokens, new.tokens) == len(old.tokens)
        )

    def evict(self) -> None:
        with self._lock:
            self._evict_locked()

    def _evict_locked(self) -> None:
        total = sum(e.nbytes for e in self._entries)
        for entry in sorted(self._entries, key=lambda e: e.last_used):
            if total <= self.max_bytes:
                break
            if not entry.pinned:
                self._entries.remove(entry)
                total -= entry.nbytes

    def pin(self, entry: Entry, session: object) -> None:
        """`session` keeps `entry` (put back if it was evicted before the pin arrived)."""
        with self._lock:
            entry.session = session
            if entry not in self._entries:
                self._entries.append(entry)
            self._evict_locked()

    def unpin(self, entry: Entry) -> None:
        with self._lock:
            entry.session = None
            self._evict_locked()

    def remove(self, entry: Entry) -> None:
        with self._lock:
            if entry in self._entries:
                self._entries.remove(entry)

    def clear(self, tenant: str | None = None) -> None:
        """Forget every unpinned entry (of `tenant`, or of all)."""
        with self._lock:
            self._entries = [
                e for e in self._entries if e.pinned or (tenant is not None and e.tenant != tenant)
            ]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)
