"""Priority lanes on the worker's side: the one rule for how urgent a waiting job has become (`effective_rank`), the
aging that moves messages up a lane in Redis by that rule (`LaneAging`), and how lanes share a forward pass
(`PassCosts`).

Workers take the highest waiting lane first (kombu BRPOPs a queue's lane lists in priority order, and the batcher
puts a job behind the pending jobs of its own and higher effective rank only). Aging bounds what that costs the
lower lanes, relative to each job's own window:
* a job rises one lane per *aging step*: max(AETHERCORE_LANE_AGING_S, WINDOW_SHARE x its window), its window being
  deadline - submitted_at. A /serve job without a timeout rises one lane per AETHERCORE_LANE_AGING_S; a line of a
  24 h batch one lane per 6 h: it is not urgent after 30 s, and is `high` by the middle of its window, in time;
* its effective rank is its ORIGINAL lane's rank less one per step waited since submission (`effective_rank`), so
  a job is never promoted twice for the same wait. The Redis sweep, the batcher and the running batch's admission
  all ask this one function;
* in Redis, each worker's reaper pass moves a message one lane up only if its effective rank is above the lane it
  is in (atomically: only if it is still there), onto the end the workers take next;
* in the batcher, a job goes behind every pending job whose effective rank is as high as its own.
So a `low` job without a deadline waits at most 2 x AETHERCORE_LANE_AGING_S (plus a reaper pass per step) and then
the `high` work already ahead of it (tests/integration/test_lanes.py measures it under sustained `high` load).

A forward pass is shared between lanes by its cost (`PassCosts`, used by workers/batcher.py): the batcher learns
how long a pass takes by its size, lets lower lanes fill a pass that carries higher-lane jobs only up to the size
that costs what the higher-lane jobs' own pass would, and, while higher-lane work was seen recently, runs passes of
lower lanes alone only as large as keeps most of their throughput. On a GPU (a flat cost curve) batch lines still
ride along with interactive ones for free; on a CPU (cost linear in the size) they do not lengthen them.
"""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

import orjson

from config.lanes import LANES
from tasks.names import DEFAULT_LANE, lane_list

# The share of a job's window (deadline - submitted_at) it waits per lane it rises, when that is longer than
# AETHERCORE_LANE_AGING_S: two steps (low -> high) take half its window, leaving the other half to run it.
WINDOW_SHARE = 0.25
# How many of a lane's oldest messages one reaper pass looks at (a long window's message at the end of a lane does
# not hold back the aging of younger ones behind it).
SWEEP_DEPTH = 200

# Only if `message` is still in the lower lane (another worker may have taken or moved it): onto the end of the
# next lane up that BRPOP takes next.
_PROMOTE = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


def _lane_rank(lane: Any, otherwise: int = LANES.index(DEFAULT_LANE)) -> int:
    return LANES.index(lane) if lane in LANES else otherwise


def aging_step(submitted_at: float | None, deadline: float | None, aging_s: float) -> float:
    """Seconds of waiting that raise a job one lane: AETHERCORE_LANE_AGING_S, or WINDOW_SHARE of its window when that
    is longer; 0 when aging is off."""
    if aging_s <= 0:
        return 0.0
    window = deadline - submitted_at if submitted_at is not None and deadline is not None else 0.0
    return max(aging_s, WINDOW_SHARE * window)


