"""workers/streams.py against a real Redis: chunks Redis could not take (a lost connection, a failover) are kept and
sent first when it is back, in order; a chunk Redis refuses (a damaged job's stream) is dropped, so it never holds
the worker's later steps and ends."""

from __future__ import annotations

import uuid

import pytest
import redis

from cli.supervise import free_port
from tasks.jobs.events import Events
from tasks.metrics import LocalMetrics
from tasks.names import job_events_key, job_key
from tasks.redis_client import make_redis
from workers.stream_target import StreamTarget
from workers.streams import JobStreams


def running_job(client: redis.Redis) -> str:
    job_id = uuid.uuid4().hex
    client.hset(job_key(job_id), mapping={"status": "running", "chunks": 0})
    return job_id


def test_a_refused_chunk_is_dropped_and_holds_no_later_end(scratch_redis):
    client = make_redis(_url(scratch_redis))
    streams = JobStreams(Events(client, 60), LocalMetrics())
    job_id = running_job(client)
    client.set(job_events_key(job_id), "not a stream")  # XADD on it: WRONGTYPE
    streams.publish([(StreamTarget(job_id, "m"), "text")])
    streams.flush()  # nothing kept: it does not raise, so the job's end is written at once


def test_chunks_redis_could_not_take_are_kept_and_sent_first_in_order(scratch_redis):
    url = _url(scratch_redis)
    client = make_redis(url)
    job_id = running_job(client)
    target = StreamTarget(job_id, "m")
    unreachable = JobStreams(Events(make_redis(f"redis://127.0.0.1:{free_port()}/0"), 60), LocalMetrics())
    unreachable.publish([(target, "one")])
    unreachable.publish([(target, "two")])
    with pytest.raises(redis.ConnectionError):
        unreachable.flush()  # still kept: the end waits (and is retried with them)
    back = JobStreams(Events(client, 60), LocalMetrics())
    back._unsent = unreachable._unsent  # the same worker once Redis answers again
    back.publish([(target, "three")])
    texts = [e["data"] for _id, e in client.xrange(job_events_key(job_id))]
    assert texts == ['{"text":"one"}', '{"text":"two"}', '{"text":"three"}'], texts
    back.flush()


def _url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"
