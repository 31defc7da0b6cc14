"""Priority lanes: the worker's order (batcher, running-batch admission), the rank a wait earns, the message's
lane list, and aging in Redis (a real Redis)."""

from __future__ import annotations

import time

import orjson

from tasks.messages import TaskMessages
from tasks.names import LANES, lane_list
from workers.batcher import ModelBatcher, Request
from workers.lanes import LaneAging, effective_rank
from workers.runtimes.scheduling import RunningBatch, Sequence


def pending_order(batcher: ModelBatcher, ranks: list[int]) -> list[int]:
    batcher._pending.clear()
    for i, rank in enumerate(ranks):
        batcher._enqueue(Request({"i": i}, {}, "{}", 0, rank=rank))
    return [r.inputs["i"] for r in batcher._pending]


def bare_batcher(aging_s: float = 0.0) -> ModelBatcher:
    batcher = ModelBatcher.__new__(ModelBatcher)
    batcher._pending = __import__("collections").deque()
    batcher.lane_aging_s = aging_s
    return batcher


def test_the_batcher_puts_a_job_behind_its_own_and_higher_lanes_only():
    #                          low low normal high low high
    assert pending_order(bare_batcher(), [2, 2, 1, 0, 2, 0]) == [3, 5, 2, 0, 1, 4]


def test_nothing_overtakes_a_job_pending_past_the_aging_time():
    batcher = bare_batcher(aging_s=0.05)
    pending_order(batcher, [2])
    batcher._pending[0].arrived -= 1.0  # has waited a second
    batcher._enqueue(Request({"i": 9}, {}, "{}", 0, rank=0))
    assert [r.inputs["i"] for r in batcher._pending] == [0, 9]


def test_a_wait_earns_one_lane_per_aging_period():
    now = 1000.0
    assert effective_rank("low", now, 30, now) == 2
    assert effective_rank("low", now - 31, 30, now) == 1
    assert effective_rank("low", now - 95, 30, now) == 0
    assert effective_rank("high", now - 500, 30, now) == 0
    assert effective_rank("low", now - 500, 0, now) == 2  # aging off


def test_generation_admission_takes_higher_lanes_first():
    batch = RunningBatch(max_batch_size=8, kv_budget_bytes=1 << 30, bytes_per_token=0)
    for key, rank in (("low-1", 2), ("normal", 1), ("low-2", 2), ("high", 0)):
        batch.add(Sequence(key=key, prompt=[1, 2], max_new=4, rank=rank))
    assert [s.key for s in batch.waiting] == ["high", "normal", "low-1", "low-2"]


def test_each_lane_is_its_own_list_in_kombus_priority_order():
    assert lane_list("cpu", "high") == "cpu"  # control tasks (priority 0) share the high lane
    assert [lane_list("cuda:0", lane) for lane in LANES] == ["cuda:0", "cuda:0\x06\x163", "cuda:0\x06\x169"]
    message = orjson.loads(TaskMessages().build("t", {}, "cpu", priority=9))
    assert message["properties"]["priority"] == 9


def _message(submitted_at: float) -> bytes:
    return TaskMessages().build("aethercore.infer", {"model_id": "m", "jobs": [{"submitted_at": submitted_at}]}, "q")


def test_aging_moves_only_messages_past_the_aging_time_one_lane_up(scratch_redis):
    now = time.time()
    high, normal, low = (lane_list("q", lane) for lane in LANES)
    old, young = _message(now - 100), _message(now - 1)
    scratch_redis.lpush(low, old, young)  # old is the oldest: at the end BRPOP takes first
    scratch_redis.lpush(normal, _message(now - 2))
    aging = LaneAging(scratch_redis, "q", aging_s=30)
    assert aging.sweep(now=now) == 1
    assert scratch_redis.lrange(low, 0, -1) == [young.decode()]
    assert scratch_redis.lindex(normal, -1) == old.decode()  # next for the workers in its new lane
    assert scratch_redis.llen(high) == 0
    assert aging.sweep(now=now + 100) == 3  # normal's two -> high, then young -> normal: one lane per pass
    assert scratch_redis.llen(low) == 0 and scratch_redis.llen(high) == 2 and scratch_redis.llen(normal) == 1
