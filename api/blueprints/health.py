"""Health, readiness, workers, metrics and holdings: the status code is the answer.

The open endpoints (`/health`, `/health/ready`, `/metrics` unless AETHERCORE_METRICS_AUTH) answer anyone, and tell
anyone only whether the service is healthy: what the checks found and the cluster's metrics go to the roles that
read the whole service (SEES_DETAILS). What they read from Redis is cached per process (CHECKS_CACHE_S here, the
metrics' in api/metrics.py), so no number of probes multiplies its round trips.
"""

from __future__ import annotations

import time
from collections import Counter

import marshmallow as ma
from flask import current_app, g, request
from flask.views import MethodView

from access.principal import READ_MODELS
from api.auth import principal, requires
from api.json_provider import Blueprint
from api.services import services
from config.roles import ADMIN, OPERATOR, VIEWER
from protocols.schemas import HealthSchema, WorkersSchema
from tasks.holdings import KINDS, Held
from tasks.names import CPU_QUEUE, queue_for_device
from tasks.queues import lane_depths
from tasks.replication import replication_state
from tasks.states import LOADED
from tasks.ttl_cache import TTLCache

blp = Blueprint("health", __name__, description="Health and monitoring")

NO_WORKER = "no live worker; start one with `python manage.py worker --device cpu`"
# The checks are computed at most this often per API process, however many probes ask (a flood of anonymous
# probes costs Redis one set of round trips per second per process, not one per request).
CHECKS_CACHE_S = 1.0
# Who sees what the checks and the cluster's metrics found (model names, queue depths, each owner's holdings): the
# roles that read the whole service. An anonymous caller, or a `user` (one tenant), gets each check's status only.
SEES_DETAILS = (ADMIN, OPERATOR, VIEWER)


def health_checks(readiness: bool = False) -> tuple[bool, dict]:
    """`computed_checks`, as this process computed them within the last CHECKS_CACHE_S."""
    cache = current_app.extensions.get("aethercore_health_cache")
    if cache is None:  # the app's first probe (two at once make one cache each; the last one kept serves)
        cache = current_app.extensions["aethercore_health_cache"] = TTLCache(CHECKS_CACHE_S)
    return cache.get(readiness, lambda: computed_checks(readiness))


