"""The worker image's HEALTHCHECK: healthy while a worker of this container has a fresh heartbeat in Redis.

A worker is serving when it heartbeats (every AETHERCORE_HEARTBEAT_INTERVAL s, into the record the API and the
reaper read): its process is alive, it reaches Redis, and its service loop runs. Exit 0 healthy, 1 not.
"""

import socket
import sys

from config.settings import Settings
from tasks.cluster import ClusterState
from tasks.redis_client import make_redis


def main() -> int:
    settings = Settings.from_env()
    try:
        client = make_redis(settings.redis_url, settings.redis_sentinel_master, **settings.redis_ssl())
        workers = ClusterState(client, settings.worker_ttl).live_workers()
    except Exception as exc:  # noqa: BLE001 - any failure to read the heartbeats is "not healthy"
        print(f"unhealthy: cannot read the workers' heartbeats: {type(exc).__name__}: {exc}")
        return 1
    here = f"@{socket.gethostname()}"  # worker names end with @<hostname> (workers/main.py)
    mine = [w["name"] for w in workers if w["name"].endswith(here)]
    print(f"healthy: {', '.join(mine)}" if mine else f"unhealthy: no live worker named *{here}")
    return 0 if mine else 1


if __name__ == "__main__":
    sys.exit(main())
