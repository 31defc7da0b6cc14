"""Follow a job's event stream (Redis Stream per job): replay from any id, then live, until `done`.

Any number of readers, joining at any time, each get every chunk exactly once and in order,
because they read the same append-only stream from where they stand. Where a reader stands (a client's
Last-Event-ID) is checked once, by api/relay.py `resume_from`, before anything reads from it.

Below HTTP (the API's stream relay, api/relay.py, follows a job through it): may import tasks/ and config/; never
api, flask or protocols.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from tasks.jobs import Jobs
from tasks.jobs.stream_hub import StreamHub, Subscription
from tasks.states import SUCCEEDED, TERMINAL

POLL_MS = 250


@dataclass
class Event:
    kind: str  # chunk | status | done | keepalive
    id: str
    data: dict[str, Any]


def follow_job(
    jobs: Jobs,
    job_id: str,
    last_id: str = "0-0",
    alive: Callable[[], bool] = lambda: True,
    keepalive_s: float | None = None,
    hub: StreamHub | None = None,
) -> Iterator[Event]:
    """Yield chunk events after `last_id`, then one `done` event carrying the finished job.

    Stops early (without `done`) once `alive()` turns false; yields `keepalive` events every
    `keepalive_s` of silence when asked. With a `hub` (the API process's one reader of every open
    stream) the entries come from it; without, from a blocking read of our own. `last_id` must be a checked
    position (api/relay.py `resume_from`); a stream Redis refuses to read raises SubscriptionFailed.
    """
    subscription = hub.subscribe(job_id, last_id) if hub is not None else None
    try:
        yield from _follow(jobs, job_id, last_id, alive, keepalive_s, subscription)
    finally:
        if hub is not None and subscription is not None:
            hub.unsubscribe(subscription)


def _follow(
    jobs: Jobs,
    job_id: str,
    last_id: str,
    alive: Callable[[], bool],
    keepalive_s: float | None,
    subscription: Subscription | None,
) -> Iterator[Event]:
    silent_ms = 0
    state = jobs.events.follow(job_id)
    if state is None:
        return
    status, has_stream = state
    if status in TERMINAL and not has_stream:  # it ended without streaming before anyone followed it
        job = jobs.records.get(job_id)
        if job is not None:
            yield from _ending(job, last_id)
        return
    while alive():
        if subscription is not None:
            entries = subscription.read(POLL_MS)
        else:
            entries = jobs.events.read(job_id, last_id, POLL_MS)
        if not entries:
            silent_ms += POLL_MS
            if keepalive_s and silent_ms >= keepalive_s * 1000:
                silent_ms = 0
                yield Event("keepalive", last_id, {})
            job = jobs.records.get(job_id)
            if job is None:
                return
            # An ended job's stream holds nothing more: the `done` event is written with the end, in one
            # step. A reader already past it (resuming after the last id), or whose stream expired, ends here.
            if job["status"] in TERMINAL and not jobs.events.read(job_id, last_id, 1):
                yield Event("done", last_id, job)
                return
            continue
        silent_ms = 0
        if (yield from _entry_events(jobs, job_id, entries)):
            return
        last_id = entries[-1][0]


def _entry_events(jobs: Jobs, job_id: str, entries: list[tuple[str, dict[str, Any]]]) -> Generator[Event, None, bool]:
    """The events of a job's stream entries, in order; True once its `done` event was given (nothing follows)."""
    for entry_id, data in entries:
        if data.get("type") == "chunk":
            yield Event("chunk", entry_id, {"index": int(data["index"]), **json.loads(data["data"])})
        elif data.get("type") == "status":
            yield Event("status", entry_id, json.loads(data["data"]))
        elif data.get("type") == "done":
            yield from _ending(jobs.records.get(job_id) or {"job_id": job_id, "status": data.get("status")}, entry_id)
            return True
    return False


def _ending(job: dict[str, Any], event_id: str) -> Iterator[Event]:
    """An ended job's last events: its whole output as one chunk when it did not stream it, then `done`."""
    whole = whole_output_chunk(job)
    if whole is not None:
        yield Event("chunk", event_id, whole)
    yield Event("done", event_id, job)


def whole_output_chunk(job: dict[str, Any]) -> dict[str, Any] | None:
    """A model that does not stream sends its whole output as chunk 0. The output is stored once, in the
    job's result, so the chunk is made from it here rather than kept a second time in the stream."""
    result = job.get("result")
    if job.get("chunks") or job.get("status") != SUCCEEDED or not isinstance(result, dict):
        return None
    if "output" in result:
        return {"index": 0, "output": result["output"]}
    if "outputs" in result:
        return {"index": 0, "outputs": result["outputs"]}
    return None