def computed_checks(readiness: bool) -> tuple[bool, dict]:
    """Redis and workers (and, for readiness, every model meant to be loaded is loaded somewhere)."""
    svc = services()
    checks: dict = {
        "transport": {
            "status": "ok",
            "https": svc.settings.tls,
            "redis_tls": svc.settings.redis_url.startswith("rediss://"),
        }
    }
    started = time.perf_counter()
    try:
        replication = replication_state(svc.cluster.redis)  # the round trip that also proves Redis answers
        checks["redis"] = {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
        checks["redis"].update(replication)
        wanted = svc.settings.redis_min_replicas_ack
        if replication["role"] != "primary":
            checks["redis"].update(status="fail", error="connected to a replica, not the primary (a failover?)")
        elif replication["replicas_online"] < wanted:
            checks["redis"].update(
                status="fail",
                error=f"{replication['replicas_online']} replica(s) online, AETHERCORE_REDIS_MIN_REPLICAS_ACK wants "
                f"{wanted}: writes are answered 503 not_replicated",
            )
        workers = svc.cluster.live_workers()
        checks["workers"] = {
            "status": "ok" if workers else "fail",
            "live": len(workers),
            "by_device": dict(Counter(w["device"] for w in workers)),
            "oldest_heartbeat_age_s": max((w["heartbeat_age_s"] for w in workers), default=None),
        }
        if not workers:
            checks["workers"]["error"] = NO_WORKER
        devices = {CPU_QUEUE} | {w["device"] for w in workers}
        lanes = {d: lane_depths(svc.cluster.redis, queue_for_device(d)) for d in sorted(devices)}
        checks["queues"] = {
            "status": "ok",
            "depth": {d: sum(by_lane.values()) for d, by_lane in lanes.items()},
            "lanes": lanes,  # messages waiting per priority lane (high, normal, low)
        }
        # Informational (never fails the check): dead letters kept per queue, and the webhook deliveries' queue.
        checks["dead_letters"] = {"status": "ok", "depth": svc.dead_letters.depth()}
        deliveries = svc.deliveries.depth()
        checks["webhooks"] = {"status": "ok", **deliveries}
        if deliveries["new"] + deliveries["retrying"] and not deliveries["dispatchers"]:
            checks["webhooks"]["error"] = (
                "webhook deliveries wait and no dispatcher is alive; start one with `python manage.py dispatcher`"
            )
        # The batches are driven by `manage.py batches` processes, not by the API: say so when none is alive.
        batches = current_app.extensions["aethercore_batches"]["batches"].depth()
        checks["batches"] = {"status": "ok", **batches}
        if batches["active"] and not batches["drivers"]:
            checks["batches"]["error"] = (
                "batches are unfinished and no batch driver is alive; start one with `python manage.py batches`"
            )
        if readiness:
            desired = svc.cluster.all_desired()
            missing = sorted(
                mid for mid in desired if not any(r["state"] == LOADED for r in svc.cluster.replicas(mid, workers))
            )
            checks["models"] = {
                "status": "fail" if missing else "ok",
                "desired": sorted(desired),
                "not_loaded": missing,
            }
            if missing:
                checks["models"]["error"] = f"meant to be loaded but not resident anywhere: {', '.join(missing)}"
    except Exception as exc:
        checks["redis"] = {"status": "fail", "error": f"Redis is not reachable: {type(exc).__name__}"}
        checks["workers"] = {"status": "unknown", "error": "cannot be checked without Redis"}
    healthy = all(c["status"] == "ok" for c in checks.values())
    return healthy, checks


def caller_sees_details() -> bool:
    """Whether this request's caller may see the details of an open endpoint. Credentials are optional here, but
    checked when presented (a wrong one is 401, counted like any failed authentication). With AETHERCORE_AUTH off
    every caller is an anonymous admin, and sees them."""
    authenticator = current_app.extensions["aethercore_auth"]
    presented = request.headers.get("X-API-Key", "").strip() or request.headers.get("Authorization", "").strip()
    if authenticator.enabled and not presented:
        return False
    who = g.get("principal") or authenticator.authenticate()
    return who.role in SEES_DETAILS


def _reply(healthy: bool, checks: dict):
    if not caller_sees_details():
        checks = {name: {"status": check["status"]} for name, check in checks.items()}
    return {"status": "ok" if healthy else "degraded", "checks": checks}, 200 if healthy else 503


@blp.route("/health")
class Health(MethodView):
    @blp.doc(security=[])  # open: probes and Prometheus need no credentials (see api/security.py)
    @blp.response(200, HealthSchema, description="Redis answers and at least one worker is alive")
    @blp.alt_response(503, schema=HealthSchema, description="Degraded: the failing check is named")
    def get(self):
        """Each check's status; with admin, operator or viewer credentials also what it found (Redis's latency,
        workers per device, queue depths per lane, dead letters, webhook deliveries, unfinished batches and their
        drivers)."""
        return _reply(*health_checks())


@blp.route("/health/live")
class Live(MethodView):
    @blp.doc(security=[])  # open: probes and Prometheus need no credentials (see api/security.py)
    @blp.response(200, HealthSchema, description="The API process is alive (no dependency is checked)")
    def get(self):
        return {"status": "ok", "checks": {"api": {"status": "ok"}}}


@blp.route("/health/ready")
class Ready(MethodView):
    @blp.doc(security=[])  # open: probes and Prometheus need no credentials (see api/security.py)
    @blp.response(
        200,
        HealthSchema,
        description="Redis answers, a worker is alive, every model meant to be loaded is resident somewhere",
    )
    @blp.alt_response(503, schema=HealthSchema, description="Not ready: the failing check is named")
    def get(self):
        """As /health, plus the models meant to be loaded (named only to admin, operator and viewer credentials)."""
        return _reply(*health_checks(readiness=True))


@blp.route("/heartbeat")
class Heartbeat(MethodView):
    @blp.doc(security=[])  # open: probes and Prometheus need no credentials (see api/security.py)
    @blp.response(200, HealthSchema, description="The API process is alive")
    def get(self):
        return {"status": "ok", "checks": {"api": {"status": "ok", "time": time.time()}}}


@blp.route("/workers")
class Workers(MethodView):
    @blp.response(200, WorkersSchema, description="Live workers with device, heartbeat age, resident models and memory")
    @requires(*READ_MODELS)
    def get(self):
        workers = services().cluster.live_workers()
        out = []
        for w in workers:
            out.append(
                {
                    "name": w["name"],
                    "device": w["device"],
                    "queue": w["queue"],
                    "hostname": w["hostname"],
                    "pid": w["pid"],
                    "started_at": w["started_at"],
                    "heartbeat_age_s": w["heartbeat_age_s"],
                    "concurrency": w.get("concurrency"),
                    "memory": w.get("memory", {}),
                    "models": {
                        mid: {k: v for k, v in info.items() if k != "info"} for mid, info in w.get("models", {}).items()
                    },
                }
            )
        return {"workers": out}


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.doc(security=[])  # open: probes and Prometheus need no credentials (see api/security.py)
    @blp.response(200, description="Prometheus text exposition format", content_type="text/plain")
    def get(self):
        """The API's request metrics; with admin, operator or viewer credentials also the cluster's (models, queues,
        jobs, webhooks, dead letters, each owner's holdings). AETHERCORE_METRICS_AUTH=true: credentials required."""
        return current_app.extensions["aethercore_metrics"].response(cluster=caller_sees_details())


class HeldSchema(ma.Schema):
    bytes = ma.fields.Integer()
    objects = ma.fields.Integer()


class OwnerHoldingsSchema(ma.Schema):
    owner = ma.fields.String(metadata={"description": "key:<id>, env:<digest>, jwt:<subject> or anonymous"})
    kinds = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Nested(HeldSchema))
    bytes = ma.fields.Integer()
    objects = ma.fields.Integer()


