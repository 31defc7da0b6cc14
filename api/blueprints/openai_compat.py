"""An OpenAI-compatible API under /v1, on the same job path as /serve (jobs recorded, batching, auth, metrics,
rate limits): models, embeddings, completions and chat completions, streamed as Server-Sent Events ending with
`data: [DONE]`. The `openai` package works unchanged with `base_url=.../v1` and an AetherCore API key as its
`api_key`. Errors take OpenAI's shape. What is served and what is not: docs/PROTOCOLS.md.
"""

from __future__ import annotations

import time
from typing import Any

import marshmallow as ma
from flask.views import MethodView

from access.principal import READ_MODELS, SERVE
from api.auth import requires
from api.errors import register_error_dialect
from api.idempotency import idempotent
from api.json_provider import Blueprint
from api.relay import SSE_KEEPALIVE, Frames, Relay, admitted, sse_data, sse_response
from api.services import services
from api.submitting import ended_error, run_to_end, submit
from config.models import ModelSpec
from protocols.errors import ApiError
from protocols.openai import (
    SERVICE_TIER_LANES,
    ChatRequest,
    CompletionRequest,
    EmbeddingsRequest,
    Prepared,
    chat_parts,
    completion_parts,
    openai_error,
    prepare_chat,
    prepare_completion,
    prepare_embeddings,
    usage,
)
from protocols.results import raise_if, requested_url
from tasks.states import SUCCEEDED

blp = Blueprint(
    "openai",
    __name__,
    url_prefix="/v1",
    description="OpenAI-compatible API (models, embeddings, completions, chat completions)",
)

register_error_dialect("/v1", openai_error)


def _request_fields(body: dict[str, Any]) -> dict[str, Any]:
    """What a /v1 body asks of its submission besides the job: the lane its service_tier names (a role may be
    limited: 403), its webhook (else the caller's default endpoint)."""
    return {
        "lane": SERVICE_TIER_LANES[body.get("service_tier") or "auto"],
        "webhook": requested_url(body.get("webhook")),
    }


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
        return _answer(prepare_embeddings(body, services()), body)


@blp.route("/completions")
class Completions(MethodView):
    @idempotent
    @blp.arguments(CompletionRequest)
    @blp.response(200, description="A text_completion, or with `stream` Server-Sent Events ending in [DONE]")
    @_refusals("Not a text-generation model")
    @requires(*SERVE)
    def post(self, body: dict[str, Any]):
        if not body.get("stream"):
            return _answer(prepare_completion(body, services()), body)
        spec, prompts, parameters = completion_parts(body, services())
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
            return _answer(prepare_chat(body, services()), body)
        spec, messages, parameters = chat_parts(body, services())
        return _stream(spec, {"messages": messages}, parameters, body, chat=True)


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
            frames.append(sse_data({**self.frame(None, None), "choices": [], "usage": usage([row])}))
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
