"""The one inference path every protocol takes (/serve, /serve/batch, the WebSocket, OIP v2, OpenAI /v1):
check the request against the model's declarations (inputs, parameters, signature) before anything is queued,
route it to its device's queue, record and queue the job, and, for the protocols that answer only at the end,
wait for it and say what an ended job means in HTTP terms."""

from __future__ import annotations

from typing import Any

from flask import g

from access.principal import allowed_lanes
from api.idempotency import keyed
from api.services import Services, services
from api.webhooks import job_webhook, requested_url
from config.models import TEXT_TASKS, ModelSpec
from config.parameters import messages_error, text_error
from config.parameters import parameter_errors as declared_parameter_errors
from config.signatures import tensor_input_errors
from protocols.errors import ApiError
from tasks import errors as job_errors
from tasks.errors import http_status
from tasks.names import DEFAULT_LANE, LANES
from tasks.states import CANCELLED, EXPIRED, FAILED, INFERENCE, SUCCEEDED, TERMINAL


def input_errors(spec: ModelSpec, inputs: Any, prefix: str = "inputs") -> dict[str, list[str]]:
    """An input against the model's declarations: a text model's rules (config/parameters.py), a tensor
    model's signature (names, datatypes, shapes; config/signatures.py) when it is known."""
    if not isinstance(inputs, dict):
        return {prefix: ["must be an object"]}
    errors: dict[str, list[str]] = {}
    max_chars = services().settings.max_input_chars
    if spec.task == "text-generation" and "messages" in inputs:
        problem = messages_error(inputs["messages"], max_chars)
        if problem:
            errors[f"{prefix}.messages"] = [problem]
        if set(inputs) != {"messages"}:
            errors[prefix] = ["takes either 'text' or 'messages', nothing else"]
    elif spec.task in TEXT_TASKS:
        problem = text_error(inputs.get("text"), max_chars)
        if problem:
            errors[f"{prefix}.text"] = [problem]
        unknown = sorted(set(inputs) - {"text"})
        if unknown:
            takes = "'text' (or 'messages')" if spec.task == "text-generation" else "only 'text'"
            errors[prefix] = [f"unknown input(s) {unknown}; this model takes {takes}"]
    else:
        signature = services().signature(spec)
        if signature is not None:
            errors.update(tensor_input_errors(signature, inputs, prefix))
    return errors


def parameter_errors(spec: ModelSpec, parameters: dict[str, Any], prefix: str = "parameters") -> dict[str, list[str]]:
    errors = declared_parameter_errors(spec.task, parameters, spec.max_length_limit)
    if prefix == "parameters":
        return errors
    return {prefix + key[len("parameters") :]: value for key, value in errors.items()}


def raise_if(errors: dict[str, list[str]]) -> None:
    if errors:
        raise ApiError(422, "validation_error", "the request is invalid; see details for each field", errors)


def check_batch_size(svc: Services, count: int) -> None:
    limit = svc.settings.max_batch_inputs
    if count > limit:
        raise ApiError(
            413,
            "too_many_inputs",
            f"a batch may carry at most {limit} inputs, got {count}; split it into several requests",
            {"limit": limit, "inputs": count},
        )


def check_texts(texts: list[str], field: str) -> None:
    """A protocol's batch of strings: at most AETHERCORE_MAX_BATCH_INPUTS, each by the text rules (422 naming
    `field[i]`)."""
    svc = services()
    check_batch_size(svc, len(texts))
    max_chars = svc.settings.max_input_chars
    raise_if({f"{field}[{i}]": [p] for i, t in enumerate(texts) if (p := text_error(t, max_chars))})


def route(svc: Services, spec: ModelSpec) -> str:
    """The device queue for this model's inference; 409 when it must be loaded first and this caller may not load
    it (AETHERCORE_AUTOLOAD off, or a caller who does not manage models and a model not declared `autoload`)."""
    desired = svc.desired(spec.id)
    device = svc.device_for(spec, desired)
    if desired is None and not svc.may_autoload(spec):
        why = "autoload is off" if not svc.settings.autoload else "only an admin or operator may load it"
        raise ApiError(
            409,
            "model_not_loaded",
            f"model {spec.id!r} is not loaded and {why}; an admin or operator loads it with "
            f"POST /models/{spec.id}/load",
        )
    return device


def check_lane(lane: str) -> str:
    """The priority lane this caller may submit to (api/auth.py `allowed_lanes`: its key's or token's grant, else its
    role's), or 403 naming the lane and how to be granted it."""
    who = g.get("principal")
    allowed = allowed_lanes(who, services().settings.priority_lanes)
    if lane not in allowed:  # never without a principal: allowed_lanes grants it every lane
        granted = ",".join(sorted(allowed, key=LANES.index))
        whose = "this key's grant" if who.lanes is not None else f"role {who.role!r}"
        raise ApiError(
            403,
            "forbidden",
            f"the {lane!r} priority lane is not granted to this caller ({whose} allows: {granted or 'none'}); an admin "
            f"grants it with `manage.py auth create-key --role <role> --lanes {','.join(LANES)}` (or for a whole role "
            "with AETHERCORE_PRIORITY_LANES)",
            {"lane": lane, "granted": granted},
        )
    return lane


