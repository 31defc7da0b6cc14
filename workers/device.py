"""Device pinning: must run before torch is imported, so a worker never initialises another GPU."""

from __future__ import annotations

import os
import sys
from typing import Any


def pin_device(device: str, gpu_index: int | None = None) -> None:
    """`cuda:N` sees only GPU N (or `gpu_index`), as cuda:0; `cpu` sees no GPU at all."""
    if "torch" in sys.modules:
        raise RuntimeError("torch was imported before the worker's device was pinned; pin_device must run first")
    if device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_index if gpu_index is not None else device.split(":", 1)[1])
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["AETHERCORE_DEVICE"] = device
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def device_memory(device: str) -> dict[str, Any]:
    """Process and GPU memory for the heartbeat record."""
    info: dict[str, Any] = {}
    try:
        with open("/proc/self/statm") as statm:
            info["rss_bytes"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            info.update(gpu_free_bytes=free, gpu_total_bytes=total,
                        gpu_allocated_bytes=torch.cuda.memory_allocated())
    return info
