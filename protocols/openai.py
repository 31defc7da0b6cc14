"""OpenAI's /v1 bodies below the HTTP layer: the request schemas (validation and the OpenAPI document from the same
code), each endpoint's translation onto the inference path (`Prepared`: the model, the job's payload, how the ended
job becomes the endpoint's response body), and OpenAI's error object (`openai_error`). The /v1 views
(api/blueprints/openai_compat.py) and the Batch API's lines (batches/driver.py: `BATCH_ENDPOINTS`) both run exactly
this, so a batch line answers what the same /v1 request answers.

May import config/, tasks/, submission/ (its checks), protocols/ and marshmallow; never flask or api/. What the
translation looks up (the configured models, the settings' bounds) it is handed as a `Catalog`: the API's
services in a view, the Submitter in a batch line.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import marshmallow as ma
import numpy as np
from loguru import logger
from marshmallow import validate

from config.models import ModelSpec
from config.parameters import (
    CHAT_ROLES,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    NOT_BLANK_PATTERN,
    messages_error,
    parameters_for,
)
from config.settings import Settings
from protocols.errors import ApiError, field_errors, refused_error
from protocols.results import output_rows, raise_if, text_fields
from protocols.webhook import WebhookSchema
from submission import validation
from submission.errors import Refused
from submission.validation import parameter_errors

# OpenAI's request fields -> the model parameters they set (config/parameters.py); top_k and repetition_penalty
# are extensions many OpenAI-compatible servers take too.
PARAMETER_NAMES = {
    "max_tokens": "max_length",
    "max_completion_tokens": "max_length",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "repetition_penalty": "repetition_penalty",
}
OPENAI_NAME = {ours: theirs for theirs, ours in PARAMETER_NAMES.items() if theirs != "max_completion_tokens"}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class Catalog(Protocol):
    """What a translation looks up: the settings (the inputs' bounds) and a configured model (404 `model_not_found`,
    as ApiError or Refused, when it is not): the Submitter, or the API's services."""

    settings: Settings

    def spec(self, model_id: str) -> ModelSpec: ...


def openai_error(status: int, code: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's error body {"error": {message, type, param, code}}: every error on /v1, and a batch line's."""
    fields = field_errors(details)
    param = None
    if fields:
        first = fields[0][0]
        # a declared parameter by its own name; an item of a list (messages.0.role) by the request field
        name = first.split(".")[-1] if first.startswith("parameters.") else first.split(".")[0]
        param = OPENAI_NAME.get(name, name)
        message = "; ".join(f"{OPENAI_NAME.get(f.split('.')[-1], f)}: {p}" for f, p in fields)
    kind = ERROR_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request bodies (validation and the OpenAPI document from the same schemas) ------------------------------
TEXTS = {
    "oneOf": [
        {"type": "string", "minLength": 1, "pattern": NOT_BLANK_PATTERN},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1, "pattern": NOT_BLANK_PATTERN}},
    ]
}


def _declared(name: str, description: str = "") -> ma.fields.Field:
    """An OpenAI field that sets one of the task's declared parameters (config/parameters.py), with its type and
    range in the OpenAPI document (the checked range of max_length is the model's own max_length_limit)."""
    parameter = parameters_for("text-generation")[PARAMETER_NAMES[name]]
    metadata = {"description": description or parameter.doc}
    if parameter.kind == "strings":
        return ma.fields.Raw(allow_none=True, metadata={**metadata, **STOP_SCHEMA})
    field = ma.fields.Integer if parameter.kind == "integer" else ma.fields.Float
    low = parameter.low if parameter.low is not None else 0
    # the same words as the declaration's own check (config/parameters.py), whichever check speaks first
    problem = parameter.error(float("nan")) if parameter.high is not None else None
    return field(
        allow_none=True, validate=validate.Range(min=low, max=parameter.high, error=problem), metadata=metadata
    )


STOP_SCHEMA = {
    "oneOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
        {
            "type": "array",
            "maxItems": MAX_STOP_STRINGS,
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
        },
    ]
}


# OpenAI's service tiers as AetherCore's priority lanes (tasks/names.py LANES).
SERVICE_TIER_LANES = {"priority": "high", "auto": "normal", "default": "normal", "scale": "normal", "flex": "low"}


class _Request(ma.Schema):
    class Meta:
        unknown = ma.RAISE  # an unknown field is a 422 naming it, never silently ignored

    model = ma.fields.String(required=True, metadata={"example": "tiny-gpt2"})
    user = ma.fields.String(allow_none=True, metadata={"description": "Your end user's id (logged with the job)"})
    service_tier = ma.fields.String(
        allow_none=True,
        validate=validate.OneOf(tuple(SERVICE_TIER_LANES)),
        metadata={
            "description": "The priority lane: `priority` -> high, `auto`/`default`/`scale` -> normal, `flex` -> low "
            "(README: Priority lanes)"
        },
    )
    webhook = ma.fields.Nested(
        WebhookSchema,
        metadata={
            "description": "Extension: POST the job's end there too (README: Completion webhooks; not per "
            "line in a batch: a batch has its own)"
        },
    )


class EmbeddingsRequest(_Request):
    model = ma.fields.String(required=True, metadata={"example": "minilm"})
    input = ma.fields.Raw(required=True, metadata={"description": "A string or a list of strings", **TEXTS})
    encoding_format = ma.fields.String(
        allow_none=True, validate=validate.OneOf(("float", "base64")), metadata={"description": "float or base64"}
    )


class _GenerationRequest(_Request):
    max_tokens = _declared("max_tokens", "New tokens to generate (max_length), up to the model's max_length_limit")
    temperature = _declared("temperature")
    top_p = _declared("top_p")
    top_k = _declared("top_k", "Extension: keep the k most likely tokens (0: all)")
    seed = _declared("seed")
    stop = _declared("stop")
    repetition_penalty = _declared("repetition_penalty", "Extension: > 1 repeats less")
    n = ma.fields.Integer(allow_none=True, validate=validate.Equal(1, error="only n=1 is supported"))
    stream = ma.fields.Boolean(load_default=False, allow_none=True)
    stream_options = ma.fields.Dict(allow_none=True, metadata={"description": "{include_usage: true}"})
    frequency_penalty = ma.fields.Float(
        allow_none=True, validate=validate.Equal(0, error="only 0 is supported (see repetition_penalty)")
    )
    presence_penalty = ma.fields.Float(
        allow_none=True, validate=validate.Equal(0, error="only 0 is supported (see repetition_penalty)")
    )


class CompletionRequest(_GenerationRequest):
    prompt = ma.fields.Raw(
        required=True, metadata={"description": "A string (or a list of strings, not streamed)", **TEXTS}
    )
    echo = ma.fields.Boolean(allow_none=True, validate=validate.Equal(False, error="echo is not supported"))
    logprobs = ma.fields.Raw(allow_none=True, validate=validate.Equal(None, error="logprobs are not supported"))


TEXT_PART = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
}


