"""Health, readiness, workers and metrics: the status code is the answer."""

from __future__ import annotations

import time
from collections import Counter

from flask import current_app
from flask.views import MethodView

from api.auth import READ_MODELS, requires
from api.json_provider import Blueprint
from api.schemas import HealthSchema, WorkersSchema
from api.services import services
from tasks.names import CPU_QUEUE, queue_for_device
from tasks.queues import lane_depths
from tasks.states import LOADED

blp = Blueprint("health", __name__, description="Health and monitoring")

NO_WORKER = "no live worker; start one with `python manage.py worker --device cpu`"


def health_checks(readiness: bool = False) -> tuple[bool, dict]:
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
        svc.cluster.redis.ping()
        checks["redis"] = {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
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


def _reply(healthy: bool, checks: dict):
    return {"status": "ok" if healthy else "degraded", "checks": checks}, 200 if healthy else 503


@blp.route("/health")
class Health(MethodView):
    @blp.doc(security=[])  # open: probes and Prometheus need no credentials (see api/security.py)
    @blp.response(200, HealthSchema, description="Redis answers and at least one worker is alive")
    @blp.alt_response(503, schema=HealthSchema, description="Degraded: the failing check is named")
    def get(self):
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
        return current_app.extensions["aethercore_metrics"].response()
