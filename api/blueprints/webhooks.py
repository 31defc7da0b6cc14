"""Webhook deliveries that failed for good (webhooks/deliveries.py): list them, send one again. For operators
(`manage.py webhooks failed|retry`)."""

from __future__ import annotations

import re
from typing import Any

import marshmallow as ma
from flask.views import MethodView
from marshmallow import validate

from access.principal import READ_ALL_JOBS
from api.auth import requires
from api.json_provider import Blueprint
from api.services import services
from protocols.errors import ApiError

blp = Blueprint("webhooks", __name__, description="Completion webhooks: failed deliveries (admins and operators)")
_DELIVERY_ID = re.compile(r"^msg_[A-Za-z0-9_]{1,80}$")


class FailedQuerySchema(ma.Schema):
    limit = ma.fields.Integer(load_default=100, validate=validate.Range(min=1, max=10000))


class DeliverySchema(ma.Schema):
    id = ma.fields.String(metadata={"description": "The delivery's id, also its webhook-id"})
    kind = ma.fields.String(metadata={"description": "job or batch"})
    ref = ma.fields.String(metadata={"description": "The job (or batch) id"})
    event = ma.fields.String(allow_none=True)
    url = ma.fields.String()
    owner = ma.fields.String()
    reason = ma.fields.String(allow_none=True)
    last_error = ma.fields.String(allow_none=True)
    attempts = ma.fields.Integer()
    failed_at = ma.fields.Float(allow_none=True)


class FailedListSchema(ma.Schema):
    deliveries = ma.fields.List(ma.fields.Nested(DeliverySchema))
    depth = ma.fields.Dict(metadata={"description": "new, retrying, in_flight, failed; dispatchers alive"})


class RetriedSchema(ma.Schema):
    delivery_id = ma.fields.String()
    retried = ma.fields.Boolean()


def _public(record: dict[str, Any]) -> dict[str, Any]:
    hook = record.get("webhook") or {}
    return {
        "id": record["id"],
        "kind": record.get("kind"),
        "ref": record.get("ref"),
        "event": record.get("event"),
        "url": hook.get("url"),
        "owner": hook.get("owner"),
        "reason": record.get("reason"),
        "last_error": record.get("last_error"),
        "attempts": int(record.get("attempts") or 0),
        "failed_at": float(record["failed_at"]) if record.get("failed_at") else None,
    }


@blp.route("/webhooks/failed")
class FailedDeliveries(MethodView):
    @blp.arguments(FailedQuerySchema, location="query")
    @blp.response(200, FailedListSchema, description="Deliveries that failed for good, newest first")
    @requires(*READ_ALL_JOBS)
    def get(self, query: dict[str, Any]):
        svc = services()
        return {
            "deliveries": [_public(r) for r in svc.deliveries.failed_list(query["limit"])],
            "depth": svc.deliveries.depth(),
        }


@blp.route("/webhooks/failed/<string:delivery_id>/retry")
class RetryDelivery(MethodView):
    @blp.response(202, RetriedSchema, description="Due again now: a new retry window, the same webhook-id")
    @blp.alt_response(404, description="No such failed delivery (or it expired)")
    @requires(*READ_ALL_JOBS)
    def post(self, delivery_id: str):
        svc = services()
        record = svc.deliveries.get(delivery_id) if _DELIVERY_ID.match(delivery_id) else None
        if record is None or record.get("state") != "failed" or not svc.deliveries.retry(delivery_id):
            raise ApiError(404, "delivery_not_found", f"no failed delivery {delivery_id[:90]!r} (or it expired)")
        hook = record["webhook"]
        svc.webhook_owners.enable(hook.get("owner", ""), hook.get("url", ""))  # an operator's decision over a 410
        return {"delivery_id": delivery_id, "retried": True}, 202