def job_payload(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    payload = {"inputs": body["inputs"], "parameters": body["parameters"], **extra}
    lane = check_lane(body.get("priority", DEFAULT_LANE))
    if lane != DEFAULT_LANE:
        payload["priority"] = lane  # the message's lane, and the worker's order within its batches
    if body.get("timeout"):
        payload["timeout"] = body["timeout"]
    if body.get("encoding_format", "float") != "float":
        payload["encoding_format"] = body["encoding_format"]
    if body.get("result_ttl"):
        payload["result_ttl"] = body["result_ttl"]  # for the job record; services.submit takes it out
    webhook = job_webhook(requested_url(body.get("webhook")))  # the request's, else the caller's default
    if webhook:
        payload["webhook"] = webhook  # for the job record too
    return payload


def submit_inference(body: dict[str, Any], wait_s: float = 0.0) -> dict[str, Any]:
    svc = services()
    spec = svc.spec(body["model_id"])
    raise_if({**input_errors(spec, body["inputs"]), **parameter_errors(spec, body["parameters"])})
    return queue_inference(spec, body, wait_s)


def queue_inference(spec: ModelSpec, body: dict[str, Any], wait_s: float = 0.0, **extra: Any) -> dict[str, Any]:
    """A request whose inputs and parameters were checked, queued as the current caller's: the model's device and
    the caller's autoload policy (`route`), lane (`check_lane`) and webhook, then the shared submission
    (backpressure, Redis's memory, the rate limit). `/serve` and a dead letter's replay (api/replay.py) both end
    here; `extra` goes into the job (`batch`, `replay_of`)."""
    svc = services()
    return svc.submit(INFERENCE, spec, route(svc, spec), job_payload(body, **extra), wait_s=wait_s)


def run_to_end(spec: ModelSpec, payload: dict[str, Any]) -> dict[str, Any]:
    """Queue an (already checked) inference job and wait for its end, at most AETHERCORE_MAX_WAIT: the job's
    result, or ApiError with the status its failure means. A job still unfinished then gets 504 naming it; it is
    cancelled only when nobody else can read it: a request with an Idempotency-Key leaves it to its deadline, since
    a duplicate or the client's retry with the key may be waiting for it (and must get its real end, never a
    cancellation one waiter caused)."""
    svc = services()
    bound = svc.settings.max_wait
    payload.setdefault("timeout", bound)  # not started within the wait: it expires rather than runs for no one
    shared = keyed()
    job = svc.submit(INFERENCE, spec, route(svc, spec), payload, wait_s=bound)
    if job["status"] not in TERMINAL:
        if shared:
            raise ApiError(
                504,
                "timeout",
                f"the inference did not finish within {bound:g} s (AETHERCORE_MAX_WAIT); job {job['job_id']} goes on "
                "until its deadline: retry with the same Idempotency-Key to get its result",
                {"job_id": job["job_id"]},
            )
        svc.jobs.lifecycle.request_cancel(job["job_id"], "the protocol client's wait ended (AETHERCORE_MAX_WAIT)")
        raise ApiError(
            504,
            "timeout",
            f"the inference did not finish within {bound:g} s (AETHERCORE_MAX_WAIT); job {job['job_id']} was cancelled",
            {"job_id": job["job_id"]},
        )
    if job["status"] == SUCCEEDED:
        return job
    raise ended_error(job)


def ended_error(job: dict[str, Any]) -> ApiError:
    error = job.get("error") or {}
    code = error.get("code") or {
        EXPIRED: job_errors.EXPIRED,
        CANCELLED: job_errors.CANCELLED,
        FAILED: job_errors.INTERNAL_ERROR,
    }.get(job["status"], job_errors.INTERNAL_ERROR)
    message = error.get("message") or f"the job ended {job['status']}"
    return ApiError(http_status(code), code, message, {"job_id": job["job_id"]})


def text_payload(texts: list[str], parameters: dict[str, Any]) -> dict[str, Any]:
    """N strings as one job: a plain job for one (coalesced with /serve traffic), a batch job for several (its
    items go through the worker's batcher with everyone else's)."""
    if len(texts) == 1:
        return {"inputs": {"text": texts[0]}, "parameters": parameters}
    return {"inputs": [{"text": t} for t in texts], "parameters": parameters, "batch": True}


def output_rows(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A succeeded job's output per input row (one, or a batch job's in order); the first failed row's error
    is raised (a protocol answers for the whole request)."""
    result = job.get("result") or {}
    if "outputs" not in result:
        return [result.get("output") or {}]
    rows = []
    for item in result["outputs"]:
        if "error" in item:
            error = item["error"] or {}
            code = error.get("code", job_errors.INTERNAL_ERROR)
            raise ApiError(http_status(code), code, error.get("message", "failed"), {"job_id": job["job_id"]})
        rows.append(item["output"])
    return rows
