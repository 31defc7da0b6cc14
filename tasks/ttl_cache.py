"""A tiny per-process cache of what every request would otherwise read from Redis (a model's desired state, a
queue's depth, Redis's memory use): values expire after `ttl_s`, `clear(key)` drops one at once.

Under gevent a process holds hundreds of requests; when a value expires, every one of them would read it afresh at
the same instant (a thundering herd of identical round trips). One caller reads it; the others keep the value it
replaces until it is back. A value read before a `clear` is not stored over it: whoever cleared it (a change
announced on pub/sub) must not see the old value come back for `ttl_s`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

_MISSING = object()


class TTLCache:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._values: dict[Any, tuple[float, Any]] = {}
        self._bumps: dict[Any, int] = {}
        self._loading: set[Any] = set()
        self._generation = 0  # one more per clear: a read begun before it is not kept
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        now = time.monotonic()
        hit = self._values.get(key)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        with self._lock:
            if hit is not None and key in self._loading:
                return hit[1]  # being read afresh by another caller: the value it replaces serves meanwhile
            self._loading.add(key)
            generation = self._generation
        try:
            value = load()
        finally:
            with self._lock:
                self._loading.discard(key)
        with self._lock:
            if generation == self._generation:
                self._values[key] = (now, value)
                self._bumps.pop(key, None)
        return value

    def clear(self, key: Any = None) -> None:
        with self._lock:
            self._generation += 1
            if key is None:
                self._values.clear()
                self._bumps.clear()
            else:
                self._values.pop(key, None)
                self._bumps.pop(key, None)

    def bump(self, key: Any) -> int:
        """Count one more local change to `key` since its value was read; returns the count before it."""
        with self._lock:
            count = self._bumps.get(key, 0)
            self._bumps[key] = count + 1
            return count
