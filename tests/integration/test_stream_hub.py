"""The API process's stream hub against the real Redis: one reader for many followers, each follower gets
exactly the entries after its own position, in order, and nothing after it leaves."""

import redis

from tasks.jobs.stream_hub import StreamHub
from tasks.names import job_events_key
from tests.conftest import DB_MISC
from tests.support import read_until


def test_followers_of_the_same_and_of_other_streams_each_get_their_own_entries(redis_server):
    client = redis.Redis.from_url(redis_server.url(DB_MISC), decode_responses=True)
    a, b = "hub" + "a" * 29, "hub" + "b" * 29
    client.delete(job_events_key(a), job_events_key(b))
    early = [client.xadd(job_events_key(a), {"type": "chunk", "index": i}) for i in range(3)]
    hub = StreamHub(client)
    from_start = hub.subscribe(a, "0-0")
    late = hub.subscribe(a, early[1])  # resumes after the second entry (Last-Event-ID)
    other = hub.subscribe(b, "0-0")
    assert [e[0] for e in read_until(from_start, 3)] == early
    assert [e[0] for e in read_until(late, 1)] == early[2:]

    more = [client.xadd(job_events_key(a), {"type": "chunk", "index": i}) for i in range(3, 40)]
    assert [e[0] for e in read_until(from_start, 37)] == more
    assert [e[0] for e in read_until(late, 37)] == more
    assert other.read(100) == []  # nothing was written to b

    hub.unsubscribe(late)
    written = client.xadd(job_events_key(b), {"type": "done"})
    client.xadd(job_events_key(a), {"type": "done"})
    assert [e[0] for e in read_until(other, 1)] == [written]
    assert late.read(200) == []  # it left: nothing more is delivered to it
    assert hub.open_streams() == 2
