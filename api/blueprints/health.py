"""Health, heartbeat and metrics: the status code is the answer."""

from __future__ import annotations

import time
from collections import Counter

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from api.metrics import metrics_response
from api.schemas import HealthSchema
from api.services import services

blp = Blueprint("health", __name__, description="Health and monitoring")


def health_checks() -> tuple[bool, dict]:
    svc = services()
    checks: dict = {}
    started = time.perf_counter()
    try:
        svc.cluster.redis.ping()
        checks["redis"] = {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
        workers = svc.cluster.live_workers()
        by_device = Counter(w["device"] for w in workers)
        checks["workers"] = {"status": "ok" if workers else "fail", "live": len(workers),
                             "by_device": dict(by_device)}
        if not workers:
            checks["workers"]["error"] = "no live worker; start one with `python manage.py worker --device cpu`"
    except Exception as exc:
        checks["redis"] = {"status": "fail", "error": f"Redis is not reachable: {type(exc).__name__}"}
        checks["workers"] = {"status": "unknown", "error": "cannot be checked without Redis"}
    healthy = all(c["status"] == "ok" for c in checks.values())
    return healthy, checks


@blp.route("/health")
class Health(MethodView):
    @blp.response(200, HealthSchema, description="Redis answers and at least one worker is alive")
    @blp.alt_response(503, schema=HealthSchema, description="Degraded: the failing check is named")
    def get(self):
        healthy, checks = health_checks()
        return {"status": "ok" if healthy else "degraded", "checks": checks}, 200 if healthy else 503


@blp.route("/heartbeat")
class Heartbeat(MethodView):
    @blp.response(200, HealthSchema, description="The API process is alive")
    def get(self):
        return {"status": "ok", "checks": {"api": {"status": "ok", "time": time.time()}}}


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.response(200, description="Prometheus text exposition format")
    def get(self):
        return metrics_response(current_app.extensions["aethercore_metrics"])
