"""What the stream tests of the hostile suite share: a job that stays open as long as a test needs it, SSE
streams held open on it, and a bound on anything that could hang."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
import requests

from tasks.jobs import Jobs
from tasks.names import job_events_key
from tests.hostile.conftest import auth
from tests.support import ApiProcess

# A device no worker serves: a job queued for it is never taken, nor swept as a lost message.
HELD_DEVICE = "held-by-test"


def owner_of(key: str) -> str:
    """The principal id access/keys.py gives a static key (env:<digest prefix>)."""
    return f"env:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@contextmanager
def held_job(client: redis.Redis, key: str) -> Iterator[str]:
    """A queued job owned by `key`'s caller that no worker will take: its streams and waits stay open until the
    test ends it (on leaving the block, so the suite's "every job ends" holds). A status note is in its event
    stream, so a follower gets its response headers at once."""
    jobs = Jobs(client, 600)
    job = jobs.records.create(kind="inference", model_id="tiny-gpt2", device=HELD_DEVICE, owner=owner_of(key))
    client.xadd(job_events_key(job["job_id"]), {"type": "status", "data": json.dumps({"status": "queued"})})
    try:
        yield job["job_id"]
    finally:
        jobs.lifecycle.request_cancel(job["job_id"], "the test is over")


def open_sse(api: ApiProcess, key: str, job_id: str, **headers: str) -> requests.Response:
    """An SSE stream of the job, left open (the caller closes it)."""
    return requests.get(
        f"{api.base}/jobs/{job_id}/stream", headers={**auth(key), **headers}, stream=True, timeout=(5, 30)
    )


def within(seconds: float, what: str, fn: Callable[[], Any]) -> Any:
    """fn() in a thread, failing the test (instead of hanging it) if it takes longer than `seconds`."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise AssertionError(f"{what} did not finish within {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value"), time.monotonic() - started


class Background:
    """fn() started now in a thread; `result(seconds)` waits for it, failing if it hangs or failed."""

    def __init__(self, what: str, fn: Callable[[], Any]) -> None:
        self.what = what
        self.box: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.box["value"] = fn()
        except BaseException as exc:
            self.box["error"] = exc

    def result(self, seconds: float) -> Any:
        self.thread.join(seconds)
        if self.thread.is_alive():
            raise AssertionError(f"{self.what} did not finish within {seconds} s")
        if "error" in self.box:
            raise self.box["error"]
        return self.box.get("value")
