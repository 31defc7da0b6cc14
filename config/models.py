"""Model declarations (`config/models.yaml`): parsed and validated once, at start-up.

A bad file fails with a message naming the model, the field and the bad value, so a
deployment never starts half-configured.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from config.signatures import DECLARED, Signature, declared_tensors, task_signature
from config.units import parse_size
from config.values import ConfigError

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# `simulated`: a device profile, not a model (capacity planning and benchmarks): no files, its forward pass
# only takes the declared wall time (workers/runtimes/simulated.py).
SIMULATED = "simulated"
MODEL_TYPES = ("transformer", "onnx", "pytorch", SIMULATED)
SOURCES = ("huggingface", "local")
NO_FILES = "none"  # the `source` of a simulated model
DTYPES = ("float32", "float16", "bfloat16")
TASKS = ("feature-extraction", "text-generation", "text-classification", "tensor")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")

# Which runtime can serve which task: the worker has one runtime per pair.
SUPPORTED = {
    "transformer": {"feature-extraction", "text-generation", "text-classification"},
    "onnx": {"feature-extraction", "tensor"},
    "pytorch": {"tensor"},
    SIMULATED: {"feature-extraction", "text-generation"},
}
TEXT_TASKS = {"feature-extraction", "text-generation", "text-classification"}
DEFAULT_MAX_LENGTH = {"feature-extraction": 256, "text-classification": 256, "text-generation": 32, "tensor": 0}
# Dynamic batching defaults per task: (max_batch_size, max_batch_delay_ms). For text-generation
# max_batch_size bounds the running batch of continuous batching (requests join and leave at every
# decoding step, so there is no delay to wait).
DEFAULT_BATCHING = {
    "feature-extraction": (32, 2.0),
    "text-classification": (32, 2.0),
    "tensor": (64, 1.0),
    "text-generation": (64, 0.0),
}
# The KV cache a text-generation model's running batch may hold (reserved in full: counted in the
# model's memory and in the worker's LRU budget).
DEFAULT_KV_CACHE_MEMORY = 256 * 2**20


@dataclass(frozen=True)
class Simulation:
    """A simulated device's profile (`simulate:` in models.yaml), in milliseconds of wall time per pass.

    feature-extraction: a batch of b texts takes base_ms + per_item_ms x b and gives `dim` float32 values each.
    text-generation: a decoding step over r rows takes step_ms + per_row_ms x r and gives each row one token;
    kv_bytes_per_token > 0 bounds the running batch by `kv_cache_memory` as a real model's KV cache would.
    `memory`: what the model is counted as holding (the worker's budget and LRU), 0 by default."""

    base_ms: float = 0.0
    per_item_ms: float = 0.0
    dim: int = 0
    step_ms: float = 0.0
    per_row_ms: float = 0.0
    kv_bytes_per_token: int = 0
    memory: int = 0


# The `simulate:` fields each task takes, and which of them must be given.
SIMULATE_FIELDS = {
    "feature-extraction": ({"base_ms", "per_item_ms", "dim", "memory"}, {"base_ms", "per_item_ms", "dim"}),
    "text-generation": ({"step_ms", "per_row_ms", "kv_bytes_per_token", "memory"}, {"step_ms", "per_row_ms"}),
}


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    model_type: str
    source: str
    model_path: str
    task: str
    device: str = "auto"
    max_memory: int | None = None
    providers: tuple[str, ...] = ()
    tokenizer_path: str | None = None
    max_length: int = 0
    # Upper bound a request may ask for with parameters.max_length.
    max_length_limit: int = 512
    max_batch_size: int = 1
    max_batch_delay_ms: float = 0.0
    instances: int = 1
    dtype: str = "float32"
    # A model process that makes no progress (no batch result, no streamed token) for this long is
    # killed and restarted, and the jobs it held are retried.
    timeout_s: float = 60.0
    # text-generation only: bytes of KV cache for the running batch (requests that do not fit wait).
    kv_cache_memory: int | None = None
    # Verified artifacts (model_store/verify.py): the digest of the one file, or a manifest of the directory
    # (True: its aethercore-manifest.json; a string: a manifest path in the model store).
    sha256: str | None = None
    manifest: bool | str = False
    allow_pickle: bool = False
    # The signature declared in models.yaml (`inputs` and `outputs`), if any (config/signatures.py).
    signature: Signature | None = None
    # Any caller who may serve it may load it by using it (AETHERCORE_AUTOLOAD); otherwise only admins and
    # operators load it, by using it or with POST /models/{id}/load (access/principal.py `may_autoload`).
    autoload: bool = False
    # model_type simulated: the device profile (no files; workers/runtimes/simulated.py).
    simulate: Simulation | None = None

    @property
    def has_files(self) -> bool:
        """Whether the model is loaded from files (every model but a simulated one)."""
        return self.model_type != SIMULATED

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["providers"] = list(self.providers)
        data.pop("signature")
        if self.simulate is not None:  # the fields of its task only
            data["simulate"] = {k: v for k, v in data["simulate"].items() if k in SIMULATE_FIELDS[self.task][0]}
        if self.signature is not None:
            data["inputs"] = [t.public() for t in self.signature.inputs]
            data["outputs"] = [t.public() for t in self.signature.outputs]
        return data


_KNOWN_FIELDS = {
    "name",
    "model_type",
    "source",
    "model_path",
    "task",
    "device",
    "max_memory",
    "providers",
    "tokenizer_path",
    "max_length",
    "max_length_limit",
    "description",
    "max_batch_size",
    "max_batch_delay_ms",
    "instances",
    "dtype",
    "timeout_s",
    "kv_cache_memory",
    "sha256",
    "manifest",
    "allow_pickle",
    "inputs",
    "outputs",
    "autoload",
    "simulate",
}
# Fields about a model's files, which a simulated model does not have.
_FILE_FIELDS = ("model_path", "source", "tokenizer_path", "sha256", "manifest", "allow_pickle", "providers")


def _fail(path: Path, model_id: str, field_name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{path}: model {model_id!r}: field {field_name!r}: {value!r} {why}")


class _Fields:
    """One model's raw mapping, read field by field; every error names the file, the model and the field."""

    def __init__(self, path: Path, model_id: str, raw: dict[str, Any]) -> None:
        self.path, self.model_id, self.raw = path, model_id, raw

    def fail(self, name: str, value: Any, why: str) -> ConfigError:
        return _fail(self.path, self.model_id, name, value, why)

    def required(self, name: str) -> str:
        value = self.raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, value, "is required and must be a non-empty string")
        return value.strip()

    def one_of(self, name: str, options: tuple[str, ...], default: str | None = None) -> str:
        value = self.raw.get(name, default)
        if value not in options:
            raise self.fail(name, value, f"is not one of {', '.join(options)}")
        return value

    def bounded_int(self, name: str, default: int, low: int, high: int) -> int:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(name, value, f"must be a whole number from {low} to {high}")
        return value

    def number(self, name: str, default: float, low: float, high: float, what: str) -> float:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self.fail(name, value, f"must be {what} from {low:g} to {high:g}")
        return float(value)

    def flag(self, name: str) -> bool:
        value = self.raw.get(name, False)
        if not isinstance(value, bool):
            raise self.fail(name, value, "must be true or false")
        return value

    def size(self, name: str, default: Any = None) -> int:
        try:
            return parse_size(self.raw.get(name, default))
        except ValueError as exc:
            raise self.fail(name, self.raw[name], f"is invalid: {exc}") from None


def _parse_model(path: Path, model_id: str, raw: Any) -> ModelSpec:
    if not MODEL_ID_RE.match(str(model_id)):
        raise ConfigError(f"{path}: model id {model_id!r} is invalid: use 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: model {model_id!r} must be a mapping of fields, not {type(raw).__name__}")
    unknown = set(raw) - _KNOWN_FIELDS
    if unknown:
        name = sorted(unknown)[0]
        raise _fail(
            path, model_id, name, raw[name], f"is not a known field (known: {', '.join(sorted(_KNOWN_FIELDS))})"
        )
    f = _Fields(path, model_id, raw)
    model_type, source, task = _kind(f)
    device = str(raw.get("device", "auto")).strip().lower()
    if not DEVICE_RE.match(device):
        raise f.fail("device", raw.get("device"), "is not one of auto, cpu, cuda, cuda:N")
    max_memory = f.size("max_memory") if raw.get("max_memory") is not None else None
    providers = raw.get("providers") or []
    if not isinstance(providers, list) or not all(isinstance(p, str) and p for p in providers):
        raise f.fail("providers", providers, "must be a list of onnxruntime provider names")
    max_length_limit = f.bounded_int("max_length_limit", 512, 1, 100_000)
    max_length = f.bounded_int("max_length", DEFAULT_MAX_LENGTH[task], 0, max_length_limit)
    default_size, default_delay = DEFAULT_BATCHING[task]
    max_batch_size = f.bounded_int("max_batch_size", default_size, 1, 4096)
    simulate = _simulation(path, model_id, task, raw.get("simulate")) if model_type == SIMULATED else None
    kv_cache_memory = _kv_cache_memory(f, task, simulate)
    delay = f.number("max_batch_delay_ms", default_delay, 0, 10_000, "a number of milliseconds")
    timeout = f.number("timeout_s", 60, 0.1, 86_400, "a number of seconds")
    sha256, manifest = _artifact_check(f)
    allow_pickle, autoload = f.flag("allow_pickle"), f.flag("autoload")
    signature = _declared_signature(f, task, simulate)
    tokenizer_path = raw.get("tokenizer_path")
    if tokenizer_path is not None and (not isinstance(tokenizer_path, str) or not tokenizer_path):
        raise f.fail("tokenizer_path", tokenizer_path, "must be a non-empty string")
    if model_type == "onnx" and task in TEXT_TASKS and not tokenizer_path:
        raise f.fail("tokenizer_path", tokenizer_path, f"is required for an onnx model with task {task!r}")

    return ModelSpec(
        id=str(model_id),
        name=str(raw.get("name") or model_id),
        model_type=model_type,
        source=source,
        model_path="" if model_type == SIMULATED else f.required("model_path"),
        task=task,
        device=device,
        max_memory=max_memory,
        providers=tuple(providers),
        tokenizer_path=tokenizer_path,
        max_length=max_length,
        max_length_limit=max_length_limit,
        max_batch_size=max_batch_size,
        max_batch_delay_ms=delay,
        instances=f.bounded_int("instances", 1, 1, 64),
        dtype=f.one_of("dtype", DTYPES, "float32"),
        timeout_s=timeout,
        kv_cache_memory=kv_cache_memory,
        sha256=sha256.lower() if sha256 else None,
        manifest=manifest,
        allow_pickle=allow_pickle,
        signature=signature,
        autoload=autoload,
        simulate=simulate,
    )


def _kind(f: _Fields) -> tuple[str, str, str]:
    """The model's type, source and task, checked together."""
    model_type = f.one_of("model_type", MODEL_TYPES)
    if model_type == SIMULATED:
        for name in _FILE_FIELDS:
            if name in f.raw:
                raise f.fail(name, f.raw[name], "does not apply to a simulated model (it has no files)")
        source = NO_FILES
    else:
        source = f.one_of("source", SOURCES, "local")
        if "simulate" in f.raw:
            raise f.fail("simulate", f.raw["simulate"], "applies to model_type 'simulated' only")
    task = f.one_of("task", TASKS, "tensor" if model_type == "pytorch" else "feature-extraction")
    if task not in SUPPORTED[model_type]:
        served = ", ".join(sorted(SUPPORTED[model_type]))
        raise f.fail("task", task, f"is not served by model_type {model_type!r} (it serves {served})")
    if source == "huggingface" and model_type != "transformer":
        raise f.fail("source", source, "is only supported for model_type 'transformer'")
    return model_type, source, task


def _kv_cache_memory(f: _Fields, task: str, simulate: Simulation | None) -> int | None:
    """A text-generation model's KV cache bytes; None for any other task, or a simulated device without a size per
    token of cache (it has no cache to bound, nor to reserve memory for)."""
    no_cache = simulate is not None and not simulate.kv_bytes_per_token and "kv_cache_memory" not in f.raw
    if task == "text-generation" and not no_cache:
        kv_cache_memory = f.size("kv_cache_memory", DEFAULT_KV_CACHE_MEMORY)
        if kv_cache_memory <= 0:
            raise f.fail("kv_cache_memory", f.raw["kv_cache_memory"], "must be more than 0")
        return kv_cache_memory
    if f.raw.get("kv_cache_memory") is not None:
        raise f.fail("kv_cache_memory", f.raw["kv_cache_memory"], "applies to text-generation only")
    return None


def _artifact_check(f: _Fields) -> tuple[str | None, bool | str]:
    """The paths kept inside the model store, and how the artifacts are verified: (sha256, manifest)."""
    for name in ("model_path", "tokenizer_path", "manifest"):
        value = f.raw.get(name)
        if isinstance(value, str) and ".." in Path(value).parts:
            raise f.fail(name, value, "may not contain '..' (it must stay inside the model store)")
    sha256 = f.raw.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256)):
        raise f.fail("sha256", sha256, "must be 64 hexadecimal digits")
    manifest = f.raw.get("manifest", False)
    if not isinstance(manifest, (bool, str)) or manifest == "":
        raise f.fail("manifest", manifest, "must be true, false or a manifest file's path")
    if sha256 and manifest:
        raise f.fail("manifest", manifest, "and sha256 exclude each other (sha256: one file)")
    return sha256, manifest


