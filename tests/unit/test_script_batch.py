"""tasks/script_batch.py against a real redis-server of the test's own (it flushes the script cache): one round
trip without SCRIPT EXISTS, replies in order, a lost script loaded and its calls run exactly once, errors raised
after every call ran."""

import pytest
import redis

from tasks.errors import INTERNAL_ERROR
from tasks.jobs import Jobs
from tasks.jobs.lifecycle import JobEnd
from tasks.script_batch import ScriptBatch
from tasks.states import FAILED, SUCCEEDED
from tests.support import RedisServer

COUNT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
REFUSE = "return redis.error_reply('refused ' .. ARGV[1])"


@pytest.fixture(scope="module")
def started():
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture()
def server(started):
    return redis.Redis.from_url(started.url(0))


def commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


def test_calls_go_in_one_round_trip_without_script_exists_and_reply_in_order(server):
    server.flushdb()
    count = server.register_script(COUNT)
    server.script_load(COUNT)
    before = commands(server)
    batch = ScriptBatch(server, (count,))
    for key, by in (("a", 1), ("b", 10), ("a", 2)):
        count(keys=[key], args=[by], client=batch)
    assert batch.execute() == [1, 10, 3]
    after = commands(server)
    assert after.get("script|exists", 0) == before.get("script|exists", 0)  # redis-py's pipeline would send one
    assert after["evalsha"] - before.get("evalsha", 0) == 3
    assert batch.execute() == []  # what ran is not sent again


def test_a_script_redis_lost_is_loaded_and_each_call_still_runs_exactly_once(server):
    server.flushdb()
    count = server.register_script(COUNT)
    server.script_load(COUNT)
    server.script_flush()  # as after a restart: every cached script is gone
    batch = ScriptBatch(server, (count,))
    for key in ("x", "y", "x"):
        count(keys=[key], args=[5], client=batch)
    assert batch.execute() == [5, 5, 10]
    assert int(server.get("x")) == 10 and int(server.get("y")) == 5
    assert server.script_exists(count.sha) == [True]


def test_an_error_is_raised_after_every_call_ran(server):
    server.flushdb()
    count, refuse = server.register_script(COUNT), server.register_script(REFUSE)
    batch = ScriptBatch(server, (count, refuse))
    count(keys=["n"], args=[1], client=batch)
    refuse(keys=[], args=["this one"], client=batch)
    count(keys=["n"], args=[1], client=batch)
    with pytest.raises(redis.ResponseError, match="refused this one"):
        batch.execute()
    assert int(server.get("n")) == 2
    with pytest.raises(ValueError):
        server.register_script("return 1")(client=batch)  # a script the batch cannot load again


def test_job_transitions_survive_a_flushed_script_cache(started, server):
    server.flushdb()
    jobs = Jobs(redis.Redis.from_url(started.url(0), decode_responses=True), ttl_s=60)
    created = [jobs.records.create(kind="inference", model_id="m", device="cpu") for _ in range(3)]
    server.script_flush()
    deliveries = jobs.lifecycle.mark_running_many([(job["job_id"], b"again") for job in created], "worker-1")
    assert deliveries == [1, 1, 1]
    server.script_flush()
    ended = jobs.lifecycle.end_jobs([JobEnd(job["job_id"], SUCCEEDED, result={"x": 1}) for job in created])
    assert ended == [True, True, True]
    assert [jobs.records.get(job["job_id"])["status"] for job in created] == ["succeeded"] * 3
    assert jobs.lifecycle.end_jobs([JobEnd(created[0]["job_id"], FAILED, INTERNAL_ERROR)]) == [False]
