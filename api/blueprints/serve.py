"""POST /serve: queue one inference job (submit-and-poll, or wait with ?wait=SECONDS)."""

from __future__ import annotations

import math
from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from api.blueprints.common import job_reply
from api.errors import ApiError
from api.schemas import JobSchema, ServeRequestSchema, WaitQuerySchema
from api.services import services
from config.models import TEXT_TASKS, ModelSpec

blp = Blueprint("serve", __name__, description="Inference serving")


def validate_request(spec: ModelSpec, inputs: dict[str, Any], parameters: dict[str, Any]) -> None:
    """Reject what the worker would reject, before it is queued: 422 with the field named."""
    errors: dict[str, list[str]] = {}
    if spec.task in TEXT_TASKS:
        text = inputs.get("text")
        if not isinstance(text, str) or not text.strip():
            errors["inputs.text"] = ["a non-empty string is required"]
        unknown = sorted(set(inputs) - {"text"})
        if unknown:
            errors["inputs"] = [f"unknown input(s) {unknown}; this model takes only 'text'"]
    if "max_length" in parameters:
        value = parameters["max_length"]
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or int(value) != value or not 1 <= value <= spec.max_length_limit):
            errors["parameters.max_length"] = [f"must be a whole number from 1 to {spec.max_length_limit}"]
    if errors:
        raise ApiError(422, "validation_error", "the request is invalid; see details for each field", errors)


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
    def post(self, body: dict[str, Any], query: dict[str, Any]):
        svc = services()
        spec = svc.spec(body["model_id"])
        validate_request(spec, body["inputs"], body["parameters"])
        device = svc.device_for(spec)
        if not svc.settings.autoload and svc.cluster.desired(spec.id) is None:
            raise ApiError(409, "model_not_loaded",
                           f"model {spec.id!r} is not loaded and autoload is off; "
                           f"load it first with POST /models/{spec.id}/load")
        job = svc.submit("inference", spec, device, {"inputs": body["inputs"], "parameters": body["parameters"]})
        return job_reply(svc.wait(job, query["wait"]))
