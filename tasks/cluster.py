"""Desired and observed model state of the whole cluster, kept in Redis.

* desired: which model should be resident on which device (`aethercore:models:desired`),
  written by load/unload jobs and lazy loads; every worker of that device reconciles to it.
* observed: each worker's heartbeat record (`aethercore:worker:{name}`, with a TTL) lists the
  models resident in it. A worker that dies stops refreshing its record and drops out of
  every listing after `worker_ttl` seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from tasks.names import (
    DESIRED_MODELS,
    GENERATION_COUNTER,
    MODEL_ERRORS,
    MODELS_CHANGED,
    SIGNATURES,
    WORKERS_INDEX,
    control_channel,
    worker_key,
)
from tasks.redis_client import text
from tasks.states import LOADED, LOADING, MODEL_FAILED, UNLOADED, UNLOADING


class ClusterState:
    def __init__(self, client: redis.Redis, worker_ttl_s: int) -> None:
        self.redis = client
        self.worker_ttl_s = worker_ttl_s

    # -- workers -----------------------------------------------------------------------------
    def publish_worker(self, record: dict[str, Any], also: Callable[[Any], None] | None = None) -> None:
        """Write the worker's record; `also(pipe)` adds more writes to the same round trip (the heartbeat's)."""
        now = time.time()
        record = dict(record, heartbeat_at=now)
        pipe = self.redis.pipeline()
        pipe.set(worker_key(record["name"]), json.dumps(record), ex=self.worker_ttl_s)
        pipe.zadd(WORKERS_INDEX, {record["name"]: now})
        pipe.zremrangebyscore(WORKERS_INDEX, "-inf", now - self.worker_ttl_s)
        if also is not None:
            also(pipe)
        pipe.execute()

    def remove_worker(self, name: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(worker_key(name))
        pipe.zrem(WORKERS_INDEX, name)
        pipe.execute()

    def live_workers(self, device: str | None = None) -> list[dict[str, Any]]:
        names = self.redis.zrangebyscore(WORKERS_INDEX, time.time() - self.worker_ttl_s, "+inf")
        if not names:
            return []
        records = []
        now = time.time()
        for raw in self.redis.mget([worker_key(text(n)) for n in names]):
            if not raw:
                continue
            record = json.loads(raw)
            if device is None or record.get("device") == device:
                record["heartbeat_age_s"] = round(max(0.0, now - record.get("heartbeat_at", now)), 3)
                records.append(record)
        return sorted(records, key=lambda r: r["name"])

    # -- desired model state -----------------------------------------------------------------
    def desire(self, model_id: str, device: str, job_id: str | None = None) -> int:
        """Mark `model_id` as meant to be resident on `device`; returns the new generation."""
        generation = int(self.redis.incr(GENERATION_COUNTER))
        entry = {"device": device, "generation": generation, "requested_at": time.time(), "job_id": job_id}
        pipe = self.redis.pipeline()
        pipe.hset(DESIRED_MODELS, model_id, json.dumps(entry))
        pipe.hdel(MODEL_ERRORS, model_id)
        pipe.publish(MODELS_CHANGED, model_id)  # API processes drop their cached view of it
        pipe.execute()
        return generation

    def ensure_desired(self, model_id: str, device: str) -> dict[str, Any]:
        """Lazy load: keep an existing entry for this device, else create one."""
        entry = self.desired(model_id)
        if entry and entry["device"] == device:
            return entry
        self.desire(model_id, device)
        return self.desired(model_id) or {}

    def undesire(self, model_id: str, device: str | None = None) -> bool:
        entry = self.desired(model_id)
        if entry is None or (device is not None and entry["device"] != device):
            return False
        pipe = self.redis.pipeline()
        pipe.hdel(DESIRED_MODELS, model_id)
        pipe.publish(MODELS_CHANGED, model_id)
        return bool(pipe.execute()[0])

    def desired(self, model_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(DESIRED_MODELS, model_id)
        return json.loads(raw) if raw else None

    def all_desired(self) -> dict[str, dict[str, Any]]:
        return {text(mid): json.loads(raw) for mid, raw in self.redis.hgetall(DESIRED_MODELS).items()}

    def record_error(self, model_id: str, message: str, code: str, worker: str) -> None:
        self.redis.hset(
            MODEL_ERRORS, model_id, json.dumps({"message": message, "code": code, "worker": worker, "at": time.time()})
        )

    def model_error(self, model_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(MODEL_ERRORS, model_id)
        return json.loads(raw) if raw else None

    def publish_signatures(self, signatures: dict[str, dict[str, Any]]) -> None:
        if signatures:
            self.redis.hset(SIGNATURES, mapping={mid: json.dumps(sig) for mid, sig in signatures.items()})

    def signatures(self) -> dict[str, dict[str, Any]]:
        return {text(mid): json.loads(raw) for mid, raw in self.redis.hgetall(SIGNATURES).items()}

    def notify(self, device: str) -> None:
        self.redis.publish(control_channel(device), "reconcile")

    # -- the view clients see ----------------------------------------------------------------
    def replicas(self, model_id: str, workers: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        workers = self.live_workers() if workers is None else workers
        out = []
        for record in workers:
            info = record.get("models", {}).get(model_id)
            if info:
                out.append({"worker": record["name"], "device": record["device"], **info})
        return out

    def model_status(self, model_id: str, workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        workers = self.live_workers() if workers is None else workers
        replicas = self.replicas(model_id, workers)
        desired = self.desired(model_id)
        error = self.model_error(model_id)
        states = {r["state"] for r in replicas}
        if desired:
            if LOADED in states:
                state = LOADED
            else:
                state = LOADING
        elif LOADED in states:
            state = UNLOADING  # no longer wanted; replicas are dropping it
        elif error:
            state = MODEL_FAILED  # (a replica may still be finishing a load it started; it drops it next)
        else:
            state = UNLOADED
        return {
            "model_id": model_id,
            "state": state,
            "device": desired["device"] if desired else None,
            "replicas": replicas,
            "error": error,
        }
