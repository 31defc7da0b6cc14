"""Whether the service takes one more job now, before it exists: Redis's memory, and the depth of the lanes the job
would wait behind (read at most every QUEUE_DEPTH_CACHE_S per device, plus what this process queued since). The
caller's own limits (role, lane grant, rate limit) are the submitter's (submitter.py); this is the service's side.

May import: config/, tasks/, submission/."""

from __future__ import annotations

from typing import Any

from config.settings import Settings
from submission.errors import QUEUE_FULL, REDIS_FULL, Refused
from tasks.names import LANES, queue_for_device
from tasks.queues import lane_depths
from tasks.ttl_cache import TTLCache

# Backpressure reads the queue length at most this often per device: a bound, not an exact count.
QUEUE_DEPTH_CACHE_S = 0.25
# The lanes interactive callers use; `low` is the lane of batch lines (the batch driver), bounded apart.
INTERACTIVE_LANES, BATCH_LANE = LANES[:2], LANES[2]
# New inference jobs are refused (503) once Redis uses this share of its maxmemory, read at most once a second.
REDIS_MEMORY_LIMIT = 0.95
REDIS_MEMORY_CACHE_S = 1.0


class Admission:
    def __init__(self, settings: Settings, redis: Any) -> None:
        self.settings = settings
        self.redis = redis
        self.depth_cache = TTLCache(QUEUE_DEPTH_CACHE_S)
        self.memory_cache = TTLCache(REDIS_MEMORY_CACHE_S)

    def check(self, device: str, lane: str) -> int:
        """503 `redis_full` (`check_redis_memory`), else 429 `queue_full` when the lanes this submission waits behind
        are at their bound: the interactive lanes (`high`, `normal`) at AETHERCORE_MAX_QUEUE_DEPTH for an interactive
        job, the `low` lane at AETHERCORE_LOW_LANE_QUEUE_DEPTH for a `low` one. A backlog of batch lines never refuses
        an interactive caller."""
        self.check_redis_memory()
        queue = queue_for_device(device)
        low = lane == BATCH_LANE
        limit, setting = (
            (self.settings.low_lane_queue_depth, "AETHERCORE_LOW_LANE_QUEUE_DEPTH")
            if low
            else (self.settings.max_queue_depth, "AETHERCORE_MAX_QUEUE_DEPTH")
        )
        # What was waiting when last read, plus what this process queued since: exact for one API process, a bound
        # within QUEUE_DEPTH_CACHE_S for several.
        depth = self.queued_ahead(device, lane) + self.depth_cache.bump(_depth_key(queue, lane))
        if depth >= limit:
            lanes = "low lane" if low else "interactive lanes (high, normal)"
            raise Refused(
                QUEUE_FULL,
                f"the {device} queue's {lanes} hold {depth} jobs, at their limit ({setting}={limit}); retry later",
                {"queue": queue, "depth": depth, "lane": lane},
                retry_after_s=5,
            )
        return depth

    def queued_ahead(self, device: str, lane: str) -> int:
        """Messages waiting in the device queue's lanes of `lane`'s class (the interactive lanes, or `low`), as last
        read: one pipelined LLEN per lane, at most once per QUEUE_DEPTH_CACHE_S."""
        queue = queue_for_device(device)
        key = _depth_key(queue, lane)

        def load() -> int:
            return sum(lane_depths(self.redis, queue)[n] for n in key[1])

        return int(self.depth_cache.get(key, load))

    def check_redis_memory(self) -> None:
        """503 before Redis refuses writes: new jobs (and files, batches) stop at REDIS_MEMORY_LIMIT of its
        maxmemory, so the jobs already queued or running can still write their results (a full Redis would fail
        them half-way)."""
        used, limit = self.memory_cache.get("redis", self._redis_memory)
        if limit and used >= REDIS_MEMORY_LIMIT * limit:
            raise Refused(
                REDIS_FULL,
                f"Redis holds {used / 2**20:.0f} MiB of its maxmemory of "
                f"{limit / 2**20:.0f} MiB; new jobs are refused until finished results expire "
                "(AETHERCORE_RESULT_TTL, or result_ttl per request) or Redis gets more memory",
                {"used_memory": used, "maxmemory": limit},
                retry_after_s=30,
            )

    def holdings_limit(self) -> int:
        """AETHERCORE_HOLDINGS_MAX_SHARE of Redis's maxmemory, from the same cached read as `check_redis_memory`."""
        _used, limit = self.memory_cache.get("redis", self._redis_memory)
        return int(limit * self.settings.holdings_max_share)

    def _redis_memory(self) -> tuple[int, int]:
        info = self.redis.info("memory")
        return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))


def _depth_key(queue: str, lane: str) -> tuple[str, tuple[str, ...]]:
    return queue, (BATCH_LANE,) if lane == BATCH_LANE else INTERACTIVE_LANES
