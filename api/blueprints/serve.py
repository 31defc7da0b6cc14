"""Inference: POST /serve (one job), POST /serve/batch (one job, many inputs), WS /serve/stream."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import Flask
from flask.views import MethodView

from access.principal import SERVE
from api.auth import check_role, requires
from api.blueprints.common import job_reply
from api.idempotency import idempotent
from api.inference import input_errors, job_payload, parameter_errors, raise_if, route, submit_inference
from api.json_provider import Blueprint, json_text, parse_body
from api.relay import Frames, Relay, relay_to_socket
from api.schemas import BatchRequestSchema, JobSchema, ServeRequestSchema, WaitQuerySchema
from api.services import services
from api.websocket import RequestSocket, websocket_route
from protocols.errors import ApiError
from tasks.jobs.public import public_job
from tasks.states import FAILED, INFERENCE

blp = Blueprint("serve", __name__, description="Inference serving")
CONFLICTS = (
    "Model not loaded, and this caller may not load it (see `autoload`); or a webhook, and the caller has no signing "
    "secret (or the endpoint answered 410)"
)


@blp.route("/serve")
class Serve(MethodView):
    @idempotent
    @blp.arguments(ServeRequestSchema)
    @blp.arguments(WaitQuerySchema, location="query")
    @blp.response(202, JobSchema, description="Queued (or still running after ?wait)")
    @blp.alt_response(200, schema=JobSchema, description="Finished within ?wait")
    @blp.alt_response(404, description="Unknown model")
    @blp.alt_response(409, description=CONFLICTS)
    @blp.alt_response(422, description="Invalid body")
    @blp.alt_response(503, description="Redis or the queue unavailable")
    @requires(*SERVE)
    def post(self, body: dict[str, Any], query: dict[str, Any]):
        return job_reply(submit_inference(body, wait_s=query["wait"]))


@blp.route("/serve/batch")
class ServeBatch(MethodView):
    @idempotent
    @blp.arguments(BatchRequestSchema)
    @blp.arguments(WaitQuerySchema, location="query")
    @blp.response(202, JobSchema, description="Queued; the result holds `outputs` in input order")
    @blp.alt_response(200, schema=JobSchema, description="Finished within ?wait")
    @blp.alt_response(404, description="Unknown model")
    @blp.alt_response(409, description=CONFLICTS)
    @blp.alt_response(413, description="More inputs than AETHERCORE_MAX_BATCH_INPUTS")
    @blp.alt_response(422, description="Invalid body")
    @requires(*SERVE)
    def post(self, body: dict[str, Any], query: dict[str, Any]):
        svc = services()
        spec = svc.spec(body["model_id"])
        items = body["inputs"]
        limit = svc.settings.max_batch_inputs
        if len(items) > limit:
            raise ApiError(
                413,
                "too_many_inputs",
                f"a batch may carry at most {limit} inputs, got {len(items)}; split it into several requests",
                {"limit": limit, "inputs": len(items)},
            )
        errors: dict[str, list[str]] = {}
        for i, item in enumerate(items):
            errors.update(input_errors(spec, item, f"inputs.{i}"))
        raise_if({**errors, **parameter_errors(spec, body["parameters"])})
        return job_reply(
            svc.submit(INFERENCE, spec, route(svc, spec), job_payload(body, batch=True), wait_s=query["wait"])
        )


class SocketFrames(Frames):
    """WS /serve/stream's messages: queued, chunk... (and `status` notes), then done or error. Closing the socket
    before the end cancels the job (a generation stops within a few tokens)."""

    transport = "websocket"
    cancel_on_disconnect = True

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def opening(self) -> list[str]:
        return [json_text({"type": "queued", "job_id": self.job_id})]

    def chunk(self, data: dict[str, Any], event_id: str) -> str:
        return json_text({"type": "chunk", **data})

    def status(self, data: dict[str, Any], event_id: str) -> str:
        return json_text({"type": "status", **data})

    def done(self, job: dict[str, Any], event_id: str) -> list[str]:
        finished = public_job(job)
        if finished["status"] == FAILED:
            return [json_text({"type": "error", "error": finished["error"], "job": finished})]
        return [json_text({"type": "done", "job": finished})]

    def error(self, error: ApiError) -> str:
        return socket_error(error)


def socket_error(error: ApiError) -> str:
    return json_text(
        {"type": "error", "error": {"code": error.code, "message": error.message, "details": error.details}}
    )


def register_websocket(app: Flask) -> None:
    """WS /serve/stream: send the POST /serve body as one message (nothing after it: api/websocket.py); receive
    queued, chunk... (and a `status` note while a generation waits for room in the running batch), then done
    (or error)."""
    websocket_route(app, "/serve/stream", "serve_stream", serve_stream)


def serve_stream(ws: RequestSocket) -> None:
    try:
        check_role(SERVE)
        raw = ws.receive(timeout=30)
        if raw is None:
            raise ApiError(408, "timeout", "send the request JSON within 30 s of connecting")
        payload = parse_body(raw, "the message")  # bounded like every body (api/json_provider.py)
        try:
            body = ServeRequestSchema().load(payload)
        except ma.ValidationError as exc:
            raise ApiError(
                422, "validation_error", "the request is invalid; see details for each field", exc.messages
            ) from None
        job = submit_inference(body)
    except ApiError as exc:
        ws.send(socket_error(exc))
        return
    relay_to_socket(ws, Relay(job, SocketFrames(job["job_id"])))
