"""Priority lanes: the worker's order (batcher, running-batch admission), the rank a wait earns, the message's
lane list, and aging in Redis (a real Redis)."""

from __future__ import annotations

import time

import orjson

from config.lanes import LANES
from tasks.messages import TaskMessages
from tasks.names import lane_list
from workers.batch_requests import Request
from workers.batcher import ModelBatcher
from workers.lanes import LaneAging, PassCosts, aging_step, effective_rank
from workers.runtimes.scheduling import RunningBatch, Sequence


def pending_order(batcher: ModelBatcher, lanes: list[str], submitted_at: float | None = None) -> list[int]:
    batcher._pending.clear()
    for i, lane in enumerate(lanes):
        batcher._enqueue(Request({"i": i}, {}, "{}", 0, lane=lane, submitted_at=submitted_at))
    return [r.inputs["i"] for r in batcher._pending]


def bare_batcher(aging_s: float = 0.0) -> ModelBatcher:
    batcher = ModelBatcher.__new__(ModelBatcher)
    batcher._pending = __import__("collections").deque()
    batcher._seen = {}
    batcher.lane_aging_s = aging_s
    return batcher


def test_the_batcher_puts_a_job_behind_its_own_and_higher_lanes_only():
    lanes = ["low", "low", "normal", "high", "low", "high"]
    assert pending_order(bare_batcher(), lanes) == [3, 5, 2, 0, 1, 4]


def test_nothing_overtakes_a_job_whose_wait_raised_it_to_its_own_rank():
    batcher = bare_batcher(aging_s=30)
    pending_order(batcher, ["low"], submitted_at=time.time() - 61)  # two aging steps: as urgent as `high` now
    batcher._enqueue(Request({"i": 9}, {}, "{}", 0, lane="high", submitted_at=time.time()))
    assert [r.inputs["i"] for r in batcher._pending] == [0, 9]


def test_a_wait_earns_one_lane_per_aging_step():
    now = 1000.0
    assert effective_rank("low", now, None, 30, now) == 2
    assert effective_rank("low", now - 31, None, 30, now) == 1
    assert effective_rank("low", now - 95, None, 30, now) == 0
    assert effective_rank("high", now - 500, None, 30, now) == 0
    assert effective_rank("low", now - 500, None, 0, now) == 2  # aging off


def test_the_aging_step_is_relative_to_the_jobs_window():
    now = 100_000.0
    day = 86_400.0
    assert aging_step(now, now + day, 30) == day / 4  # a line of a 24 h batch: one lane per 6 h
    assert effective_rank("low", now - 30, now - 30 + day, 30, now) == 2  # not urgent after 30 s...
    assert effective_rank("low", now - day / 2, now + day / 2, 30, now) == 0  # ...`high` by mid-window
    assert aging_step(now, now + 60, 30) == 30  # a short window: AETHERCORE_LANE_AGING_S
    assert aging_step(now, now + day, 0) == 0  # aging off


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


def _message(submitted_at: float, lane: str = "low", deadline: float | None = None) -> bytes:
    job = {"submitted_at": submitted_at, "priority": lane, **({"deadline": deadline} if deadline else {})}
    return TaskMessages().build("aethercore.infer", {"model_id": "m", "jobs": [job]}, "q")


def lanes_of(client) -> list[int]:
    return [client.llen(lane_list("q", lane)) for lane in LANES]


def test_aging_moves_only_messages_past_their_step_one_lane_up(scratch_redis):
    now = time.time()
    high, normal, low = (lane_list("q", lane) for lane in LANES)
    old, young = _message(now - 40), _message(now - 1)
    scratch_redis.lpush(low, old, young)  # old is the oldest: at the end BRPOP takes first
    scratch_redis.lpush(normal, _message(now - 2, "normal"))
    aging = LaneAging(scratch_redis, "q", aging_s=30)
    assert aging.sweep(now=now) == 1
    assert scratch_redis.lrange(low, 0, -1) == [young.decode()]
    assert scratch_redis.lindex(normal, -1) == old.decode()  # next for the workers in its new lane
    assert scratch_redis.llen(high) == 0


def test_a_message_promoted_once_is_not_promoted_again_before_its_next_step(scratch_redis):
    now = time.time()
    scratch_redis.lpush(lane_list("q", "low"), _message(now - 31))  # one step waited
    aging = LaneAging(scratch_redis, "q", aging_s=30)
    assert aging.sweep(now=now) == 1 and lanes_of(scratch_redis) == [0, 1, 0]
    for later in (1, 5, 28):  # the next reaper passes: still one step waited, still `normal`
        assert aging.sweep(now=now + later) == 0
    assert lanes_of(scratch_redis) == [0, 1, 0]
    assert aging.sweep(now=now + 30) == 1 and lanes_of(scratch_redis) == [1, 0, 0]  # two steps: `high`


def test_a_batch_line_with_a_24h_window_is_not_promoted_after_the_aging_time(scratch_redis):
    now = time.time()
    line = _message(now - 100, deadline=now - 100 + 86_400)
    short = _message(now - 50, deadline=now - 50 + 60)  # younger, but its window is a minute
    scratch_redis.lpush(lane_list("q", "low"), line, short)
    assert LaneAging(scratch_redis, "q", aging_s=30).sweep(now=now) == 1
    # the long window's line stays at the end of `low`; the short one behind it still aged
    assert scratch_redis.lrange(lane_list("q", "low"), 0, -1) == [line.decode()]
    assert scratch_redis.lrange(lane_list("q", "normal"), 0, -1) == [short.decode()]


def test_pass_costs_are_learnt_by_size_and_interpolated():
    costs = PassCosts()
    assert costs.estimate(8) is None and costs.fill_size(2, 32) == 2  # nothing measured: no filling
    costs.observe(1, 0.010)
    costs.observe(32, 0.165)  # a CPU: 5 ms per item over 5 ms per pass
    assert abs(costs.estimate(16) - 0.085) < 1e-9
    assert abs(costs.estimate(64) - 0.325) < 1e-9  # beyond the largest: its slope
    assert costs.fill_size(1, 32) == 1  # lower lanes would lengthen the pass
    assert costs.short_size(32) == 8  # 90 % of the best throughput (32/0.165 per s)
    gpu = PassCosts()
    gpu.observe(1, 0.0200)
    gpu.observe(32, 0.0206)  # flat: a pass of 32 costs what a pass of 1 does
    assert gpu.fill_size(1, 32) == 32 and gpu.short_size(32) == 32
