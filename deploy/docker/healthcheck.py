"""The containers' health checks (the images' HEALTHCHECK, compose's healthchecks, Kubernetes' probes), one per role:

    python -m deploy.docker.healthcheck api|worker|dispatcher|batches [--redis-down-ok]
                                                           exit 0 healthy, 1 not (the reason on stdout)

* api: this container's API answers /health/live, over the scheme its own settings serve (https when
  AETHERCORE_TLS_CERT is set: docker-compose.tls.yml). The certificate is verified, deliberately against the one the
  settings name (the trust anchor is AETHERCORE_TLS_CERT itself), not a host name: the probe dials 127.0.0.1, which
  a certificate for the service's public name need not list, and what it must prove is that this server serves the
  certificate it was given.
* worker: a worker of this container has a fresh heartbeat in Redis. A worker heartbeats every
  AETHERCORE_HEARTBEAT_INTERVAL s into the record the API and the reaper read (the reaper takes a worker's jobs
  back once it is stale): its process is alive and reaches Redis, and the cluster counts it as live.
* dispatcher: a webhook dispatcher of this container has a fresh heartbeat in Redis (webhooks/dispatcher.py
  beats every 2 s).
* batches: a batch driver of this container has a fresh heartbeat in Redis (batches/driver.py beats every 2 s,
  from a thread of its own, so a long validation pass does not look like a hang).

Workers, dispatchers and batch drivers are named `<...>@<hostname>`: the container's (Kubernetes: the pod's) host
name says which are its own.

`--redis-down-ok` (Kubernetes' liveness probes): Redis not answering counts as healthy. A liveness probe restarts a
process that is stuck; a worker, dispatcher or batch driver whose Redis is away reconnects by itself when it is
back, and restarting every one of them (a GPU worker reloads its models for minutes) would only slow the recovery. A
Redis that answers and holds no fresh heartbeat of this container is what fails it.
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable

import redis

from config.settings import Settings
from tasks.cluster import ClusterState
from tasks.names import BATCH_DRIVERS, WEBHOOK_DISPATCHERS
from tasks.redis_client import make_redis

# A dispatcher or a batch driver counts as alive this long after its last heartbeat (as the API's /health counts
# them).
HEARTBEAT_FRESH_S = 10
PROBE_TIMEOUT_S = 3


def api(settings: Settings) -> str | None:
    """None when this container's API answers /health/live, else why not."""
    context = None
    if settings.tls:
        context = ssl.create_default_context(cafile=str(settings.tls_cert))
        context.check_hostname = False
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the server's own certificate is the trust anchor
    url = f"{'https' if settings.tls else 'http'}://127.0.0.1:{settings.port}/health/live"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S, context=context) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except OSError as exc:  # refused, timed out, a TLS failure, an HTTP error status
        return f"{url}: {type(exc).__name__}: {exc}"


def worker(settings: Settings) -> str | None:
    workers = ClusterState(_redis(settings), settings.worker_ttl).live_workers()
    return _none_mine("worker", [w["name"] for w in workers])


def dispatcher(settings: Settings) -> str | None:
    alive = _redis(settings).zrangebyscore(WEBHOOK_DISPATCHERS, time.time() - HEARTBEAT_FRESH_S, "+inf")
    return _none_mine("webhook dispatcher", [_text(name) for name in alive])


def batches(settings: Settings) -> str | None:
    alive = _redis(settings).zrangebyscore(BATCH_DRIVERS, time.time() - HEARTBEAT_FRESH_S, "+inf")
    return _none_mine("batch driver", [_text(name) for name in alive])


CHECKS: dict[str, Callable[[Settings], str | None]] = {
    "api": api,
    "worker": worker,
    "dispatcher": dispatcher,
    "batches": batches,
}


def _redis(settings: Settings):
    return make_redis(settings.redis_url, settings.redis_sentinel_master, **settings.redis_ssl())


def _none_mine(what: str, names: list[str]) -> str | None:
    here = f"@{socket.gethostname()}"
    return None if any(name.endswith(here) for name in names) else f"no live {what} named *{here}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def main(argv: list[str]) -> int:
    redis_down_ok = "--redis-down-ok" in argv
    roles = [a for a in argv if a != "--redis-down-ok"]
    if len(roles) != 1 or roles[0] not in CHECKS:
        print(f"usage: python -m deploy.docker.healthcheck {'|'.join(CHECKS)} [--redis-down-ok]")
        return 2
    try:
        problem = CHECKS[roles[0]](Settings.from_env())
    except redis.AuthenticationError as exc:  # Redis answers, and refuses this container's password
        problem = f"{type(exc).__name__}: {exc}"
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        if redis_down_ok:
            print(f"healthy: {roles[0]} (Redis does not answer: {type(exc).__name__}; not this process's fault)")
            return 0
        problem = f"Redis does not answer: {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - settings unreadable, Redis refusing: "not healthy", with the reason
        problem = f"{type(exc).__name__}: {exc}"
    print(f"unhealthy: {problem}" if problem else f"healthy: {roles[0]}")
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
