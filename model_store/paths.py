"""Resolve a model declaration to files on this machine, or say clearly why they are not there.

Never downloads unless AETHERCORE_HF_DOWNLOAD=true: a missing model is an immediate error
naming what to do, not a hang on an unreachable hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from config.models import ModelSpec
from config.settings import Settings
from tasks.errors import MODEL_PATH_FORBIDDEN, MODEL_UNAVAILABLE


class ModelUnavailable(RuntimeError):
    """The model's files are not on this machine (or are unreadable)."""

    code = MODEL_UNAVAILABLE


class ModelPathForbidden(RuntimeError):
    """A `source: local` path that leads outside the model store and the configured model roots."""

    code = MODEL_PATH_FORBIDDEN


def local_path(settings: Settings, relative: str, spec_id: str = "") -> Path:
    """A `source: local` path in the model store, refused if it leads outside the configured roots."""
    path = Path(relative)
    path = path if path.is_absolute() else settings.model_store / path
    # Resolved (symlinks followed) before the check, so no link or absolute path leads out of the roots.
    real = path.resolve()
    roots = [root.resolve() for root in (settings.model_store, *settings.model_roots)]
    if not any(real == root or root in real.parents for root in roots):
        raise ModelPathForbidden(
            f"model {spec_id!r}: {relative} leads to {real}, outside the model store ({settings.model_store}) and "
            "AETHERCORE_MODEL_ROOTS; add its directory to AETHERCORE_MODEL_ROOTS to allow it"
        )
    return path


def resolve_model_path(spec: ModelSpec, settings: Settings) -> Path:
    if not spec.has_files:
        raise ModelUnavailable(f"model {spec.id!r} is {spec.model_type}: it has no files")
    if spec.source == "local":
        path = local_path(settings, spec.model_path, spec.id)
        if not path.exists():
            raise ModelUnavailable(
                f"model {spec.id!r}: {path} does not exist; build the demo models with "
                f"`python manage.py models bootstrap` or fix model_path in {settings.models_file}"
            )
        return path
    return _huggingface_snapshot(spec, settings)


def resolve_tokenizer_path(spec: ModelSpec, settings: Settings) -> Path:
    if not spec.tokenizer_path:
        return resolve_model_path(spec, settings)
    path = local_path(settings, spec.tokenizer_path, spec.id)
    if not path.exists():
        raise ModelUnavailable(f"model {spec.id!r}: tokenizer directory {path} does not exist")
    return path


def _huggingface_snapshot(spec: ModelSpec, settings: Settings) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = not settings.hf_download or os.environ.get("HF_HUB_OFFLINE", "0") not in {"", "0"}
    try:
        return Path(snapshot_download(spec.model_path, local_files_only=offline))
    except LocalEntryNotFoundError:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        why = (
            "downloads are off (AETHERCORE_HF_DOWNLOAD=false)"
            if not settings.hf_download
            else "the hub is unreachable or HF_HUB_OFFLINE is set"
        )
        raise ModelUnavailable(
            f"model {spec.id!r}: {spec.model_path!r} is not in the local Hugging Face cache ({cache}) and "
            f"{why}; copy the model into the cache or point model_path at a local copy with source: local"
        ) from None
    except Exception as exc:  # network errors, bad repo ids: report, never hang or crash
        raise ModelUnavailable(f"model {spec.id!r}: cannot fetch {spec.model_path!r}: {exc}") from None


def estimate_bytes(spec: ModelSpec, settings: Settings) -> int:
    """What a model will take before it is loaded (the worker's budget and LRU eviction): its weights on disk
    (a simulated model: its declared `simulate.memory`), plus its reserved KV cache, for each instance."""
    if spec.has_files:
        weights = artifact_bytes(resolve_model_path(spec, settings))
    else:
        weights = spec.simulate.memory if spec.simulate is not None else 0
    return (weights + (spec.kv_cache_memory or 0)) * spec.instances


def artifact_bytes(path: Path) -> int:
    """Bytes of weights on disk: the estimate used to budget memory before loading."""
    if path.is_file():
        return path.stat().st_size
    weights = (".safetensors", ".bin", ".onnx", ".pt2", ".pt", ".data")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in weights)
