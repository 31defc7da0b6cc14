"""Model management: list, load, unload (queued jobs), status and info."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from access.principal import MANAGE_MODELS, READ_MODELS
from api.auth import requires
from api.blueprints.common import job_reply
from api.idempotency import idempotent
from api.json_provider import Blueprint
from api.services import services
from api.submitting import submit
from protocols.schemas import (
    JobSchema,
    ModelInfoSchema,
    ModelListSchema,
    ModelStatusSchema,
    UnloadQuerySchema,
    WaitQuerySchema,
)
from tasks.states import LOAD, UNLOAD

blp = Blueprint("models", __name__, description="Model management")


@blp.route("/models")
class Models(MethodView):
    @blp.response(200, ModelListSchema)
    @requires(*READ_MODELS)
    def get(self):
        svc = services()
        workers = svc.cluster.live_workers()
        out = []
        for spec in svc.models.values():
            status = svc.cluster.model_status(spec.id, workers)
            out.append(
                {
                    **status,
                    "name": spec.name,
                    "model_type": spec.model_type,
                    "task": spec.task,
                    "source": spec.source,
                    "configured_device": spec.device,
                    "autoload": spec.autoload,
                }
            )
        return {"models": out}


def _job_endpoint(kind: str):
    @idempotent
    @blp.arguments(UnloadQuerySchema if kind == UNLOAD else WaitQuerySchema, location="query")
    @blp.response(202, JobSchema, description=f"{kind.capitalize()} job queued (or still running after ?wait)")
    @blp.alt_response(200, schema=JobSchema, description="Finished within ?wait")
    @blp.alt_response(404, description="Unknown model")
    @blp.alt_response(409, description="A webhook, and the caller has no signing secret (or the endpoint answered 410)")
    @requires(*MANAGE_MODELS)
    def post(self, query: dict[str, Any], model_id: str):
        # force (unload): end the model's running jobs at once rather than drain them; the webhook: the caller's
        # default endpoint, if it has one
        force = bool(query.get("force"))
        return job_reply(submit(model_id, kind=kind, force=force, wait_s=query["wait"]))

    return post


@blp.route("/models/<string:model_id>/load")
class LoadModel(MethodView):
    post = _job_endpoint(LOAD)


@blp.route("/models/<string:model_id>/unload")
class UnloadModel(MethodView):
    post = _job_endpoint(UNLOAD)


@blp.route("/models/<string:model_id>/status")
class ModelStatus(MethodView):
    @blp.response(200, ModelStatusSchema)
    @blp.alt_response(404, description="Unknown model")
    @requires(*READ_MODELS)
    def get(self, model_id: str):
        svc = services()
        return svc.cluster.model_status(svc.spec(model_id).id)


@blp.route("/models/<string:model_id>/info")
class ModelInfo(MethodView):
    @blp.response(200, ModelInfoSchema)
    @blp.alt_response(404, description="Unknown model")
    @requires(*READ_MODELS)
    def get(self, model_id: str):
        svc = services()
        spec = svc.spec(model_id)
        status = svc.cluster.model_status(spec.id)
        loaded = next((r.get("info") for r in status["replicas"] if r.get("info")), None)
        signature = svc.signature(spec)
        return {
            "model_id": spec.id,
            "config": spec.public(),
            "state": status["state"],
            "signature": signature.public() if signature is not None else None,
            "loaded": loaded,
        }
