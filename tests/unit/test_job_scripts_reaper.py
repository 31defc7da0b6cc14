"""The job store's Lua scripts of the reaper (reap, reclaim, sweep_queued) and of a job's readers and streams (watch,
follow, append_chunk, append_status), each run directly against the real Redis with its KEYS and ARGV, and its writes
read back."""

from __future__ import annotations

import time

from tasks.jobs import scripts
from tasks.names import (
    INFLIGHT_HOLDERS,
    LANES,
    inflight_key,
    job_events_key,
    job_key,
    lane_list,
    queued_key,
    worker_key,
)
from tasks.states import QUEUED, RUNNING, SUCCEEDED
from tests.unit.test_job_scripts import job


def stream(client, job_id):
    return [entry for _id, entry in client.xrange(job_events_key(job_id))]


def pairs(flat):
    return dict(zip(flat[::2], flat[1::2]))


# -- reap.lua -------------------------------------------------------------------------------------------------
def test_reap_requeues_a_dead_workers_jobs_and_charges_a_crash_only_to_a_job_alone_in_its_pass(scratch_redis):
    reap = scratch_redis.register_script(scripts.REAP)
    job(scratch_redis, "alone", RUNNING, holder="dead", **{"pass": "alone"})
    job(scratch_redis, "shared", RUNNING, holder="dead", crashes="1", **{"pass": "shared"})
    job(scratch_redis, "ended", SUCCEEDED, holder="dead")  # ended meanwhile: not taken
    scratch_redis.hset(inflight_key("dead"), mapping={"alone": "p1", "shared": "p2", "ended": "p3"})
    scratch_redis.sadd(INFLIGHT_HOLDERS, "dead")
    scratch_redis.set(worker_key("dead"), "{}")
    assert reap(args=["dead", 100.0]) == []  # alive: nothing taken
    assert scratch_redis.hlen(inflight_key("dead")) == 3
    scratch_redis.delete(worker_key("dead"))
    taken = reap(args=["dead", 100.0])
    assert sorted(zip(taken[::3], taken[1::3], taken[2::3])) == [("alone", "p1", 1), ("shared", "p2", 1)]
    for job_id, payload in (("alone", "p1"), ("shared", "p2")):
        fields = scratch_redis.hgetall(job_key(job_id))
        assert fields["status"] == QUEUED and fields["payload"] == payload
        assert "holder" not in fields and "pass" not in fields
        assert scratch_redis.zscore(queued_key("cpu"), job_id) == 100.0
    assert scratch_redis.hget(job_key("ended"), "status") == SUCCEEDED
    assert not scratch_redis.exists(inflight_key("dead")) and not scratch_redis.sismember(INFLIGHT_HOLDERS, "dead")
    assert reap(args=["dead", 100.0]) == []  # once only


# -- reclaim.lua ----------------------------------------------------------------------------------------------
def test_reclaim_takes_back_only_a_job_still_running_unchanged_on_its_holder(scratch_redis):
    reclaim = scratch_redis.register_script(scripts.RECLAIM)
    job(scratch_redis, "a", RUNNING, holder="live", started_at="10.5", **{"pass": "shared"})
    assert reclaim(args=["live", "a", 100.0, "10.5"]) is None  # not in its in-flight hash
    scratch_redis.hset(inflight_key("live"), "a", "payload")
    assert reclaim(args=["live", "a", 100.0, "11.0"]) is None  # started again since the reaper looked
    assert reclaim(args=["other", "a", 100.0, "10.5"]) is None  # not its holder
    assert scratch_redis.hget(job_key("a"), "status") == RUNNING
    assert reclaim(args=["live", "a", 100.0, "10.5"]) == ["payload", 1]
    fields = scratch_redis.hgetall(job_key("a"))
    assert fields["status"] == QUEUED and fields["payload"] == "payload" and fields["crashes"] == "1"
    assert "holder" not in fields and "pass" not in fields
    assert scratch_redis.hgetall(inflight_key("live")) == {} and scratch_redis.zscore(queued_key("cpu"), "a") == 100


