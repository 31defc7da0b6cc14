"""Device pinning: must run before torch is imported, so a worker never initialises another GPU."""

from __future__ import annotations

import os
import subprocess
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


def rss_bytes_of(pid: int | str = "self") -> int:
    """A process's resident set (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def anon_bytes_of(pid: int | str = "self") -> int:
    """A process's private memory in RAM (anonymous + shared-memory RSS). Unlike the whole RSS it leaves
    out the pages of shared libraries (torch, MKL), which every process maps and the page cache shares."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def _gpu_memory(physical_index: int) -> dict[str, int]:
    """Free and total memory of one GPU, read through NVML (nvidia-ml-py) or nvidia-smi: the worker process
    never imports torch, so it asks the driver. Empty when neither is available."""
    try:
        import pynvml

        pynvml.nvmlInit()
        memory = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(physical_index))
        return {"gpu_free_bytes": int(memory.free), "gpu_total_bytes": int(memory.total)}
    except Exception:
        pass
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                f"--id={physical_index}",
                "--query-gpu=memory.free,memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=2,
        )
        free, total = (int(v) * 2**20 for v in out.stdout.strip().split(","))
        return {"gpu_free_bytes": free, "gpu_total_bytes": total}
    except Exception:
        return {}


def device_memory(device: str, gpu_index: int | None = None) -> dict[str, Any]:
    """Process and GPU memory for the heartbeat record."""
    info: dict[str, Any] = {"rss_bytes": rss_bytes_of()}
    if device.startswith("cuda:"):
        info.update(_gpu_memory(gpu_index if gpu_index is not None else int(device.split(":", 1)[1])))
    return info
