"""Which Redis is the primary and how far behind its replicas are: one `INFO replication` round trip, shown by
`/health` (check `redis`, details for operators) and `/metrics` (the `aethercore_redis_*` families)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily


def primary_address(client: redis.Redis) -> str:
    """The address this client writes to: the master the sentinels named last, or the URL's host and port."""
    pool = client.connection_pool
    address = getattr(pool, "master_address", None)
    if address:
        return f"{address[0]}:{address[1]}"
    kwargs = pool.connection_kwargs
    return f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}".rstrip(":")


def replication_state(client: redis.Redis) -> dict[str, Any]:
    """{role, primary, replicas_online, replicas: [{address, state, lag_bytes, last_ack_s}]}; lag_bytes is how
    much of the primary's replication stream a replica has not confirmed (what a failover to it would lose)."""
    info = client.info("replication")
    offset = int(info.get("master_repl_offset", 0))
    replicas = []
    for name, value in sorted(info.items()):
        if not (name.startswith("slave") and isinstance(value, dict)):
            continue
        replicas.append(
            {
                "address": f"{value.get('ip')}:{value.get('port')}",
                "state": value.get("state"),
                "lag_bytes": max(0, offset - int(value.get("offset", 0))),
                "last_ack_s": int(value.get("lag", 0)),
            }
        )
    return {
        "role": "primary" if info.get("role") == "master" else "replica",
        "primary": primary_address(client),
        "replicas_online": sum(r["state"] == "online" for r in replicas),
        "replicas": replicas,
    }


def replication_families(client: redis.Redis) -> Iterator[GaugeMetricFamily]:
    state = replication_state(client)
    primary = GaugeMetricFamily(
        "aethercore_redis_primary",
        "The Redis this service writes to (1, labelled with its address)",
        labels=["address"],
    )
    primary.add_metric([state["primary"]], 1)
    yield primary
    yield GaugeMetricFamily(
        "aethercore_redis_replicas_online",
        "Replicas of the primary past their first sync",
        value=state["replicas_online"],
    )
    lag = GaugeMetricFamily(
        "aethercore_redis_replication_lag_bytes",
        "Bytes of the primary's replication stream a replica has not confirmed (lost if it were promoted now)",
        labels=["replica"],
    )
    ack = GaugeMetricFamily(
        "aethercore_redis_replica_last_ack_seconds", "Seconds since a replica last confirmed", labels=["replica"]
    )
    for replica in state["replicas"]:
        lag.add_metric([replica["address"]], replica["lag_bytes"])
        ack.add_metric([replica["address"]], replica["last_ack_s"])
    yield lag
    yield ack
