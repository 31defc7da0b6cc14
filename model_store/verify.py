"""Verified model artifacts: digests checked before a model loads, pickle-based weights refused by default.

A model may declare in models.yaml
  sha256: "<hex>"      the digest of its one file (model_path names a file), or
  manifest: true       verify its directory against `aethercore-manifest.json` in it (what
                       `manage.py models bootstrap` writes for the demo models), or
  manifest: "<file>"   the same with a manifest of another name or place (relative to the model store).
A manifest is JSON {"algorithm": "sha256", "files": {"relative/path": "<hex>", ...}}. Every listed file
must be there with its digest, and no weight-bearing file may be there unlisted (a file slipped in beside
verified ones would otherwise be loaded unchecked).

Pickle (`pytorch_model.bin`, `.pt`, `.pth`, `.pkl`) runs code when it is loaded: such weights are
refused unless the model says `allow_pickle: true`; safetensors, ONNX and torch.export archives are the
default path (transformers is told to load safetensors only).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from config.models import ModelSpec
from config.settings import Settings
from model_store.paths import local_path
from tasks.errors import MODEL_ARTIFACT_REJECTED

MANIFEST_NAME = "aethercore-manifest.json"
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".onnx", ".pt2", ".pt", ".pth", ".data", ".pkl", ".pickle", ".ckpt"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
IGNORED = {MANIFEST_NAME, ".aethercore-build"}


class ArtifactRejected(RuntimeError):
    """The model's files failed verification; nothing was loaded."""

    code = MODEL_ARTIFACT_REJECTED


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in IGNORED)


def write_manifest(directory: Path) -> Path:
    """Record the digest of every file under `directory` in its manifest."""
    files = {p.relative_to(directory).as_posix(): file_sha256(p) for p in _files(directory)}
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True) + "\n")
    return path


def verify_artifact(spec: ModelSpec, settings: Settings, path: Path) -> None:
    """Raise ArtifactRejected, naming the file, if the model's files are not what it declares."""
    if spec.sha256:
        if not path.is_file():
            raise ArtifactRejected(
                f"model {spec.id!r}: sha256 is for a single file, but {path} is a directory "
                "(use manifest for a directory)"
            )
        _check(spec, path, spec.sha256)
    if spec.manifest:
        directory = path if path.is_dir() else path.parent
        if spec.manifest is True:
            manifest = directory / MANIFEST_NAME
        else:
            manifest = local_path(settings, spec.manifest, spec.id)
        _check_manifest(spec, directory, manifest)
    if not spec.allow_pickle:
        _refuse_pickle(spec, path)


def _check(spec: ModelSpec, path: Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected.lower():
        raise ArtifactRejected(
            f"model {spec.id!r}: {path} does not match its declared sha256 "
            f"(expected {expected[:12]}…, found {actual[:12]}…); it was not loaded"
        )


def _check_manifest(spec: ModelSpec, directory: Path, manifest: Path) -> None:
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactRejected(
            f"model {spec.id!r}: cannot read its manifest {manifest}: {exc}; "
            "`manage.py models bootstrap` writes it for the demo models"
        ) from None
    for relative, expected in sorted(listed.items()):
        file = directory / relative
        if not file.is_file():
            raise ArtifactRejected(f"model {spec.id!r}: {file} is listed in {manifest.name} but missing")
        _check(spec, file, expected)
    for file in _files(directory):
        if file.suffix in WEIGHT_SUFFIXES and file.relative_to(directory).as_posix() not in listed:
            raise ArtifactRejected(
                f"model {spec.id!r}: {file} holds weights but is not in {manifest.name}; it was not loaded"
            )


def _refuse_pickle(spec: ModelSpec, path: Path) -> None:
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ArtifactRejected(
                f"model {spec.id!r}: {path} is pickle-based (loading it can run code); "
                "convert it to safetensors, ONNX or torch.export, or set allow_pickle: true"
            )
        return
    files = _files(path)
    if any(f.suffix in {".safetensors", ".onnx", ".pt2"} for f in files):
        return  # the safe format is there and is what gets loaded (transformers: use_safetensors=True)
    pickled = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ArtifactRejected(
            f"model {spec.id!r}: {pickled[0]} is pickle-based (loading it can run code) and "
            "there is no safetensors file; convert it, or set allow_pickle: true to trust it"
        )
