"""The job store's Lua scripts (tasks/jobs/lua/*.lua), read and rendered once, at import.

Each script names states, keys and bounds through the same constants as the Python code (tasks/states.py,
tasks/names.py and the bounds below): `$NAME` placeholders filled in by `render`, and
`$IS_TERMINAL(var)`, the test of a terminal state. A placeholder with no value fails the import, not a job.
The parts of the store (records, lifecycle, inflight, events) register the scripts they run (redis-py's
`register_script`: called by SHA, loaded again where Redis lost it; tasks/script_batch.py batches some).
"""

from __future__ import annotations

import re
from pathlib import Path

from tasks.deadletters import LUA as DEAD_LETTER_LUA
from tasks.deadletters import NO_OWNER
from tasks.deadletters import render as dead_letter_lua
from tasks.holdings import DELIVERIES, IDEMPOTENCY, with_holdings
from tasks.names import (
    DELIVERY_ID_PREFIX,
    INFLIGHT_HOLDERS,
    INFLIGHT_PREFIX,
    KEEP_DELIVERY_S,
    QUEUED_PREFIX,
    WEBHOOK_DELIVERY_PREFIX,
    WEBHOOKS_DUE,
    job_key,
    worker_key,
)
from tasks.states import QUEUED, RUNNING, TERMINAL

LUA_DIR = Path(__file__).with_name("lua")

# A job that has not ended is kept at least this long, whatever its own (shorter) retention: the retention
# counts from its end.
KEEP_UNFINISHED_S = 3600
# Bytes a webhook delivery is charged besides its webhook's JSON (its hash, field names and due entry), and an
# Idempotency-Key's record besides its name and value: what each holds until the body or answer is added.
DELIVERY_OVERHEAD = 256
KEY_OVERHEAD = 96
# A transition's outcome for a job whose record breaks the script (transition.lua): it does not run, nor end.
BROKEN = -2

_VALUES = {
    "QUEUED": f"'{QUEUED}'",
    "RUNNING": f"'{RUNNING}'",
    "BROKEN": str(BROKEN),
    "JOB_PREFIX": job_key(""),
    "JOB_PREFIX_LEN": str(len(job_key(""))),
    "WORKER_PREFIX": worker_key(""),
    "INFLIGHT_PREFIX": INFLIGHT_PREFIX,
    "INFLIGHT_HOLDERS": INFLIGHT_HOLDERS,
    "QUEUED_PREFIX": QUEUED_PREFIX,
    "KEEP_UNFINISHED_S": str(KEEP_UNFINISHED_S),
    "WEBHOOK_DELIVERY_PREFIX": WEBHOOK_DELIVERY_PREFIX,
    "DELIVERY_ID_PREFIX": DELIVERY_ID_PREFIX,
    "KEEP_DELIVERY_S": str(KEEP_DELIVERY_S),
    "WEBHOOKS_DUE": WEBHOOKS_DUE,
    "DELIVERIES_KIND": DELIVERIES,
    "IDEMPOTENCY_KIND": IDEMPOTENCY,
    "DELIVERY_OVERHEAD": str(DELIVERY_OVERHEAD),
    "KEY_OVERHEAD": str(KEY_OVERHEAD),
    "NO_OWNER": NO_OWNER,
}


def render(source: str) -> str:
    """A script with its placeholders filled in: `$IS_TERMINAL(var)` and each `$NAME` of _VALUES."""
    source = re.sub(
        r"\$IS_TERMINAL\((\w+)\)",
        lambda m: "(" + " or ".join(f"{m.group(1)} == '{state}'" for state in TERMINAL) + ")",
        source,
    )
    return re.sub(r"\$([A-Z][A-Z_]*)", lambda m: _VALUES[m.group(1)], source)


def _load(name: str) -> str:
    return render((LUA_DIR / f"{name}.lua").read_text())


def _charging(name: str) -> str:
    """A script that charges what it writes to its owner (tasks/holdings.py), with the dead letter's writer."""
    return with_holdings(dead_letter_lua(DEAD_LETTER_LUA) + _load(name))


# records.py: creating jobs (and the Idempotency-Key a creation takes)
CREATE_LIMITED = _charging("create_limited")
CREATE_MANY_PUSH = _load("create_many_push")
RELEASE_KEY = _charging("release_key")
# lifecycle.py: running and the end; cancel
TRANSITION = _charging("transition")
REQUEST_CANCEL = _load("request_cancel")
# inflight.py: the reaper's
REAP = _load("reap")
RECLAIM = _load("reclaim")
SWEEP_QUEUED = _load("sweep_queued")
# events.py: a job's event stream and its waiters
WATCH = _load("watch")
FOLLOW = _load("follow")
APPEND_CHUNK = _load("append_chunk")
APPEND_STATUS = _load("append_status")
