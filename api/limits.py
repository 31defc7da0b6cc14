"""Long-held requests, capped per caller and per API process.

An SSE stream, a WebSocket and a waiting request (`?wait`, and every request of the protocols that answer only
at the end: OIP infer, OpenAI /v1) each hold one of the process's gunicorn threads (AETHERCORE_API_THREADS) for
as long as they last. gthread hands every accepted connection to its thread pool, whose queue has no bound and
no priority: once every thread is held, a new connection, a liveness probe included, waits for one to free. So
the process admits long-held requests only up to two caps, decided here, before any job is created:

* per caller (api/callers.py `caller_id`: the API key or JWT subject, else the client's address), at most
  AETHERCORE_MAX_STREAMS_PER_CALLER at once: 429 `too_many_streams` beyond. Authenticated admins and operators
  (the people who run the service, and their load generators and dashboards) are not capped per caller; an
  anonymous caller (auth off) is capped by its address;
* all callers together, at most AETHERCORE_API_THREADS - AETHERCORE_RESERVED_THREADS: 503 `server_busy`
  beyond. The reserved threads only ever serve short requests, so probes and submissions find one.

Both answer at once with Retry-After, in the protocol's error shape (api/errors.py). Counted per API process
(each process has its own threads); a slot is released when its stream, socket or wait ends.
"""

from __future__ import annotations

import threading
from types import TracebackType

from api.callers import caller_id, limited_per_caller
from protocols.errors import ApiError

RETRY_AFTER_S = 5


class Slot:
    """One admitted long-held request; `release()` (or leaving its `with` block) gives it back, once."""

    __slots__ = ("_owner", "_caller", "_released")

    def __init__(self, owner: LongRequests, caller: str) -> None:
        self._owner, self._caller, self._released = owner, caller, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self._caller)

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


class LongRequests:
    def __init__(self, per_caller: int, total: int) -> None:
        self.per_caller = per_caller
        self.total = total
        self._held: dict[str, int] = {}
        self._count = 0
        self._lock = threading.Lock()

    def take(self, caller: str | None = None) -> Slot:
        """Admit one long-held request of `caller` (default: this request's caller), or raise the 429/503."""
        capped = caller is not None or limited_per_caller()
        caller = caller or caller_id()
        with self._lock:
            mine = self._held.get(caller, 0)
            if capped and mine >= self.per_caller:
                raise ApiError(
                    429,
                    "too_many_streams",
                    f"this caller already holds {mine} open streams, WebSockets or waits in this API process, "
                    f"its limit (AETHERCORE_MAX_STREAMS_PER_CALLER={self.per_caller}); close one, or poll "
                    "GET /jobs/{id} without ?wait, and retry after the Retry-After header's seconds",
                    {"limit": self.per_caller, "open": mine},
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            if self._count >= self.total:
                raise ApiError(
                    503,
                    "server_busy",
                    f"this API process holds {self._count} open streams, WebSockets and waits, all it admits "
                    "(AETHERCORE_API_THREADS - AETHERCORE_RESERVED_THREADS); retry after the Retry-After "
                    "header's seconds",
                    {"limit": self.total},
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._held[caller] = mine + 1
            self._count += 1
        return Slot(self, caller)

    def _release(self, caller: str) -> None:
        with self._lock:
            left = self._held.get(caller, 0) - 1
            if left > 0:
                self._held[caller] = left
            else:
                self._held.pop(caller, None)
            self._count = max(0, self._count - 1)

    def held(self, caller: str | None = None) -> int:
        """How many are held now: by `caller`, or by everyone."""
        with self._lock:
            return self._count if caller is None else self._held.get(caller, 0)
