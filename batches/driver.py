"""What moves every batch forward: validation, submitting its lines, collecting their answers, cancel, the window's
end, and the output and error files. It runs in a process of its own, `manage.py batches` (`run_batch_driver`;
`manage.py up` and compose's `batches` service start one), never in an API process; all of a batch's state is in
Redis (batches/store.py), so any number of drivers may run.

Each pass (every TICK_S while batches are unfinished) the driver takes, for each unfinished batch, its lease (a
Redis key with a LEASE_MS TTL, renewed each pass by its holder) and, holding it, runs the batch's next step:

```
validating   read the input file, check every line exactly as /v1 checks the same request (the same schemas and
             translation, protocols/openai.py BATCH_ENDPOINTS) -> failed (errors.data[] with line numbers) or
             in_progress (total, model)
in_progress  collect: every submitted line whose job ended gets its answer (output or error file, exactly once)
             submit: lines taken and not answered up to the batch's room (batches/lanes.py `batch_line_room`: its
             share of its device queue's watermark, at most AETHERCORE_BATCH_MAX_IN_FLIGHT), each submitted as an
             ordinary inference job of the batch's owner (`submit_line`); a refusal for load (429 rate limit or
             queue_full, 503 no_device / redis_full / broker down) answers nothing: the line waits and the batch
             holds its submissions for the Retry-After
             the window ends -> `stopping` = expire
stopping     (cancelled, or its window ended) lines never submitted are answered batch_cancelled / batch_expired
             without running; submitted ones are cancelled (a queued job never runs, a running one is asked to stop)
             and whatever ends is collected as usual: what finished is kept
all answered in_progress -> finalizing -> completed; cancelling -> cancelled; the window -> expired; the output
             and error files are published, the batch leaves the active set (its webhook due in the same step)
```

Every step first checks that the batch's owner is still a valid principal (api/auth.py `Authenticator.current`):
a revoked key's batch is cancelled (`stopping` = revoked), its lines not run answered `batch_cancelled` naming
the revocation. Every state has a deadline, so none of the owner's AETHERCORE_BATCH_MAX_ACTIVE slots is held for
longer than the window plus FINISH_GRACE_S: a validation still running at the window's end ends `expired`; lines
still unanswered FINISH_GRACE_S after the window's end (or the cancel) are abandoned and the batch ends. An
unexpected exception is retried a bounded number of times, counted in the batch's record: a line's
(MAX_LINE_FAILURES, then it is answered `internal_error`), a whole step's (MAX_STEP_FAILURES in a row, then the
batch ends `failed` with an `internal_error` in its errors).

The rooms: this module is the loop, the leases, one batch's step, its owner, its stop and its end, and the process
(`run_batch_driver`); validation is batches/validation.py, submitting and collecting lines batches/lines.py, the
output and error entries and the batch's errors batches/outputs.py. A line runs exactly what the same /v1
request runs (its translation and checks, the owner's role deciding autoload, the owner's rate limit counted as the
job is created, backpressure, the dispatcher): the one submission use case, which this process builds as an API
process does (batches/services.py `open_services`, submission/wiring.py); no Flask app, no import of api/.

Why a process of its own, and a niced one (AETHERCORE_BATCH_DRIVER_NICE): a driver's pass is CPU in bursts
(answers collected 256 at a time, their JSON, Lua round trips). As a thread of every API process, under gevent, such
a burst held that process's other requests: measured with bench/lanes.py (sim-h100, 3 owners x 6000 lines, 2
cores), interactive /serve p99 beside the backlog was 4.4x its no-backlog p99 at 1 client and 3.35x at 8; the same
driver in a process of its own at nice 10 gave 2.45x and 1.94x: the kernel gives the API and the worker the CPU
first. A new or cancelled batch wakes an idle driver at once (the API pushes a note to BATCHES_WAKE, the driver's
idle wait is a BLPOP on it).

Any driver drives any batch: one that dies loses its leases within LEASE_MS and the others (or it, restarted) carry
on from Redis; one that stops gives its leases up. Every step is idempotent: answers are written once per line
(batches/store.py `answer`), a line is submitted again only if its job was never recorded or has vanished, and the
ends are compare-and-set transitions.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import redis
from loguru import logger

from batches.ending import Ending, deadline_of
from batches.files import FileStore
from batches.lines import Lines
from batches.outputs import (
    clip,
    error_entry,
)
from batches.services import DriverServices, open_services
from batches.store import (
    CANCELLING,
    ENDED,
    IN_PROGRESS,
    STOP_EXPIRE,
    STOP_REVOKED,
    VALIDATING,
    BatchStore,
)
from batches.validation import LEASE_MS, Validation
from config.logging import setup_logging
from config.settings import Settings
from tracing.setup import configure as configure_tracing

TICK_S = 0.2  # between passes while some batch is unfinished and the last pass found nothing to do
BUSY_S = 0.02  # between passes while lines end and are submitted
IDLE_S = 1.0  # between passes otherwise (a new batch or a cancel wakes an idle driver at once: BATCHES_WAKE)
# Pauses this short are slept, not waited for with BLPOP: Redis ends a blocking command's timeout at its next cron
# tick (hz 10), so on an idle Redis a BLPOP of 0.02 s returned after 0.12 s.
BLOCK_MIN_S = 0.1
HEARTBEAT_S = 2.0  # the driver's heartbeat (BATCH_DRIVERS): the healthcheck's `batches` and /health read it
SWEEP_EVERY_S = 60.0  # how often a driver takes expired objects out of the owners' accounts (tasks/holdings.py)
# A Redis refusal that says Redis is unavailable, not that a step's data is wrong: the pass is retried as a whole.
_OUTAGE = ("OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS")
# Lines of a batch submitted at once by each driver: their round trips overlap, and lines that leave together share
# Celery messages (submission/dispatch.py).
SUBMITTERS = 8
# Why a batch ended early (errors.data[].code): its owner's credentials were revoked, its steps kept failing.
OWNER_REVOKED = "owner_revoked"


class BatchDriver(Validation, Lines, Ending):
    def __init__(self, services: DriverServices, store: BatchStore, files: FileStore, name: str | None = None) -> None:
        self.services = services
        self.settings = services.settings
        self.jobs = services.jobs
        self.store = store
        self.files = files
        self.name = name or f"batches.{os.getpid()}@{socket.gethostname()}"
        self.holder = f"{self.name}#{secrets.token_hex(4)}"
        self._pool = ThreadPoolExecutor(SUBMITTERS, thread_name_prefix="batch-submit")
        self._owners: dict[tuple[str, str], str | None] = {}  # this pass's owners' current roles (None: revoked)
        self._swept_at = 0.0
        self._stopping = threading.Event()  # `run`'s: set when the process is asked to stop

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Passes until `stop` is set; then the submitting threads end, the leases still held are given up and the
        heartbeat leaves."""
        self._stopping = stop
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name="batch-heartbeat", daemon=True)
        beat.start()
        failing = False
        while not stop.is_set():
            pause = IDLE_S
            try:
                active, progressed = self.tick()
                pause = BUSY_S if progressed else TICK_S if active else IDLE_S
                self._sweep()
                failing = False
            except redis.RedisError as exc:
                if not failing:  # once per outage
                    logger.warning("batch driver: Redis unavailable ({}); retrying", exc)
                failing = True
            except Exception:
                logger.exception("batch driver pass failed")
            self._pause(pause, stop)
        logger.info("batch driver {} stopping: its submitting threads end, its leases are given up", self.name)
        self._pool.shutdown(wait=True)
        beat.join()
        try:
            released = self.store.release(self.store.active(), self.holder)
            self.store.stopped(self.name)
        except redis.RedisError as exc:  # its leases lapse by themselves
            logger.warning("batch driver {}: leases not given up ({})", self.name, exc)
            return
        logger.info("batch driver {} stopped ({} leases given up)", self.name, released)

    def _pause(self, seconds: float, stop: threading.Event) -> None:
        """Until the next pass: `seconds`, or less when a batch is created or cancelled (a wake note)."""
        if seconds >= BLOCK_MIN_S:
            try:
                self.store.wait_for_work(seconds)
                return
            except redis.RedisError:  # Redis away: the next pass says so
                pass
        stop.wait(seconds)

    def _heartbeat(self, stop: threading.Event) -> None:
        while True:
            try:
                self.store.beat(self.name)
            except redis.RedisError:
                pass
            if stop.wait(HEARTBEAT_S):
                return

    def _sweep(self) -> None:
        """Expired objects out of the owners' accounts now and then (each account also drops its own lazily)."""
        if time.monotonic() - self._swept_at >= SWEEP_EVERY_S:
            self._swept_at = time.monotonic()
            self.store.holdings.sweep()

    def tick(self) -> tuple[bool, bool]:
        """One pass over the unfinished batches: whether there were any, and whether a step of this process did
        something (lines answered or submitted, a status moved)."""
        ids = self.store.active()
        progressed = False
        self._owners = {}
        for batch_id in ids:
            if self._stopping.is_set():  # the rest are the next driver's
                break
            if self.store.lease(batch_id, self.holder, LEASE_MS):
                progressed = self._step_counted(batch_id) or progressed
        return bool(ids), progressed

    def _step_counted(self, batch_id: str) -> bool:
        """`step`, its unexpected failures counted (`_step_failed`) and never in the way of the other batches'."""
        try:
            return self.step(batch_id)
        except Exception as exc:
            if _outage(exc):
                raise
            failure = exc
        try:
            self._step_failed(batch_id, failure)
        except Exception as exc:
            if _outage(exc):
                raise
            logger.bind(batch_id=batch_id).exception("batch {}: not ended after its failures", batch_id)
        return False

    # -- one step of one batch ---------------------------------------------------------------------------------
    def step(self, batch_id: str) -> bool:
        """The batch's next step; whether it did something."""
        batch = self.store.get(batch_id)
        if batch is None or batch["status"] in ENDED:
            self.store.forget(batch_id)
            return False
        batch = self._as_current_owner(batch)
        with self.services.as_owner(batch):
            done = self._advance(batch)
        if batch.get("step_failures"):
            self.store.recovered(batch_id)
        return done

    def _advance(self, batch: dict[str, Any]) -> bool:
        batch_id = batch["id"]
        now = time.time()
        if batch["status"] == VALIDATING:
            if now >= float(batch["expires_at"]):
                return self._expire_validation(batch)
            self._validate(batch)
            return True
        if now >= deadline_of(batch):
            return self._abandon(batch, *self._late(batch))
        window_ended = now >= float(batch["expires_at"])
        if batch["status"] == IN_PROGRESS and not batch.get("stopping") and window_ended:
            self.store.transition(batch_id, (IN_PROGRESS,), IN_PROGRESS, stamp=False, stopping=STOP_EXPIRE)
            logger.bind(batch_id=batch_id).info("batch {}: its completion window ended", batch_id)
            batch = self.store.get(batch_id) or batch
        done = self._collect(batch)
        if batch.get("stopping"):
            done += self._stop(batch)
        elif batch["status"] == IN_PROGRESS:
            done += self._submit(batch)
        return self._finish(batch_id) or done > 0

    # -- its owner ---------------------------------------------------------------------------------------------
    def _as_current_owner(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with its owner's role as it is now; a batch whose owner was revoked is cancelled first."""
        key = (batch["owner"], batch["role"])
        if key not in self._owners:  # once per pass for all of an owner's batches
            self._owners[key] = self.services.serving_role(*key)
        role = self._owners[key]
        if role is not None:
            return {**batch, "role": role}
        if batch["status"] in (VALIDATING, IN_PROGRESS) and not batch.get("stopping"):
            self._revoke(batch)
            return self.store.get(batch["id"]) or batch
        return batch

    def _revoke(self, batch: dict[str, Any]) -> None:
        message = (
            f"the batch was cancelled: its owner {clip(batch['owner'])}'s credentials were revoked (or may no "
            "longer run batches); requests not yet run were not executed"
        )
        errors = orjson.dumps([error_entry(OWNER_REVOKED, message, None)]).decode()
        outcome = self.store.transition(
            batch["id"], (VALIDATING, IN_PROGRESS), CANCELLING, stopping=STOP_REVOKED, errors=errors
        )
        if outcome == "":
            logger.bind(batch_id=batch["id"]).warning(
                "batch {}: its owner {} was revoked; cancelling it", batch["id"], batch["owner"]
            )


def _outage(exc: Exception) -> bool:
    """Redis unavailable (the pass is retried as a whole), not a step that fails on its data."""
    if not isinstance(exc, redis.RedisError):
        return False
    return not isinstance(exc, redis.ResponseError) or str(exc).startswith(_OUTAGE)


# -- the process ------------------------------------------------------------------------------------------------------
def lower_priority(increment: int) -> int:
    """Lower this process's CPU priority by `increment` (0: unchanged); its niceness now. On Linux a niceness is a
    thread's (os.nice changes the caller's only) and a new thread inherits its creator's: the threads that exist
    already (numpy starts its BLAS pool at import) are lowered to the same niceness, and every later one inherits it.
    """
    niceness = os.nice(increment)
    threads = "/proc/self/task"
    for tid in os.listdir(threads) if increment and os.path.isdir(threads) else ():
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
        except ProcessLookupError:  # it ended meanwhile
            pass
    return niceness


def run_batch_driver(settings: Settings) -> None:
    niceness = lower_priority(settings.batch_driver_nice)
    setup_logging("batches", settings.log_level, settings.log_format)
    configure_tracing("batches")
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()  # no logging here: the handler may run while this thread holds the log's lock (`run` logs it)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    services = open_services(settings)
    driver = BatchDriver(services, services.batches, services.files)
    logger.info(
        "batch driver {} running at nice {} (AETHERCORE_BATCH_DRIVER_NICE={}): the API and the workers get the CPU "
        "first",
        driver.name,
        niceness,
        settings.batch_driver_nice,
    )
    driver.run(stop)
