"""The OpenAI Batch API's state, all of it in Redis: a batch's record, its lines in flight, its answers.

```
batch_key(id)        hash: the Batch object's fields, counts, `next_line` (the first line not taken yet), the
                     owner (id, role, address) its lines run as, `stopping` (cancel | expire | revoked),
                     `hold_until`, `stored_bytes` (what its two files hold), `step_failures` and `failures:<line>`
                     (unexpected exceptions so far, batches/driver.py)
batch_jobs_key(id)   hash: line -> job id, or `-` (taken, not submitted yet): the lines taken and not answered
file_lines_key(out)  the output file's lines: line -> its answer (a success)       } ids reserved at creation,
file_lines_key(err)  the error file's lines: line -> its answer (an error)         } published when it ends
BATCHES_ACTIVE       set: the batches that have not ended (what the batch drivers advance)
BATCHES_WAKE         list: "look now" notes for idle drivers (a batch created or cancelled), bounded
BATCH_DRIVERS        sorted set: the drivers' heartbeats
```

Every step that changes a batch is one Lua script here, so any number of drivers (batches/driver.py, each a
`manage.py batches` process), that die at any moment, leave a consistent batch behind:

* `answer` writes a line's answer into the output or the error file **only if the line has none yet** (in either
  file), counts it and forgets the line's job: each line is answered exactly once, however often its job ran;
* `claim` takes the next lines (the cursor moves in the same step), `record` notes a line's job only if the line is
  still waiting for one (an answer or a cancel may have come first);
* `transition` moves the status only from the states it names (cancel and the driver's ending never both win),
  and `end` only once every line is answered (or, `force`, when the batch's deadline passed with lines unanswered).

What a batch makes the service keep is charged to its owner in the same steps (tasks/holdings.py): its record, with
its error list, as kind BATCHES at `create` (the owner's AETHERCORE_BATCHES_MAX_KEPT; sized again and given the
retention's expiry at `end`); its output and error files as kind OUTPUTS at each `answer`, one object per file (the
file's id, so deleting the file drops it), within AETHERCORE_BATCH_OUTPUT_MAX_BYTES per batch and the owner's
AETHERCORE_OUTPUTS_QUOTA; its webhook delivery as kind DELIVERIES, queued by the `end` step itself.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from batches.files import INDEX_SLACK_S, cursor_page
from tasks.holdings import BATCHES, DELIVERIES, OUTPUTS, Holdings, with_holdings
from tasks.names import (
    BATCH_DRIVERS,
    BATCHES_ACTIVE,
    BATCHES_ALL,
    BATCHES_WAKE,
    BATCHES_WAKE_MAX,
    DELIVERY_ID_PREFIX,
    KEEP_DELIVERY_S,
    WEBHOOKS_DUE,
    batch_jobs_key,
    batch_key,
    batch_lease_key,
    batches_active_key,
    batches_index_key,
    file_key,
    file_lines_key,
    webhook_delivery_key,
)
from tasks.script_batch import ScriptBatch

DELIVERY_KIND = "batch"  # a batch's webhook delivery's `kind` (the dispatcher builds its body with `webhook_body`)

# -- the Batch object's statuses (OpenAI's), defined once ---------------------------------------------------------
VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
ENDED = (COMPLETED, FAILED, EXPIRED, CANCELLED)
STATUSES = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING, *ENDED)
# the timestamp each status is entered with
STATUS_TIME = {
    IN_PROGRESS: "in_progress_at",
    FINALIZING: "finalizing_at",
    COMPLETED: "completed_at",
    FAILED: "failed_at",
    EXPIRED: "expired_at",
    CANCELLING: "cancelling_at",
    CANCELLED: "cancelled_at",
}
# why a batch stops early: the caller cancelled it, or its completion window ended
STOP_CANCEL = "cancel"
STOP_EXPIRE = "expire"
STOP_REVOKED = "revoked"  # its owner's credentials were revoked: it is cancelled

BATCH_ID_RE = re.compile(r"^batch_[0-9a-f]{32}$")
COMPLETION_WINDOWS = {"24h": 86400}
NOT_SUBMITTED = "-"
OUTPUT, ERROR = "out", "err"

# What `create` answers besides the account's refusals (tasks/holdings.py: -1, -2, -3).
CREATED, NO_FILE, TOO_MANY_ACTIVE = 1, -4, -5
# Bytes a record is charged beyond its fields' and values' own (Redis's per-key and per-field overhead, roughly).
RECORD_OVERHEAD = 256
# What a webhook delivery's hash holds besides its body (the batch object, charged as the record's size).
DELIVERY_OVERHEAD = 512

# Every change to a batch is one Lua step (batches/lua/*.lua, read once at import; `$NAME` placeholders filled in
# by `_render` from the constants above, an account's functions put in front by tasks/holdings.py `with_holdings`).
LUA_DIR = Path(__file__).with_name("lua")


def _lua(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


_CREATE = with_holdings(_lua("create"))
_TRANSITION = _lua("transition")
_END = with_holdings(_lua("record_size") + _lua("end"))
_CLAIM = _lua("claim")
_RECORD = _lua("record")
_ANSWER = with_holdings(_lua("answer"))
_LEASE = _lua("lease")
_RELEASE = _lua("release")

# A wake note nobody takes (no driver runs) goes with this.
WAKE_TTL_S = 60
DRIVER_FRESH_S = 10  # a driver counts as alive this long after its last heartbeat (/health, the healthcheck)


@dataclass(frozen=True)
class Answer:
    """A line's entry in the output file (`OUTPUT`) or the error file (`ERROR`): `stored` is what Redis keeps,
    `size` its length as read (batches/files.py `rendered`); `short` (and `short_size`) the entry written in the error
    file instead when it does not fit the batch's cap or its owner's quota (`output_limit_reached`)."""

    line: int
    file: str
    stored: str
    size: int
    short: str
    short_size: int
    input_tokens: int = 0
    output_tokens: int = 0


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def _flat(fields: dict[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]


def _render(script: str) -> str:
    """The scripts name keys, kinds and codes through the Python constants: `$NAME` is filled in here."""
    values = {
        "BATCH_PREFIX": batch_key(""),
        "BATCHES": BATCHES,
        "OUTPUTS": OUTPUTS,
        "DELIVERIES": DELIVERIES,
        "DELIVERY_ID_PREFIX": DELIVERY_ID_PREFIX,
        "DELIVERY_KIND": DELIVERY_KIND,
        "DELIVERY_PREFIX": webhook_delivery_key(""),
        "WEBHOOKS_DUE": WEBHOOKS_DUE,
        "KEEP_DELIVERY_S": str(KEEP_DELIVERY_S),
        "RECORD_OVERHEAD": str(RECORD_OVERHEAD),
        "DELIVERY_OVERHEAD": str(DELIVERY_OVERHEAD),
        "CREATED": str(CREATED),
        "NO_FILE": str(NO_FILE),
        "TOO_MANY_ACTIVE": str(TOO_MANY_ACTIVE),
    }
    return re.sub(r"\$([A-Z_]+)", lambda m: values[m.group(1)], script)


class BatchStore:
    def __init__(self, client: redis.Redis, retention_s: int, holdings: Holdings) -> None:
        self.redis = client
        self.retention_s = retention_s
        self.holdings = holdings
        self._create = client.register_script(_render(_CREATE))
        self._transition = client.register_script(_TRANSITION)
        self._end = client.register_script(_render(_END))
        self._claim = client.register_script(_CLAIM)
        self._record = client.register_script(_RECORD)
        self._answer = client.register_script(_render(_ANSWER))
        self._lease = client.register_script(_LEASE)
        self._release = client.register_script(_RELEASE)

    def ttl(self, batch: dict[str, Any]) -> int:
        """How long a batch's keys live while it runs: to the end of its window, then its retention."""
        return max(60, int(batch["expires_at"]) - int(time.time())) + self.retention_s

    # -- creation and the status ------------------------------------------------------------------------
    def create(self, fields: dict[str, Any], input_file: str, max_active: int) -> int:
        """CREATED, NO_FILE or TOO_MANY_ACTIVE; QuotaExceeded (nothing written) when the owner keeps
        AETHERCORE_BATCHES_MAX_KEPT batches already, or every caller's objects fill their share of Redis."""
        owner, batch_id = fields["owner"], fields["id"]
        now = time.time()
        window_left = int(fields["expires_at"]) - int(fields["created_at"])
        ttl = window_left + self.retention_s
        keys = [
            batch_key(batch_id),
            file_key(input_file),
            file_lines_key(input_file),
            BATCHES_ACTIVE,
            batches_active_key(owner),
            batches_index_key(owner),
            BATCHES_ALL,
        ]
        trim = now - self.retention_s - INDEX_SLACK_S
        _max_bytes, max_kept, max_total = self.holdings.lua_limits(BATCHES)
        # indexed by the exact time, so batches created in the same second list in their order
        args = [batch_id, repr(now), max_active, ttl, window_left + 3600, trim, ttl + INDEX_SLACK_S]
        args += [owner, f"{now:.3f}", int(now) + ttl, max_kept, max_total]
        outcome = int(self._create(keys=keys, args=[*args, *_flat(fields)]))
        if outcome in (CREATED, NO_FILE, TOO_MANY_ACTIVE):
            return outcome
        raise self.holdings.refusal(owner, BATCHES, outcome, RECORD_OVERHEAD)

    def get(self, batch_id: str) -> dict[str, Any] | None:
        if not BATCH_ID_RE.match(batch_id):
            return None
        fields = self.redis.hgetall(batch_key(batch_id))
        return fields if fields and "id" in fields else None

    def transition(self, batch_id: str, from_: tuple[str, ...], to: str, stamp: bool = True, **fields: Any) -> str:
        """'' when the batch moved from one of `from_` to `to` (its time field stamped, unless `stamp` is false),
        else the status it had."""
        args = [" ".join(from_), to, STATUS_TIME.get(to, "") if stamp else "", int(time.time()), *_flat(fields)]
        return self._transition(keys=[batch_key(batch_id)], args=args)

    def end(
        self, batch: dict[str, Any], from_: tuple[str, ...], to: str, final: bool, force: bool = False, **fields: Any
    ) -> str:
        """Move a batch whose every line is answered (`force`: whatever is unanswered) to `to` and, `final`, out of
        the active sets, its webhook due in the same step: '' done, else 'busy' or the status found."""
        batch_id = batch["id"]
        keys = [
            batch_key(batch_id),
            batch_jobs_key(batch_id),
            BATCHES_ACTIVE,
            batches_active_key(batch["owner"]),
            file_key(batch["input_file_id"]),
        ]
        args = [" ".join(from_), to, STATUS_TIME[to], int(time.time()), self.retention_s, batch_id, int(final)]
        return self._end(keys=keys, args=[*args, int(force), *_flat(fields)])

    def failed(self, batch_id: str, field: str) -> int:
        """One more unexpected failure counted in the batch's record (`step_failures`, `failures:<line>`): how
        many so far."""
        return int(self.redis.hincrby(batch_key(batch_id), field, 1))

    def recovered(self, batch_id: str) -> None:
        """A step went through: its failures so far no longer count."""
        self.redis.hdel(batch_key(batch_id), "step_failures")

    # -- lines ----------------------------------------------------------------------------------------------
    def claim(self, batch: dict[str, Any], limit: int, mode: str) -> list[int]:
        first, count = self._claim(
            keys=[batch_key(batch["id"]), batch_jobs_key(batch["id"])], args=[limit, mode, self.ttl(batch)]
        )
        return list(range(int(first), int(first) + int(count)))

    def taken(self, batch_id: str) -> dict[int, str]:
        """The lines taken and not answered: line -> job id, or NOT_SUBMITTED."""
        return {int(line): job for line, job in self.redis.hgetall(batch_jobs_key(batch_id)).items()}

    def record(self, batch_id: str, line: int, job_id: str) -> bool:
        return self.record_many(batch_id, [(line, job_id)])[0]

    def record_many(self, batch_id: str, jobs: list[tuple[int, str]]) -> list[bool]:
        """Note each (line, job id), in one round trip: whether it was noted (False: the line was answered first)."""
        if not jobs:
            return []
        pipe = ScriptBatch(self.redis, (self._record,))
        for line, job_id in jobs:
            self._record(keys=[batch_jobs_key(batch_id)], args=[line, job_id], client=pipe)
        return [bool(noted) for noted in pipe.execute()]

    def put_back(self, batch_id: str, lines: list[int]) -> None:
        """Lines whose job vanished (its record expired before it was read): submitted again."""
        if lines:
            self.redis.hset(batch_jobs_key(batch_id), mapping={str(line): NOT_SUBMITTED for line in lines})

    def answer(self, batch: dict[str, Any], answers: list[Answer], max_bytes: int) -> tuple[int, int]:
        """Write each line's answer once (one round trip), each charged to the owner within `max_bytes` for the
        batch's two files (0: no cap) and the owner's AETHERCORE_OUTPUTS_QUOTA: how many were answered now, and how
        many of those with their short `output_limit_reached` entry instead."""
        if not answers:
            return 0, 0
        keys = [
            batch_key(batch["id"]),
            batch_jobs_key(batch["id"]),
            file_lines_key(batch["output_file"]),
            file_lines_key(batch["error_file"]),
        ]
        now, ttl = time.time(), self.ttl(batch)
        quota, _max_count, max_total = self.holdings.lua_limits(OUTPUTS)
        limits = [f"{now:.3f}", int(now) + ttl, max_bytes, quota, max_total]
        pipe = ScriptBatch(self.redis, (self._answer,))
        for a in answers:
            args = [a.line, a.file, a.stored, a.size, a.input_tokens, a.output_tokens, ttl, a.short, a.short_size]
            self._answer(keys=keys, args=[*args, *limits], client=pipe)
        outcomes = [int(done) for done in pipe.execute()]
        return sum(1 for done in outcomes if done), outcomes.count(2)

    # -- who drives it ---------------------------------------------------------------------------------------
    def active(self) -> list[str]:
        return list(self.redis.smembers(BATCHES_ACTIVE))

    def forget(self, batch_id: str) -> None:
        """A batch in the active set whose record is gone (it expired, or Redis lost it)."""
        self.redis.srem(BATCHES_ACTIVE, batch_id)

    def lease(self, batch_id: str, holder: str, ms: int) -> bool:
        return bool(self._lease(keys=[batch_lease_key(batch_id)], args=[holder, ms]))

    def release(self, batch_ids: list[str], holder: str) -> int:
        """Give up `holder`'s leases of these batches (a driver that stops); how many it held."""
        if not batch_ids:
            return 0
        return int(self._release(keys=[batch_lease_key(b) for b in batch_ids], args=[holder]))

    # -- waking the drivers, and their heartbeats ---------------------------------------------------------------
    def wake(self) -> None:
        """A batch was created or cancelled: an idle driver looks now, not at the end of its idle wait. One round
        trip; the list stays at most BATCHES_WAKE_MAX notes, and expires when no driver takes them."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(BATCHES_WAKE, "1")
        pipe.ltrim(BATCHES_WAKE, 0, BATCHES_WAKE_MAX - 1)
        pipe.expire(BATCHES_WAKE, WAKE_TTL_S)
        pipe.execute()

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` for a wake note (BLPOP); whether one came."""
        return self.redis.blpop([BATCHES_WAKE], timeout=timeout_s) is not None

    def beat(self, driver: str) -> None:
        """A driver's heartbeat; the heartbeats of drivers silent for a minute are dropped."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(BATCH_DRIVERS, {driver: now})
        pipe.zremrangebyscore(BATCH_DRIVERS, "-inf", now - 60)
        pipe.execute()

    def stopped(self, driver: str) -> None:
        self.redis.zrem(BATCH_DRIVERS, driver)

    def drivers(self) -> list[str]:
        """The drivers with a heartbeat in the last DRIVER_FRESH_S seconds."""
        return list(self.redis.zrangebyscore(BATCH_DRIVERS, time.time() - DRIVER_FRESH_S, "+inf"))

    def depth(self) -> dict[str, int]:
        """active: batches not ended; drivers: drivers alive (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.scard(BATCHES_ACTIVE)
        pipe.zcount(BATCH_DRIVERS, time.time() - DRIVER_FRESH_S, "+inf")
        active, drivers = pipe.execute()
        return {"active": int(active), "drivers": int(drivers)}

    def hold(self, batch_id: str, until: float) -> None:
        """Submit no line of the batch before `until` (the owner's rate limit or a full queue said so)."""
        self.redis.hset(batch_key(batch_id), "hold_until", repr(until))

    # -- listing -------------------------------------------------------------------------------------------
    def listing(self, owner: str | None, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        index = batches_index_key(owner) if owner is not None else BATCHES_ALL
        return cursor_page(self.redis, index, batch_key, after, limit, True, lambda _fields: True)
