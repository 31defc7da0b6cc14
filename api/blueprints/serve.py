"""Inference: POST /serve (one job), POST /serve/batch (one job, many inputs), WS /serve/stream."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
import orjson
from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from loguru import logger
from simple_websocket import ConnectionClosed

from api.auth import SERVE, check_role, requires
from api.blueprints.common import job_reply, public_job
from api.errors import ApiError
from api.inference import input_errors, job_payload, parameter_errors, raise_if, route, submit_inference
from api.json_provider import json_text
from api.schemas import BatchRequestSchema, JobSchema, ServeRequestSchema, WaitQuerySchema
from api.services import services
from api.streaming import follow_job
from tasks.states import FAILED, INFERENCE

blp = Blueprint("serve", __name__, description="Inference serving")


@blp.route("/serve")
class Serve(MethodView):
    @blp.arguments(ServeRequestSchema)
    @blp.arguments(WaitQuerySchema, location="query")
    @blp.response(202, JobSchema, description="Queued (or still running after ?wait)")
    @blp.alt_response(200, schema=JobSchema, description="Finished within ?wait")
    @blp.alt_response(404, description="Unknown model")
    @blp.alt_response(409, description="Model not loaded and AETHERCORE_AUTOLOAD=false")
    @blp.alt_response(422, description="Invalid body")
    @blp.alt_response(503, description="Redis or the queue unavailable")
    @requires(*SERVE)
    def post(self, body: dict[str, Any], query: dict[str, Any]):
        return job_reply(submit_inference(body, wait_s=query["wait"]))


@blp.route("/serve/batch")
class ServeBatch(MethodView):
    @blp.arguments(BatchRequestSchema)
    @blp.arguments(WaitQuerySchema, location="query")
    @blp.response(202, JobSchema, description="Queued; the result holds `outputs` in input order")
    @blp.alt_response(200, schema=JobSchema, description="Finished within ?wait")
    @blp.alt_response(404, description="Unknown model")
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


def register_websocket(sock) -> None:
    """WS /serve/stream: send the POST /serve body; receive queued, chunk... (and a `status` note while a
    generation waits for room in the running batch), then done (or error).

    Closing the socket before the end cancels the job (a generation stops within a few tokens).
    """

    @sock.route("/serve/stream")
    def serve_stream(ws) -> None:
        gauge = current_app.extensions["aethercore_metrics"].streams.labels("websocket")
        gauge.inc()
        try:
            _serve_stream(ws)
        finally:
            gauge.dec()

    def _serve_stream(ws) -> None:
        svc = services()
        try:
            check_role(SERVE)
            raw = ws.receive(timeout=30)
            if raw is None:
                raise ApiError(408, "timeout", "send the request JSON within 30 s of connecting")
            try:
                payload = orjson.loads(raw)
            except (TypeError, ValueError):
                raise ApiError(400, "bad_request", "the message is not valid JSON") from None
            try:
                body = ServeRequestSchema().load(payload)
            except ma.ValidationError as exc:
                raise ApiError(
                    422, "validation_error", "the request is invalid; see details for each field", exc.messages
                ) from None
            job = submit_inference(body)
        except ApiError as exc:
            ws.send(
                json_text(
                    {"type": "error", "error": {"code": exc.code, "message": exc.message, "details": exc.details}}
                )
            )
            return
        job_id = job["job_id"]
        try:
            ws.send(json_text({"type": "queued", "job_id": job_id}))
            for event in follow_job(svc.jobs, job_id, "0-0", alive=lambda: ws.connected, hub=svc.streams):
                if event.kind == "chunk":
                    ws.send(json_text({"type": "chunk", **event.data}))
                elif event.kind == "status":
                    ws.send(json_text({"type": "status", **event.data}))
                elif event.kind == "done":
                    finished = public_job(event.data)
                    if finished["status"] == FAILED:
                        ws.send(json_text({"type": "error", "error": finished["error"], "job": finished}))
                    else:
                        ws.send(json_text({"type": "done", "job": finished}))
                    return
        except ConnectionClosed:
            pass
        # The client went away before the end: stop the work it asked for.
        if svc.jobs.request_cancel(job_id, "the streaming client disconnected"):
            logger.bind(job_id=job_id, model_id=job["model_id"]).info("stream closed by the client; cancelling")
