"""Inference: POST /serve (one job), POST /serve/batch (one job, many inputs), WS /serve/stream."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import Flask
from flask.views import MethodView

from access.principal import SERVE
from api.auth import check_role, requires
from api.blueprints.common import job_reply
from api.errors import refused_error
from api.idempotency import idempotent
from api.json_provider import Blueprint, json_text, parse_body
from api.relay import Frames, Relay, relay_to_socket
from api.submitting import submit
from api.websocket import RequestSocket, websocket_route
from protocols.errors import ApiError
from protocols.results import requested_url
from protocols.schemas import BatchRequestSchema, JobSchema, ServeRequestSchema, WaitQuerySchema
from submission.errors import Refused
from tasks.jobs.public import public_job
from tasks.names import DEFAULT_LANE
from tasks.states import FAILED

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
        return job_reply(submit(body["model_id"], wait_s=query["wait"], **serve_fields(body)))


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
        return job_reply(submit(body["model_id"], batch=True, wait_s=query["wait"], **serve_fields(body)))


def serve_fields(body: dict[str, Any]) -> dict[str, Any]:
    """A /serve body (ServeRequestSchema, BatchRequestSchema) as a submission's fields."""
    return {
        "inputs": body["inputs"],
        "parameters": body["parameters"],
        "lane": body.get("priority", DEFAULT_LANE),
        "timeout_s": body.get("timeout"),
        "encoding_format": body.get("encoding_format"),
        "result_ttl": body.get("result_ttl"),
        "webhook": requested_url(body.get("webhook")),
    }


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
        job = submit(body["model_id"], **serve_fields(body))
    except ApiError as exc:
        ws.send(socket_error(exc))
        return
    except Refused as exc:
        ws.send(socket_error(refused_error(exc)))
        return
    relay_to_socket(ws, Relay(job, SocketFrames(job["job_id"])))
