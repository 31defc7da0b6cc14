"""What a device queue holds, lane by lane (config/lanes.py `LANES`): one Redis list per lane."""

from __future__ import annotations

from typing import Any

from config.lanes import LANES
from tasks.names import lane_list


def lane_depths(client: Any, queue: str) -> dict[str, int]:
    """Messages waiting in each lane of `queue` (one round trip)."""
    pipe = client.pipeline(transaction=False)
    for lane in LANES:
        pipe.llen(lane_list(queue, lane))
    return dict(zip(LANES, (int(n) for n in pipe.execute())))


def queue_depth(client: Any, queue: str) -> int:
    """Messages waiting in `queue`, every lane."""
    return sum(lane_depths(client, queue).values())
