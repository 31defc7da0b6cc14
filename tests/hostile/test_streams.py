"""Case 1 of issue 19: a resume position (Last-Event-ID) no stream sent, and the stream hub's thread.

One bad Last-Event-ID used to kill the API process's stream hub (thousands of digits: int() raised in its
thread) or stall it (a part over 2^64-1: Redis refused the hub's whole XREAD), so every SSE, WebSocket and
/v1 stream of the process went silent. Now a position is checked once, before anything follows it (400),
the hub survives what happens in its loop, one stream Redis refuses fails alone, and a dead hub thread is
started again.
"""

from __future__ import annotations

import uuid

import pytest
import redis
import requests

from tasks.jobs.stream_hub import StreamHub
from tasks.names import job_events_key
from tests.hostile.conftest import another_callers_stream, assert_still_serving, auth, ensure_loaded
from tests.hostile.streams import Background, held_job
from tests.support import USER_KEY, read_until

BAD_POSITIONS = {
    "thousands of digits": "1" * 5000 + "-0",
    "a part over 2^64-1": "18446744073709551616-0",
    "a sequence over 2^64-1": "1-18446744073709551616",
    "three parts": "1-2-3",
    "no sequence": "1712-",
    "not an id": "latest",
}


@pytest.mark.parametrize("position", list(BAD_POSITIONS.values()), ids=list(BAD_POSITIONS))
def test_a_bad_last_event_id_is_400_and_other_streams_keep_flowing(hostile_api, hostile_redis, position):
    ensure_loaded(hostile_api)
    with held_job(hostile_redis, USER_KEY) as job_id:
        # another caller's stream is open while the attack happens...
        during = Background("another caller's stream during the attack", lambda: another_callers_stream(hostile_api))
        response = requests.get(
            f"{hostile_api.base}/jobs/{job_id}/stream",
            headers={**auth(USER_KEY), "Last-Event-ID": position},
            timeout=10,
        )
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == "bad_request" and "Last-Event-ID" in error["message"]
        assert len(response.text) < 1000  # the position is not echoed back
        assert during.result(60)
    # ...and after it.
    assert_still_serving(hostile_api, hostile_redis)


# -- the hub itself, in this process, on the suite's Redis --------------------------------------------------


class HubKilled(BaseException):
    """Not an Exception: nothing in the hub's loop may catch it, so its thread dies."""


@pytest.fixture()
def hub_redis(hostile_redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(hostile_redis_url, decode_responses=True)


def test_the_stream_hubs_thread_is_started_again_after_it_dies(hub_redis):
    hub = StreamHub(hub_redis)
    job, later_job = uuid.uuid4().hex, uuid.uuid4().hex
    follower = hub.subscribe(job, "0-0")
    first = hub_redis.xadd(job_events_key(job), {"type": "chunk", "index": 0})
    assert [e[0] for e in read_until(follower, 1)] == [first]

    real_xread, kills = hub_redis.xread, []

    def dies_once(*args, **kwargs):
        if not kills:
            kills.append(1)
            raise HubKilled("the hub's thread dies here")
        return real_xread(*args, **kwargs)

    hub_redis.xread = dies_once
    second = hub_redis.xadd(job_events_key(job), {"type": "chunk", "index": 1})
    # A follower that was there when the thread died gets what comes next...
    assert [e[0] for e in read_until(follower, 1)] == [second]
    assert kills == [1]  # the thread did die
    # ...and so does a new one.
    later = hub.subscribe(later_job, "0-0")
    third = hub_redis.xadd(job_events_key(later_job), {"type": "done"})
    assert [e[0] for e in read_until(later, 1)] == [third]
    hub_redis.delete(job_events_key(job), job_events_key(later_job))


def test_a_stream_redis_refuses_fails_alone(hub_redis):
    """A follower whose stream Redis refuses to read (here: its key is not a stream) must not stall the others:
    the hub's one XREAD for every stream fails as a whole, so the hub reads again without it."""
    hub = StreamHub(hub_redis)
    broken, fine = uuid.uuid4().hex, uuid.uuid4().hex
    hub_redis.hset(job_events_key(broken), "not", "a stream")
    bad = hub.subscribe(broken, "0-0")
    good = hub.subscribe(fine, "0-0")
    entry = hub_redis.xadd(job_events_key(fine), {"type": "chunk", "index": 0})
    assert [e[0] for e in read_until(good, 1)] == [entry]
    with pytest.raises(Exception, match="WRONGTYPE|not a stream|refused"):
        read_until(bad, 1, 3000)
    hub_redis.delete(job_events_key(broken), job_events_key(fine))
