"""Priority lanes on the worker's side: how high a job ranks once it has waited, and the aging that moves long-waiting
messages up a lane in Redis, so no lane is starved for longer than AETHERCORE_LANE_AGING_S per lane.

Workers take the highest waiting lane first (kombu BRPOPs a queue's lane lists in priority order, and the
batcher puts a job behind the pending jobs of its own and higher lanes only). Aging bounds what that costs the
lower lanes, in both places a job waits:
* in Redis: each worker's reaper pass moves a lane's oldest message one lane up once its jobs were submitted at
  least AETHERCORE_LANE_AGING_S ago (atomically: only if it is still that lane's oldest), onto the end the
  workers take next;
* in the batcher: a job ranks one lane higher per AETHERCORE_LANE_AGING_S it has waited since submission, and no
  job is put ahead of one that has been pending that long.
So a `low` job waits at most about 2 x AETHERCORE_LANE_AGING_S plus the `high` work already ahead of it.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson

from tasks.names import LANES, lane_list

# Only if `message` is still the lane's oldest (another worker may have taken or moved it): onto the end of the
# next lane up that BRPOP takes next.
_PROMOTE = """
if redis.call('LINDEX', KEYS[1], -1) ~= ARGV[1] then return 0 end
redis.call('RPOP', KEYS[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


def effective_rank(lane: str, submitted_at: float | None, aging_s: float, now: float | None = None) -> int:
    """The lane's rank (0 high .. 2 low), one higher per `aging_s` the job has waited since submission."""
    rank = LANES.index(lane)
    if aging_s <= 0 or submitted_at is None:
        return rank
    waited = (now if now is not None else time.time()) - submitted_at
    return max(0, rank - int(max(0.0, waited) // aging_s))


def _submitted_at(message: bytes | str) -> float | None:
    """When the oldest job of a queued Celery message was submitted (None if the message says nothing)."""
    try:
        envelope = orjson.loads(message)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        jobs = orjson.loads(body)[1].get("jobs") or []
        times = [job["submitted_at"] for job in jobs if isinstance(job.get("submitted_at"), (int, float))]
        return min(times) if times else None
    except Exception:
        return None


class LaneAging:
    def __init__(self, client: Any, queue: str, aging_s: float) -> None:
        self.client = client
        self.queue = queue
        self.aging_s = aging_s
        self._promote = client.register_script(_PROMOTE)

    def sweep(self, limit: int = 200, now: float | None = None) -> int:
        """Move every message that has waited past the aging time one lane up (at most `limit`); how many moved."""
        if self.aging_s <= 0:
            return 0
        now = now if now is not None else time.time()
        moved = 0
        # The middle lane first: a message moves at most one lane per pass.
        for lower, higher in ((LANES[1], LANES[0]), (LANES[2], LANES[1])):
            source, target = lane_list(self.queue, lower), lane_list(self.queue, higher)
            for _ in range(limit):
                oldest = self.client.lindex(source, -1)
                if oldest is None:
                    break
                submitted = _submitted_at(oldest)
                if submitted is not None and now - submitted < self.aging_s:
                    break
                moved += int(self._promote(keys=[source, target], args=[oldest]))
        return moved
