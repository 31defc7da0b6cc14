"""Which device queue a model's jobs go to.

A model that is (or is being) resident somewhere keeps going to that device. Otherwise its
`device` setting decides: `cpu` and `cuda:N` are fixed; `cuda` and `auto` pick the live GPU
worker with the most free memory (`auto` falls back to the CPU, `cuda` does not).
"""

from __future__ import annotations

from typing import Any

from config.models import ModelSpec
from tasks.cluster import ClusterState
from tasks.names import CPU_QUEUE


class NoDeviceAvailable(RuntimeError):
    pass


def _best_gpu(workers: list[dict[str, Any]]) -> str | None:
    gpus = [w for w in workers if str(w.get("device", "")).startswith("cuda:")]
    if not gpus:
        return None
    best = max(gpus, key=lambda w: (w.get("memory", {}).get("gpu_free_bytes") or 0, w["device"]))
    return best["device"]


_UNREAD: Any = object()


def resolve_device(spec: ModelSpec, cluster: ClusterState, gpu_enabled: str, desired: Any = _UNREAD) -> str:
    """`desired`: the model's desired-state entry (or None) when the caller already read it."""
    desired = cluster.desired(spec.id) if desired is _UNREAD else desired
    if desired:
        return desired["device"]
    if spec.device == "cpu" or spec.device.startswith("cuda:"):
        return spec.device
    if gpu_enabled == "false":
        if spec.device == "cuda":
            raise NoDeviceAvailable(f"model {spec.id!r} needs a GPU (device: cuda) but AETHERCORE_GPU_ENABLED=false")
        return CPU_QUEUE
    gpu = _best_gpu(cluster.live_workers())
    if gpu:
        return gpu
    if spec.device == "cuda":
        raise NoDeviceAvailable(f"model {spec.id!r} needs a GPU (device: cuda) and no GPU worker is alive")
    return CPU_QUEUE
