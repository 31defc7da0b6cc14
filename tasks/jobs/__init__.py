"""The job store: a job's record in Redis (the submit-and-poll contract's source of truth) and every change to it,
split by who uses it.

- records.py    creating and reading jobs: the API (submission, GET /jobs, waits), the batch driver, the dispatcher
- lifecycle.py  the transitions: a worker takes a job, a job ends (`Lifecycle.end_jobs`, the one way), cancel
- inflight.py   what the reaper needs: in-flight hashes, the forward-pass note, reap, reclaim, lost messages
- events.py     hearing from a job: its event stream (chunks, status, follow) and the note of its end (watch)
- follow.py     following one job's event stream to its end (replay, live, `done`), for the API's stream relay
- stream_hub.py one XREAD per API process for every followed stream; stream positions checked
- codec.py      a job's fields encoded and decoded, shared by the parts
- scripts.py    the Lua of every part (lua/*.lua), rendered once at import

`Jobs` holds the four parts over one Redis client, built once per process (api/app.py, workers/service.py); a
caller uses the part it needs (`jobs.records.get`, `jobs.lifecycle.end_jobs`), or is handed only that part.
Every key a job has expires `result_ttl` seconds after its last transition.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis

from tasks.deadletters import limits_arg
from tasks.holdings import DEAD_LETTERS, Quota
from tasks.jobs.events import Events
from tasks.jobs.inflight import Inflight
from tasks.jobs.lifecycle import Lifecycle
from tasks.jobs.records import Records


class Jobs:
    """The job store's parts for one process."""

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int,
        dead_letter_ttl: int = 7 * 86400,
        dead_letter_max: int = 10_000,
        quotas: Mapping[str, Quota] | None = None,
    ) -> None:
        """`ttl_s`: a job's retention after its end (AETHERCORE_RESULT_TTL) unless it asked for its own; `quotas`:
        each kind's per-owner limits (tasks/holdings.py quotas_from): the dead letters an end writes and the
        Idempotency-Keys a creation takes are charged and bounded with them, the dead letters also by
        `dead_letter_ttl` and `dead_letter_max` per queue."""
        self.redis = client
        self.quotas = dict(quotas or {})
        dead_letters = limits_arg(dead_letter_ttl, dead_letter_max, self.quotas.get(DEAD_LETTERS, Quota()))
        self.records = Records(client, ttl_s, self.quotas)
        self.lifecycle = Lifecycle(client, ttl_s, dead_letters)
        self.inflight = Inflight(client)
        self.events = Events(client, ttl_s)
