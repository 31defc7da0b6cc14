"""An OpenAI-compatible API under /v1, on the same job path as /serve (jobs recorded, batching, auth, metrics,
rate limits): models, embeddings, completions and chat completions, streamed as Server-Sent Events ending with
`data: [DONE]`. The `openai` package works unchanged with `base_url=.../v1` and an AetherCore API key as its
`api_key`. Errors take OpenAI's shape. What is served and what is not: docs/PROTOCOLS.md.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import marshmallow as ma
import numpy as np
from flask.views import MethodView
from loguru import logger
from marshmallow import validate

from api.auth import READ_MODELS, SERVE, requires
from api.errors import ApiError, field_errors, register_error_dialect
from api.idempotency import idempotent
from api.json_provider import Blueprint
from api.relay import SSE_KEEPALIVE, Frames, Relay, admitted, sse_data, sse_response
from api.schemas import WebhookSchema
from api.services import services
from api.submitting import (
    check_texts,
    ended_error,
    output_rows,
    raise_if,
    requested_url,
    run_to_end,
    submit,
    text_fields,
)
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
from submission.validation import parameter_errors
from tasks.states import SUCCEEDED

blp = Blueprint(
    "openai",
    __name__,
    url_prefix="/v1",
    description="OpenAI-compatible API (models, embeddings, completions, chat completions)",
)

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


register_error_dialect("/v1", openai_error)


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


def _request_fields(body: dict[str, Any]) -> dict[str, Any]:
    """What a /v1 body asks of its submission besides the job: the lane its service_tier names (a role may be
    limited: 403), its webhook (else the caller's default endpoint)."""
    return {
        "lane": SERVICE_TIER_LANES[body.get("service_tier") or "auto"],
        "webhook": requested_url(body.get("webhook")),
    }


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


class OpenAIModel(ma.Schema):
    id = ma.fields.String()
    object = ma.fields.String()
    created = ma.fields.Integer()
    owned_by = ma.fields.String()
    task = ma.fields.String(metadata={"description": "Extension: the model's task"})


class OpenAIModelList(ma.Schema):
    object = ma.fields.String()
    data = ma.fields.List(ma.fields.Nested(OpenAIModel))


def _model_object(spec: ModelSpec) -> dict[str, Any]:
    return {"id": spec.id, "object": "model", "created": 0, "owned_by": "aethercore", "task": spec.task}


def _spec_for(model: str, task: str, endpoint: str) -> ModelSpec:
    spec = services().spec(model)
    if spec.task != task:
        raise ApiError(
            400,
            "model_not_supported",
            f"model {model!r} is a {spec.task} model; {endpoint} serves {task} models",
            {"model": [f"is a {spec.task} model"]},
        )
    return spec


def _texts(value: Any, field: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise_if({field: ["must be a string or a non-empty list of strings (token arrays are not supported)"]})
    check_texts(items, field)
    return items


def _generation_parameters(spec: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
    parameters = {PARAMETER_NAMES[k]: v for k, v in body.items() if k in PARAMETER_NAMES and v is not None}
    raise_if(parameter_errors(spec, parameters))
    return parameters


def _log_user(body: dict[str, Any], spec: ModelSpec) -> None:
    if body.get("user"):
        logger.bind(model_id=spec.id).info("OpenAI request for end user {!r}", body["user"])


def _refusals(wrong_task: str):
    """The errors every generation or embedding operation documents."""

    def document(view):
        for status, description in (
            (400, wrong_task),
            (404, "Unknown model"),
            (
                409,
                "Model not loaded, and this caller may not load it (AETHERCORE_AUTOLOAD, `autoload` in models.yaml); "
                "or a webhook and no signing secret",
            ),
            (422, "Invalid body: the field is named in error.param"),
        ):
            view = blp.alt_response(status, description=description)(view)
        return view

    return document


@blp.route("/models")
class Models(MethodView):
    @blp.response(200, OpenAIModelList)
    @requires(*READ_MODELS)
    def get(self):
        return {"object": "list", "data": [_model_object(spec) for spec in services().models.values()]}


@blp.route("/models/<string:model>")
class Model(MethodView):
    @blp.response(200, OpenAIModel)
    @blp.alt_response(404, description="Unknown model")
    @requires(*READ_MODELS)
    def get(self, model: str):
        return _model_object(services().spec(model))


@dataclass(frozen=True)
class Prepared:
    """An OpenAI request translated onto the inference path: the model, the job's fields (inputs, parameters, batch;
    already checked: a `SubmitRequest`'s) and
    how the ended job becomes the endpoint's response body. The /v1 views and the Batch API's lines (api/batches.py)
    both run exactly this, so a batch line answers what the same /v1 request answers."""

    spec: ModelSpec
    payload: dict[str, Any]
    respond: Callable[[dict[str, Any]], dict[str, Any]]


def prepare_embeddings(body: dict[str, Any]) -> Prepared:
    spec = _spec_for(body["model"], "feature-extraction", "/v1/embeddings")
    texts = _texts(body["input"], "input")
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


def _completion_parts(body: dict[str, Any]) -> tuple[ModelSpec, list[str], dict[str, Any]]:
    spec = _spec_for(body["model"], "text-generation", "/v1/completions")
    prompts = _texts(body["prompt"], "prompt")
    parameters = _generation_parameters(spec, body)
    _log_user(body, spec)
    return spec, prompts, parameters


def prepare_completion(body: dict[str, Any]) -> Prepared:
    """A completion answered at its end (not streamed)."""
    spec, prompts, parameters = _completion_parts(body)

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
            "usage": _usage(rows),
        }

    return Prepared(spec, {**text_fields(prompts), "parameters": parameters}, respond)


def _chat_parts(body: dict[str, Any]) -> tuple[ModelSpec, list[dict[str, Any]], dict[str, Any]]:
    spec = _spec_for(body["model"], "text-generation", "/v1/chat/completions")
    messages = _messages(body["messages"])
    parameters = _generation_parameters(spec, body)
    _log_user(body, spec)
    return spec, messages, parameters


def prepare_chat(body: dict[str, Any]) -> Prepared:
    """A chat completion answered at its end (not streamed)."""
    spec, messages, parameters = _chat_parts(body)

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
            "usage": _usage([row]),
        }

    return Prepared(spec, {"inputs": {"messages": messages}, "parameters": parameters}, respond)


# The endpoints a batch may name: each one's request schema and translation (api/batches.py).
BATCH_ENDPOINTS: dict[str, tuple[type[ma.Schema], Callable[[dict[str, Any]], Prepared]]] = {
    "/v1/embeddings": (EmbeddingsRequest, prepare_embeddings),
    "/v1/completions": (CompletionRequest, prepare_completion),
    "/v1/chat/completions": (ChatRequest, prepare_chat),
}


def _answer(prepared: Prepared, body: dict[str, Any]) -> dict[str, Any]:
    fields = {**prepared.payload, **_request_fields(body)}
    return prepared.respond(run_to_end(prepared.spec.id, checked=True, **fields))


@blp.route("/embeddings")
class Embeddings(MethodView):
    @idempotent
    @blp.arguments(EmbeddingsRequest)
    @blp.response(200, description="OpenAI's embedding list, with usage (prompt tokens after truncation)")
    @_refusals("Not an embedding model")
    @requires(*SERVE)
    def post(self, body: dict[str, Any]):
        return _answer(prepare_embeddings(body), body)


@blp.route("/completions")
class Completions(MethodView):
    @idempotent
    @blp.arguments(CompletionRequest)
    @blp.response(200, description="A text_completion, or with `stream` Server-Sent Events ending in [DONE]")
    @_refusals("Not a text-generation model")
    @requires(*SERVE)
    def post(self, body: dict[str, Any]):
        if not body.get("stream"):
            return _answer(prepare_completion(body), body)
        spec, prompts, parameters = _completion_parts(body)
        if len(prompts) != 1:
            raise_if({"prompt": ["stream takes one prompt"]})
        return _stream(spec, {"text": prompts[0]}, parameters, body, chat=False)


@blp.route("/chat/completions")
class ChatCompletions(MethodView):
    @idempotent
    @blp.arguments(ChatRequest)
    @blp.response(200, description="A chat.completion, or with `stream` Server-Sent Events ending in [DONE]")
    @_refusals("Not a text-generation model")
    @requires(*SERVE)
    def post(self, body: dict[str, Any]):
        if not body.get("stream"):
            return _answer(prepare_chat(body), body)
        spec, messages, parameters = _chat_parts(body)
        return _stream(spec, {"messages": messages}, parameters, body, chat=True)


def _messages(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    problem = messages_error(messages, services().settings.max_input_chars)
    if problem:
        raise_if({"messages": [problem]})
    return messages


def _usage(rows: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(int(r.get("prompt_tokens", 0)) for r in rows)
    completion = sum(int(r.get("tokens", 0)) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class CompletionChunks(Frames):
    """OpenAI's stream events (chat.completion.chunk or text_completion), ending with `data: [DONE]`; a client
    that goes away before the end cancels the job (as a closed WebSocket does)."""

    keepalive_s = 15
    keepalive = SSE_KEEPALIVE
    cancel_on_disconnect = True

    def __init__(self, spec: ModelSpec, job_id: str, chat: bool, include_usage: bool) -> None:
        self.model, self.chat, self.include_usage = spec.id, chat, include_usage
        self.ident = f"{'chatcmpl' if chat else 'cmpl'}-{job_id}"
        self.created = int(time.time())

    def frame(self, delta: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            payload = {} if delta is None else {"content": delta}
            if first:
                payload = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": payload, "finish_reason": finish, "logprobs": None}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            kind = "text_completion"
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def opening(self) -> list[str]:
        return [sse_data(self.frame(None, None, first=True))] if self.chat else []

    def chunk(self, data: dict[str, Any], event_id: str) -> str | None:
        return sse_data(self.frame(data["text"], None)) if data.get("text") else None

    def done(self, job: dict[str, Any], event_id: str) -> list[str]:
        if job.get("status") != SUCCEEDED:
            return [self.error(ended_error(job))]
        row = (job.get("result") or {}).get("output") or {}
        frames = [sse_data(self.frame(None, row.get("finish_reason", "stop")))]
        if self.include_usage:
            frames.append(sse_data({**self.frame(None, None), "choices": [], "usage": _usage([row])}))
        return [*frames, "data: [DONE]\n\n"]

    def error(self, error: ApiError) -> str:
        return sse_data(openai_error(error.status, error.code, error.message, {}))


def _stream(spec: ModelSpec, inputs: dict[str, Any], parameters: dict[str, Any], body: dict[str, Any], chat: bool):
    """Queue the generation (once the process admits one more stream: api/limits.py), then relay its chunks as
    OpenAI's stream events (api/relay.py)."""
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    fields = {"inputs": inputs, "parameters": parameters, "checked": True, **_request_fields(body)}
    with admitted() as slot:
        job = submit(spec.id, **fields)
        return sse_response(Relay(job, CompletionChunks(spec, job["job_id"], chat, include_usage)), slot)