class QuotaSchema(ma.Schema):
    max_bytes = ma.fields.Integer(metadata={"description": "0: no limit of bytes for this kind"})
    max_count = ma.fields.Integer(metadata={"description": "0: no limit of objects for this kind"})


class HoldingsSchema(ma.Schema):
    owners = ma.fields.List(ma.fields.Nested(OwnerHoldingsSchema))
    quotas = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Nested(QuotaSchema))
    totals = ma.fields.Nested(OwnerHoldingsSchema, metadata={"description": "Every owner's (whole-service readers)"})
    limit_bytes = ma.fields.Integer(
        metadata={"description": "What every owner's objects may take together; 0: no limit (whole-service readers)"}
    )


def _owner_entry(owner: str, usage: dict[str, Held]) -> dict:
    return {
        "owner": owner,
        "kinds": {kind: {"bytes": usage[kind].bytes, "objects": usage[kind].count} for kind in KINDS},
        "bytes": sum(held.bytes for held in usage.values()),
        "objects": sum(held.count for held in usage.values()),
    }


@blp.route("/holdings")
class HoldingsView(MethodView):
    @blp.response(200, HoldingsSchema, description="What each owner makes the service keep, with the quotas")
    @requires(*READ_MODELS)
    def get(self):
        """Bytes and objects each owner makes the service keep, per kind (files, batch outputs, batches, dead
        letters, webhook deliveries, Idempotency-Key records), and each kind's quota per owner. Admin, operator and
        viewer credentials see every owner, the totals and the share of Redis all of it may take; anyone else
        their own account."""
        svc = services()
        holdings = svc.holdings
        quotas = {kind: {"max_bytes": q.max_bytes, "max_count": q.max_count} for kind, q in holdings.quotas.items()}
        who = principal()
        if who.role not in SEES_DETAILS:
            return {"owners": [_owner_entry(who.id, holdings.usage(who.id))], "quotas": quotas}
        owners = [_owner_entry(owner, usage) for owner, usage in sorted(holdings.usage_by_owner().items())]
        return {
            "owners": owners,
            "quotas": quotas,
            "totals": _owner_entry("*", holdings.totals()),
            "limit_bytes": holdings.total_limit,
        }