# -- sweep_queued.lua -----------------------------------------------------------------------------------------
def test_sweep_queued_claims_stale_queued_jobs_only_while_every_lane_is_empty(scratch_redis):
    sweep = scratch_redis.register_script(scripts.SWEEP_QUEUED)
    lanes = [lane_list("cpu", lane) for lane in LANES]
    now = time.time()
    for job_id, status in (("stale", QUEUED), ("fresh", QUEUED), ("started", RUNNING)):
        scratch_redis.hset(job_key(job_id), mapping={"status": status, "device": "cpu", "payload": f"p-{job_id}"})
    scratch_redis.zadd(queued_key("cpu"), {"stale": now - 60, "fresh": now, "started": now - 60, "expired": now - 60})
    for lane in lanes:
        scratch_redis.rpush(lane, "a message")
        assert sweep(keys=lanes, args=["cpu", now, 10, 100]) == []  # a message waits: nothing is lost
        scratch_redis.delete(lane)
    assert sweep(keys=lanes, args=["cpu", now, 10, 100]) == ["stale", "p-stale"]
    assert scratch_redis.zrange(queued_key("cpu"), 0, -1, withscores=True) == [("fresh", now), ("stale", now)]
    assert sweep(keys=lanes, args=["cpu", now, 10, 100]) == []  # claimed for another 10 s


# -- watch.lua ------------------------------------------------------------------------------------------------
def test_watch_adds_each_channel_once_to_a_job_that_has_not_ended(scratch_redis):
    watch = scratch_redis.register_script(scripts.WATCH)
    job(scratch_redis, "a")
    job(scratch_redis, "ended", SUCCEEDED)
    assert watch(keys=[job_key("gone")], args=["c1"]) == []
    assert pairs(watch(keys=[job_key("a")], args=["c1"]))["notify"] == "c1"
    watch(keys=[job_key("a")], args=["c1"])
    watch(keys=[job_key("a")], args=["c2"])
    assert scratch_redis.hget(job_key("a"), "notify") == "c1,c2"
    assert pairs(watch(keys=[job_key("ended")], args=["c1"]))["status"] == SUCCEEDED
    assert not scratch_redis.hexists(job_key("ended"), "notify")  # ended: nothing left to tell


# -- follow.lua -----------------------------------------------------------------------------------------------
def test_follow_marks_the_job_followed_and_says_whether_its_stream_exists(scratch_redis):
    follow = scratch_redis.register_script(scripts.FOLLOW)
    job(scratch_redis, "a", RUNNING)
    keys = [job_key("a"), job_events_key("a")]
    assert follow(keys=[job_key("gone"), job_events_key("gone")]) is None
    assert follow(keys=keys) == [RUNNING, 0] and scratch_redis.hget(job_key("a"), "followed") == "1"
    scratch_redis.xadd(job_events_key("a"), {"type": "chunk"})
    assert follow(keys=keys) == [RUNNING, 1]


# -- append_chunk.lua -----------------------------------------------------------------------------------------
def test_append_chunk_appends_each_index_once_while_the_job_runs(scratch_redis):
    append = scratch_redis.register_script(scripts.APPEND_CHUNK)
    keys = [job_key("a"), job_events_key("a")]
    job(scratch_redis, "a")
    assert append(keys=keys, args=[0, '{"text":"a"}', 60]) == -1  # not running
    scratch_redis.hset(job_key("a"), mapping={"status": RUNNING, "ttl": "30"})
    assert append(keys=keys, args=[0, '{"text":"a"}', 60]) == 1
    assert append(keys=keys, args=[1, '{"text":"b"}', 60]) == 1
    assert append(keys=keys, args=[0, '{"text":"a"}', 60]) == 0  # a retry publishing chunk 0 again
    assert [(e["index"], e["data"]) for e in stream(scratch_redis, "a")] == [
        ("0", '{"text":"a"}'),
        ("1", '{"text":"b"}'),
    ]
    assert scratch_redis.hget(job_key("a"), "chunks") == "2" and 0 < scratch_redis.ttl(job_events_key("a")) <= 30
    scratch_redis.hset(job_key("a"), "cancel_requested", "1")
    assert append(keys=keys, args=[2, '{"text":"c"}', 60]) == -2
    assert len(stream(scratch_redis, "a")) == 2


# -- append_status.lua ----------------------------------------------------------------------------------------
def test_append_status_notes_only_a_running_jobs_stream(scratch_redis):
    append = scratch_redis.register_script(scripts.APPEND_STATUS)
    keys = [job_key("a"), job_events_key("a")]
    job(scratch_redis, "a")
    assert append(keys=keys, args=['{"status":"queued"}', 60]) == 0 and not scratch_redis.exists(keys[1])
    scratch_redis.hset(job_key("a"), "status", RUNNING)
    assert append(keys=keys, args=['{"status":"queued"}', 60]) == 1
    assert stream(scratch_redis, "a") == [{"type": "status", "data": '{"status":"queued"}'}]
    assert 0 < scratch_redis.ttl(keys[1]) <= 60
