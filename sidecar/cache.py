"""Small local caches for the request path, each bounded in size and in how
stale it can be.

Tollway promises that a revocation, a plan change or a cancellation reaches
every sidecar within one second, so nothing here lives longer than that
(MAX_STALENESS). Entries are dropped oldest-first when a cache is full.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, Generic, TypeVar

__all__ = ["MAX_STALENESS", "TtlCache"]

MAX_STALENESS: Final = 1.0  # seconds: the promise to customers and operators

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(
        self,
        *,
        ttl: float = MAX_STALENESS,
        max_size: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = min(ttl, MAX_STALENESS)
        self._max_size = max_size
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] > self._clock():
                self.hits += 1
                return entry[1]
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: K, value: V, *, ttl: float | None = None) -> None:
        """Keeps value for ttl seconds (never longer than the cache's own ttl)."""
        life = self._ttl if ttl is None else min(ttl, self._ttl)
        if life <= 0:
            return
        now = self._clock()
        entries = self._entries
        entries.pop(key, None)  # re-inserted last: the dict stays in order of puts
        # Expired entries go as new ones come, oldest first, so a stream of
        # distinct keys keeps the cache at (rate x ttl) entries, not max_size.
        for _ in range(2):
            oldest = next(iter(entries), None)
            if oldest is None or entries[oldest][0] > now:
                break
            del entries[oldest]
        if len(entries) >= self._max_size:
            del entries[next(iter(entries))]  # the oldest put
        entries[key] = (now + life, value)

    def expires_in(self, key: K) -> float:
        """Seconds until key's entry expires (0 if absent)."""
        entry = self._entries.get(key)
        return max(0.0, entry[0] - self._clock()) if entry else 0.0

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