def effective_rank(
    lane: str, submitted_at: float | None, deadline: float | None, aging_s: float, now: float | None = None
) -> int:
    """How urgent a job is now (0 high .. 2 low): its original lane's rank, one higher per aging step it has waited
    since submission. The one rule every place that orders jobs by lane follows."""
    rank = _lane_rank(lane)
    step = aging_step(submitted_at, deadline, aging_s)
    if step <= 0 or submitted_at is None:
        return rank
    waited = (now if now is not None else time.time()) - submitted_at
    return max(0, rank - int(max(0.0, waited) // step))


def _message_rank(message: bytes | str, here: int, aging_s: float, now: float) -> int | None:
    """The effective rank of a queued Celery message's most urgent job (`here`: the rank of the lane it is in, for a
    job that names none); None if the message says nothing about its jobs' times."""
    try:
        envelope = orjson.loads(message)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        jobs = orjson.loads(body)[1].get("jobs") or []
        ranks = [
            effective_rank(
                LANES[_lane_rank(job.get("priority"), here)],
                job["submitted_at"],
                job.get("deadline") if isinstance(job.get("deadline"), (int, float)) else None,
                aging_s,
                now,
            )
            for job in jobs
            if isinstance(job.get("submitted_at"), (int, float))
        ]
        return min(ranks) if ranks else None
    except Exception:
        return None


class LaneAging:
    def __init__(self, client: Any, queue: str, aging_s: float) -> None:
        self.client = client
        self.queue = queue
        self.aging_s = aging_s
        self._promote = client.register_script(_PROMOTE)

    def sweep(self, limit: int = SWEEP_DEPTH, now: float | None = None) -> int:
        """Move each of a lane's `limit` oldest messages whose effective rank is above that lane one lane up; how
        many moved."""
        if self.aging_s <= 0:
            return 0
        now = now if now is not None else time.time()
        moved = 0
        # The middle lane first: a message moves at most one lane per pass.
        for lower, higher in ((LANES[1], LANES[0]), (LANES[2], LANES[1])):
            source, target = lane_list(self.queue, lower), lane_list(self.queue, higher)
            here = LANES.index(lower)
            # Newest to oldest of the lane's end (LPUSH adds at the head), so the oldest is pushed last and taken first.
            due = [m for m in self.client.lrange(source, -limit, -1) if self._due(m, here, now)]
            if not due:
                continue
            pipe = self.client.pipeline(transaction=False)
            for message in due:
                self._promote(keys=[source, target], args=[message], client=pipe)
            moved += sum(int(n) for n in pipe.execute())
        return moved

    def _due(self, message: bytes | str, here: int, now: float) -> bool:
        """Whether a message belongs above the lane of rank `here` (one that says nothing of its jobs' times: yes)."""
        rank = _message_rank(message, here, self.aging_s, now)
        return rank is None or rank < here


# -- sharing a forward pass ---------------------------------------------------------------------------------------
# Lower lanes may fill a pass that carries higher-lane jobs while its estimated time stays within this share of the
# time of the higher-lane jobs' pass alone (the measurement's own noise: the pass is not made longer).
FILL_TOLERANCE = 0.05
# While higher-lane work was seen this recently, a pass of lower lanes alone is cut to the smallest size that keeps
# this share of the throughput the largest pass would have: a higher-lane job arriving waits for a short pass.
KEEP_THROUGHPUT = 0.9
HIGHER_LANE_MEMORY_S = 1.0
EWMA_ALPHA = 0.2


def _bucket(size: int) -> int:
    """The power of two a pass size is counted under (1, 2, 4, 8, ...)."""
    return 1 << max(0, size - 1).bit_length()


class PassCosts:
    """How long a forward pass takes by its size, learnt from the passes that ran: per power-of-two bucket of sizes,
    the EWMA of the sizes and of the times, joined by straight lines (beyond the largest, its last slope)."""

    def __init__(self) -> None:
        self._points: dict[int, list[float]] = {}  # bucket -> [size, seconds], both EWMAs
        self._lock = threading.Lock()

    def observe(self, size: int, seconds: float) -> None:
        with self._lock:
            point = self._points.get(_bucket(size))
            if point is None:
                self._points[_bucket(size)] = [float(size), seconds]
                return
            point[0] += EWMA_ALPHA * (size - point[0])
            point[1] += EWMA_ALPHA * (seconds - point[1])

    def estimate(self, size: int) -> float | None:
        """The time of a pass of `size` (None: no pass measured yet)."""
        with self._lock:
            points = sorted((s, t) for s, t in self._points.values())
        if not points:
            return None
        if len(points) == 1:
            s, t = points[0]
            return t * max(1.0, size / s)  # one size known: at least as long, as if linear beyond it
        if size <= points[0][0]:
            return points[0][1]
        for (s0, t0), (s1, t1) in zip(points, points[1:]):
            if size <= s1:
                return t0 + (t1 - t0) * (size - s0) / max(1e-9, s1 - s0)
        (s0, t0), (s1, t1) = points[-2], points[-1]
        return t1 + max(0.0, (t1 - t0) / max(1e-9, s1 - s0)) * (size - s1)

    def fill_size(self, lead: int, most: int) -> int:
        """How large a pass that carries `lead` higher-lane jobs may grow with lower-lane ones (at most `most`): as
        large as costs what the lead's own pass would."""
        alone = self.estimate(lead)
        if alone is None:
            return lead
        bound = alone * (1 + FILL_TOLERANCE)
        size = lead
        while size < most and (self.estimate(size + 1) or 0.0) <= bound:
            size += 1
        return size

    def short_size(self, most: int) -> int:
        """The smallest pass of lower lanes alone (at most `most`) with KEEP_THROUGHPUT of the best throughput."""
        sizes = sorted({min(most, _bucket(n)) for n in range(1, most + 1)})
        rates = [(size, size / t) for size in sizes if (t := self.estimate(size) or 0.0) > 0]
        if len(rates) < 2:
            return most
        best = max(rate for _size, rate in rates)
        return next(size for size, rate in rates if rate >= KEEP_THROUGHPUT * best)