def _declared_signature(f: _Fields, task: str, simulate: Simulation | None) -> Signature | None:
    """The signature models.yaml declares (`inputs` and `outputs` together), or a simulated device's."""
    if "inputs" in f.raw or "outputs" in f.raw:
        parts = {}
        for name in ("inputs", "outputs"):
            try:
                parts[name] = declared_tensors(f.raw.get(name))
            except ValueError as exc:
                raise f.fail(
                    name, f.raw.get(name), f"is invalid: {exc} (declare inputs and outputs together)"
                ) from None
        return Signature(parts["inputs"], parts["outputs"], DECLARED)
    if simulate is not None:
        return task_signature(task, simulate.dim or -1, source=DECLARED)  # what the simulated device gives
    return None


def _simulation(path: Path, model_id: str, task: str, raw: Any) -> Simulation:
    """The `simulate:` mapping of a simulated model, checked field by field (errors name `simulate.<field>`)."""
    known, needed = SIMULATE_FIELDS[task]
    if not isinstance(raw, dict):
        raise _fail(path, model_id, "simulate", raw, f"is required for a simulated {task} model: {sorted(needed)}")
    unknown, missing = sorted(set(raw) - known), sorted(needed - set(raw))
    if unknown:
        name = unknown[0]
        raise _fail(path, model_id, f"simulate.{name}", raw[name], f"is not a {task} field (known: {sorted(known)})")
    if missing:
        raise _fail(path, model_id, f"simulate.{missing[0]}", None, f"is required for a simulated {task} model")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "memory":
            try:
                values[name] = parse_size(value)
            except ValueError as exc:
                raise _fail(path, model_id, "simulate.memory", value, f"is invalid: {exc}") from None
            continue
        whole = name in ("dim", "kv_bytes_per_token")
        low, high, what = {
            "dim": (1, 65_536, "a whole number"),
            "kv_bytes_per_token": (0, 2**30, "a whole number of bytes"),
        }.get(name, (0, 60_000, "a number of milliseconds"))
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not low <= value <= high:
            raise _fail(path, model_id, f"simulate.{name}", value, f"must be {what} from {low} to {high}")
        values[name] = value if whole else float(value)
    return Simulation(**values)


def load_models(path: Path) -> dict[str, ModelSpec]:
    """Parse and validate models.yaml; raise ConfigError naming the first problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the model file {path}: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise ConfigError(f"{path} must contain a top-level 'models:' mapping of model id to fields")
    return {str(mid): _parse_model(Path(path), mid, raw) for mid, raw in document["models"].items()}