class ChatMessage(ma.Schema):
    """One chat message as the chat template takes it (config/parameters.py messages_error): the document says
    exactly what the check accepts, so no request the schema allows is refused."""

    class Meta:
        unknown = ma.RAISE

    role = ma.fields.String(required=True, validate=validate.OneOf(CHAT_ROLES))
    content = ma.fields.Raw(
        required=True,
        metadata={
            "description": "The text, or text parts ({type: text, text}) joined",
            "oneOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}],
        },
    )
    name = ma.fields.String(allow_none=True)


class ChatRequest(_GenerationRequest):
    messages = ma.fields.List(
        ma.fields.Nested(ChatMessage), required=True, validate=validate.Length(min=1, max=MAX_MESSAGES)
    )
    max_completion_tokens = _declared("max_completion_tokens", "Same as max_tokens")
    logprobs = ma.fields.Boolean(allow_none=True, validate=validate.Equal(False, error="logprobs are not supported"))


def _spec_for(catalog: Catalog, model: str, task: str, endpoint: str) -> ModelSpec:
    try:
        spec = catalog.spec(model)
    except Refused as exc:  # 404 model_not_found, in the caller's protocol
        raise refused_error(exc) from None
    if spec.task != task:
        raise ApiError(
            400,
            "model_not_supported",
            f"model {model!r} is a {spec.task} model; {endpoint} serves {task} models",
            {"model": [f"is a {spec.task} model"]},
        )
    return spec


