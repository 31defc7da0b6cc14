"""Open Inference Protocol v2 (KServe, Triton) over REST, on the same job path as /serve.

Server and model metadata, health and readiness, and `infer` with the binary data extension, so
`tritonclient.http` works unchanged. A request's rows become one job (one row, or a tensor model's whole
tensors) or one batch job (N strings), which the worker batches with /serve traffic for the same model. Errors
are OIP's `{"error": "..."}`. What of the protocol is served and what is not: docs/PROTOCOLS.md.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import numpy as np
from flask import Response, current_app, g, request
from flask.views import MethodView

from access.principal import READ_MODELS, SERVE
from api.auth import requires
from api.blueprints.health import health_checks
from api.errors import register_error_dialect
from api.idempotency import idempotent
from api.json_provider import Blueprint
from api.services import services
from api.submitting import check_texts, run_to_end
from config.lanes import LANES
from config.models import TEXT_TASKS, ModelSpec
from config.signatures import Signature, shape_error
from protocols.errors import ApiError, one_line
from protocols.oip import InferRequest, Tensor, encode_response, outputs_of, parse_request
from protocols.oip_schemas import ERROR_SCHEMA, INFER_REQUEST_SCHEMA, METADATA_SCHEMA
from protocols.results import output_rows, raise_if, text_fields
from submission.validation import parameter_errors
from tasks.names import DEFAULT_LANE
from tasks.routing import NoDeviceAvailable, resolve_device
from tasks.states import LOADED
from tasks.tensors import pack

blp = Blueprint("oip", __name__, description="Open Inference Protocol v2 (KServe / Triton REST, binary data extension)")
register_error_dialect("/v2", lambda status, code, message, details: {"error": one_line(message, details)})

VERSION = "1"  # every model has one version
EXTENSIONS = ["binary_tensor_data"]
PLATFORMS = {
    "transformer": "huggingface_transformers",
    "onnx": "onnxruntime_onnx",
    "pytorch": "pytorch_torch_export",
    "simulated": "aethercore_simulated",
}
# Request parameters of the protocol itself (Triton's); everything else is the model's own (config/parameters.py).
UNSUPPORTED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
# `parameters.priority`: the job's priority lane, by name (README "Priority lanes").
PRIORITY_PARAMETER = "priority"
# A request parameter of ours: the URL the job's end is POSTed to (README "Completion webhooks").
WEBHOOK_PARAMETER = "webhook_url"


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "Malformed request (OIP error)",
        404: "Unknown model or version",
        409: "Model not loaded, and this caller may not load it (AETHERCORE_AUTOLOAD, `autoload` in models.yaml); "
        "or a webhook_url and no signing secret",
        413: "Too many rows or elements",
        422: "Tensor names, datatypes or shapes, or parameters, do not match the model",
        429: "Rate limit or queue full",
        503: "No device or Redis unavailable",
        504: "Not finished within AETHERCORE_MAX_WAIT",
    }
    return {str(s): _json(ERROR_SCHEMA, reasons[s]) for s in statuses}


def _spec(model_name: str, model_version: str | None) -> ModelSpec:
    spec = services().spec(model_name)
    if model_version not in (None, "", VERSION):
        raise ApiError(
            404, "model_not_found", f"model {model_name!r} has no version {model_version!r} (only {VERSION})"
        )
    return spec


def model_metadata(spec: ModelSpec) -> dict[str, Any]:
    signature = services().signature(spec)
    return {
        "name": spec.id,
        "versions": [VERSION],
        "platform": PLATFORMS[spec.model_type],
        "inputs": [t.public() for t in signature.inputs] if signature else [],
        "outputs": [t.public() for t in signature.outputs] if signature else [],
    }


def model_ready(spec: ModelSpec) -> bool:
    """Loaded on a live worker, or a live worker can take it on this caller's first request (the caller may load
    it: submission/submitter.py `may_autoload`)."""
    svc = services()
    if svc.cluster.model_status(spec.id)["state"] == LOADED:
        return True
    if not svc.submitter.may_autoload(spec, g.get("principal")):
        return False
    try:
        resolve_device(spec, svc.cluster, svc.settings.gpu_enabled)
    except NoDeviceAvailable:
        return False
    return True


@blp.route("/v2")
class ServerMetadata(MethodView):
    @blp.doc(
        responses={
            "200": _json(
                {"type": "object", "properties": {"name": {}, "version": {}, "extensions": {"type": "array"}}},
                "Server name, version and the protocol extensions it speaks",
            )
        }
    )
    @requires(*READ_MODELS)
    def get(self):
        return {"name": "aethercore", "version": current_app.config["API_VERSION"], "extensions": EXTENSIONS}


@blp.route("/v2/health/live")
class ServerLive(MethodView):
    @blp.doc(security=[], responses={"200": _json({"type": "object"}, "The API process is alive")})
    def get(self):
        return {"live": True}


@blp.route("/v2/health/ready")
class ServerReady(MethodView):
    @blp.doc(
        security=[],
        responses={
            "200": _json({"type": "object"}, "Redis answers, a worker is alive, the models meant to be loaded are"),
            "503": _json({"type": "object"}, "Not ready (any status but 200 means false; 503 as KServe's server)"),
        },
    )
    def get(self):
        ready, _checks = health_checks(readiness=True)
        return {"ready": ready}, 200 if ready else 503


def _metadata_doc(view):
    return blp.doc(responses={"200": _json(METADATA_SCHEMA, "The model's inputs and outputs"), **_errors(404)})(view)


@blp.route("/v2/models/<string:model_name>")
@blp.route("/v2/models/<string:model_name>/versions/<string:model_version>", endpoint="ModelMetadataVersion")
class ModelMetadata(MethodView):
    @_metadata_doc
    @requires(*READ_MODELS)
    def get(self, model_name: str, model_version: str | None = None):
        return model_metadata(_spec(model_name, model_version))


@blp.route("/v2/models/<string:model_name>/ready")
@blp.route("/v2/models/<string:model_name>/versions/<string:model_version>/ready", endpoint="ModelReadyVersion")
class ModelReady(MethodView):
    @blp.doc(
        responses={
            "200": _json({"type": "object"}, "Loaded, or AETHERCORE_AUTOLOAD is on and a worker can take it"),
            "503": _json({"type": "object"}, "Not ready (any status but 200 means false; 503 as KServe's server)"),
            **_errors(404),
        }
    )
    @requires(*READ_MODELS)
    def get(self, model_name: str, model_version: str | None = None):
        spec = _spec(model_name, model_version)
        ready = model_ready(spec)
        return {"name": spec.id, "ready": ready}, 200 if ready else 503


@blp.route("/v2/models/<string:model_name>/infer")
@blp.route("/v2/models/<string:model_name>/versions/<string:model_version>/infer", endpoint="InferVersion")
class Infer(MethodView):
    @idempotent
    @blp.doc(
        requestBody={
            "required": True,
            "description": "An OIP inference request; with the binary data extension, its JSON header (of "
            "Inference-Header-Content-Length bytes) followed by the inputs' raw bytes",
            "content": {
                "application/json": {"schema": INFER_REQUEST_SCHEMA},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        responses={
            "200": {
                "description": "The outputs (JSON, or a JSON header and binary data when outputs were asked "
                "for in binary: see the Inference-Header-Content-Length header)",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_errors(400, 404, 409, 413, 422, 429, 503, 504),
        },
    )
    @requires(*SERVE)
    def post(self, model_name: str, model_version: str | None = None):
        spec = _spec(model_name, model_version)
        settings = services().settings
        parsed = parse_request(
            _body(),
            request.headers.get("Inference-Header-Content-Length"),
            max_depth=settings.max_json_depth,
            max_strings=settings.max_batch_inputs,
        )
        signature = services().signature(spec)
        job = run_to_end(spec.id, **_fields(spec, signature, parsed))
        outputs = outputs_of(spec.task, output_rows(job))
        chosen, binary = _requested(parsed, outputs)
        body, headers = encode_response(spec.id, VERSION, parsed.id, chosen, binary)
        return Response(body, status=200, headers=headers)


def _body() -> bytes:
    """The request body, decompressed when the client sent it gzip or deflate (tritonclient can)."""
    body = request.get_data(cache=False)
    encoding = (request.headers.get("Content-Encoding") or "").lower()
    if encoding in ("", "identity"):
        return body
    limit = services().settings.max_request_bytes
    try:
        if encoding == "gzip":
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            inflater = zlib.decompressobj()
        else:
            raise ApiError(
                415, "unsupported_media_type", f"Content-Encoding {encoding!r} is not supported (gzip, deflate)"
            )
        data = inflater.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile):
        raise ApiError(400, "bad_request", f"the body is not valid {encoding} data") from None
    if len(data) > limit:
        raise ApiError(413, "payload_too_large", "the decompressed body is larger than AETHERCORE_MAX_REQUEST_BYTES")
    return data


def _fields(spec: ModelSpec, signature: Signature | None, parsed: InferRequest) -> dict[str, Any]:
    """The submission of this request, its body checked in OIP's terms (tensors, its parameters) first: the
    submitter takes it as checked, and decides its lane and webhook."""
    parameters = dict(parsed.parameters)
    fields: dict[str, Any] = {"checked": True, "webhook_field": f"parameters.{WEBHOOK_PARAMETER}"}
    timeout_us = parameters.pop("timeout", None)
    webhook_url = parameters.pop(WEBHOOK_PARAMETER, None)
    if webhook_url is not None and not isinstance(webhook_url, str):
        raise_if({f"parameters.{WEBHOOK_PARAMETER}": ["must be a string (an https URL)"]})
    fields["webhook"] = webhook_url
    if timeout_us is not None:
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us <= 0:
            raise_if({"parameters.timeout": ["must be a positive whole number of microseconds"]})
        fields["timeout_s"] = timeout_us / 1e6
    lane = parameters.pop(PRIORITY_PARAMETER, DEFAULT_LANE)
    if lane not in LANES:
        raise_if({f"parameters.{PRIORITY_PARAMETER}": [f"must be one of {', '.join(LANES)} (the priority lane)"]})
    fields["lane"] = lane
    unsupported = sorted(set(parameters) & set(UNSUPPORTED_PARAMETERS))
    if unsupported:
        raise_if({"parameters": [f"{unsupported} are not supported (no sequence batching)"]})
    raise_if(parameter_errors(spec, parameters))
    fields["parameters"] = parameters
    if spec.task in TEXT_TASKS:
        return {**fields, **text_fields(_texts(signature, parsed.inputs))}
    fields["inputs"] = _tensors(signature, parsed.inputs)
    return fields


def _texts(signature: Signature | None, inputs: list[Tensor]) -> list[str]:
    expected = signature.inputs[0] if signature else None
    name = expected.name if expected else "text"
    if len(inputs) != 1 or inputs[0].name != name:
        raise_if({"inputs": [f"this model takes one BYTES input named {name!r}, got {[t.name for t in inputs]}"]})
    tensor = inputs[0]
    if tensor.datatype != "BYTES":
        raise_if({f"inputs.{name}.datatype": [f"is {tensor.datatype}, the model takes BYTES"]})
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1) or tensor.shape[0] < 1:
        raise_if({f"inputs.{name}.shape": [f"is {tensor.shape}, the model takes [N] or [N, 1] strings (N >= 1)"]})
    texts = []
    for index, raw in enumerate(tensor.array.reshape(-1)):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "bad_request", f"inputs.{name}[{index}] is not UTF-8 text") from None
    check_texts(texts, f"inputs.{name}")
    return texts


def _tensors(signature: Signature | None, inputs: list[Tensor]) -> dict[str, Any]:
    """A tensor model's inputs, checked against its signature before the job is queued."""
    if signature is not None:
        expected = {t.name: t for t in signature.inputs}
        given = {t.name for t in inputs}
        if given != set(expected):
            missing, unknown = sorted(set(expected) - given), sorted(given - set(expected))
            raise_if({"inputs": [f"the model takes {sorted(expected)}; missing {missing}, unknown {unknown}"]})
        errors = {}
        for tensor in inputs:
            spec = expected[tensor.name]
            if tensor.datatype != spec.datatype:
                errors[f"inputs.{tensor.name}.datatype"] = [f"is {tensor.datatype}, the model takes {spec.datatype}"]
                continue
            problem = shape_error(tensor.name, tensor.shape, spec.shape)
            if problem:
                errors[f"inputs.{tensor.name}.shape"] = [problem]
        raise_if(errors)
    text = sorted(t.name for t in inputs if t.datatype == "BYTES")
    if text:
        raise_if({"inputs": [f"{text}: a tensor model takes numbers, not BYTES"]})
    # Kept as their bytes (tasks/tensors.py): a 10 MB tensor is ~13 MB in the job and its message, not ~50 MB of
    # JSON digits; the model process unpacks it.
    return {t.name: pack(t.array) for t in inputs}


def _requested(parsed: InferRequest, outputs: list[tuple[str, np.ndarray]]):
    if parsed.outputs is None:
        return outputs, {name: parsed.binary_output for name, _ in outputs}
    available = dict(outputs)
    unknown = sorted({o.name for o in parsed.outputs} - set(available))
    if unknown:
        raise_if({"outputs": [f"unknown output(s) {unknown}; the model gives {sorted(available)}"]})
    return (
        [(o.name, available[o.name]) for o in parsed.outputs],
        {o.name: o.binary or parsed.binary_output for o in parsed.outputs},
    )