def _texts(catalog: Catalog, value: Any, field: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise_if({field: ["must be a string or a non-empty list of strings (token arrays are not supported)"]})
    settings = catalog.settings
    try:
        validation.check_texts(items, field, settings.max_batch_inputs, settings.max_input_chars)
    except Refused as exc:
        raise refused_error(exc) from None
    return items


def _generation_parameters(spec: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
    parameters = {PARAMETER_NAMES[k]: v for k, v in body.items() if k in PARAMETER_NAMES and v is not None}
    raise_if(parameter_errors(spec, parameters))
    return parameters


def _log_user(body: dict[str, Any], spec: ModelSpec) -> None:
    if body.get("user"):
        logger.bind(model_id=spec.id).info("OpenAI request for end user {!r}", body["user"])


@dataclass(frozen=True)
class Prepared:
    """An OpenAI request translated onto the inference path: the model, the job's payload (already checked) and
    how the ended job becomes the endpoint's response body. The /v1 views and the Batch API's lines (batches/store.py)
    both run exactly this, so a batch line answers what the same /v1 request answers."""

    spec: ModelSpec
    payload: dict[str, Any]
    respond: Callable[[dict[str, Any]], dict[str, Any]]


def prepare_embeddings(body: dict[str, Any], catalog: Catalog) -> Prepared:
    spec = _spec_for(catalog, body["model"], "feature-extraction", "/v1/embeddings")
    texts = _texts(catalog, body["input"], "input")
    _log_user(body, spec)
    as_base64 = body.get("encoding_format") == "base64"

    def respond(job: dict[str, Any]) -> dict[str, Any]:
        rows = output_rows(job)
        data = []
        for index, row in enumerate(rows):
            vector = np.asarray(row["embedding"], dtype="<f4")
            encoded = base64.b64encode(vector.tobytes()).decode("ascii") if as_base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(int(row.get("tokens", 0)) for row in rows)
        return {
            "object": "list",
            "data": data,
            "model": spec.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return Prepared(spec, {**text_fields(texts), "parameters": {}}, respond)


def completion_parts(body: dict[str, Any], catalog: Catalog) -> tuple[ModelSpec, list[str], dict[str, Any]]:
    spec = _spec_for(catalog, body["model"], "text-generation", "/v1/completions")
    prompts = _texts(catalog, body["prompt"], "prompt")
    parameters = _generation_parameters(spec, body)
    _log_user(body, spec)
    return spec, prompts, parameters


def prepare_completion(body: dict[str, Any], catalog: Catalog) -> Prepared:
    """A completion answered at its end (not streamed)."""
    spec, prompts, parameters = completion_parts(body, catalog)

    def respond(job: dict[str, Any]) -> dict[str, Any]:
        rows = output_rows(job)
        choices = [
            {"index": i, "text": row["text"], "finish_reason": row["finish_reason"], "logprobs": None}
            for i, row in enumerate(rows)
        ]
        return {
            "id": f"cmpl-{job['job_id']}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": spec.id,
            "choices": choices,
            "usage": usage(rows),
        }

    return Prepared(spec, {**text_fields(prompts), "parameters": parameters}, respond)


def chat_parts(body: dict[str, Any], catalog: Catalog) -> tuple[ModelSpec, list[dict[str, Any]], dict[str, Any]]:
    spec = _spec_for(catalog, body["model"], "text-generation", "/v1/chat/completions")
    messages = _messages(catalog, body["messages"])
    parameters = _generation_parameters(spec, body)
    _log_user(body, spec)
    return spec, messages, parameters


def prepare_chat(body: dict[str, Any], catalog: Catalog) -> Prepared:
    """A chat completion answered at its end (not streamed)."""
    spec, messages, parameters = chat_parts(body, catalog)

    def respond(job: dict[str, Any]) -> dict[str, Any]:
        row = output_rows(job)[0]
        return {
            "id": f"chatcmpl-{job['job_id']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": spec.id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": row["text"]},
                    "finish_reason": row["finish_reason"],
                    "logprobs": None,
                }
            ],
            "usage": usage([row]),
        }

    return Prepared(spec, {"inputs": {"messages": messages}, "parameters": parameters}, respond)


# The endpoints a batch may name: each one's request schema and translation (batches/store.py).
BATCH_ENDPOINTS: dict[str, tuple[type[ma.Schema], Callable[[dict[str, Any], Catalog], Prepared]]] = {
    "/v1/embeddings": (EmbeddingsRequest, prepare_embeddings),
    "/v1/completions": (CompletionRequest, prepare_completion),
    "/v1/chat/completions": (ChatRequest, prepare_chat),
}


def _messages(catalog: Catalog, raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as the worker's chat template takes them: text content (a string, or text parts joined)."""
    messages = []
    for index, message in enumerate(raw):
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if not all(isinstance(t, str) for t in texts):
                raise_if({f"messages.{index}.content": ["only text parts ({type: text, text}) are supported"]})
            content = "".join(texts)
        messages.append({**{k: v for k, v in message.items() if v is not None}, "content": content})
    problem = messages_error(messages, catalog.settings.max_input_chars)
    if problem:
        raise_if({"messages": [problem]})
    return messages


def usage(rows: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(int(r.get("prompt_tokens", 0)) for r in rows)
    completion = sum(int(r.get("tokens", 0)) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
