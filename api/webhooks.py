"""A request's completion webhook, decided on the request path without I/O beyond a cached read: the URL (the
request's, else the caller's default endpoint), checked against the outbound rules (webhooks/outbound.py; no DNS
here, the dispatcher resolves and checks again), and the owner whose secret signs it. The job carries the result
(`webhook` field, JSON {url, owner}); the Lua step that ends it makes the delivery due (webhooks/deliveries.py)."""

from __future__ import annotations

from typing import Any

import orjson
from flask import g

from api.services import services
from protocols.errors import ApiError
from tasks.holdings import DELIVERIES
from webhooks.outbound import ForbiddenDestination, MalformedUrl

ANONYMOUS = "anonymous"
PENDING_RETRY_AFTER_S = 30  # a caller at AETHERCORE_WEBHOOK_MAX_PENDING: deliveries end at the receivers' pace


def owner_id() -> str:
    who = g.get("principal")
    return who.id if who is not None else ANONYMOUS


def requested_url(value: Any) -> str | None:
    """The URL of a body's `webhook` object ({"url": ...}), or None."""
    return value.get("url") if isinstance(value, dict) else None


def job_webhook(url: str | None, field: str = "webhook.url") -> str | None:
    """The `webhook` to store on a job (JSON {url, owner}) or None: the request's URL, else the caller's default
    endpoint (`manage.py auth webhook`; not one a 410 disabled). 422 for a URL webhooks may not call, 409 while the
    caller has no signing secret or names an endpoint that answered 410, 429 while the caller keeps its most pending
    deliveries."""
    svc = services()
    owner = owner_id()
    if url is None:
        url = svc.webhook_cache.get("endpoints", svc.webhook_owners.endpoints).get(owner)
        if url is None or svc.webhook_owners.disabled(owner, url):
            return None
    else:
        try:
            svc.outbound.check_url(url)
        except MalformedUrl as exc:
            raise ApiError(422, "validation_error", f"{field} {exc}", {field: [str(exc)]}) from None
        except ForbiddenDestination as exc:  # well formed, but not a destination webhooks may reach
            raise ApiError(403, "webhook_forbidden", f"{field} {exc}", {field: [str(exc)]}) from None
        if svc.webhook_owners.disabled(owner, url):
            raise ApiError(
                409,
                "webhook_disabled",
                f"{url} answered 410 Gone to a delivery, so it is disabled for {owner}; an operator enables it again "
                f"with `manage.py webhooks enable --owner {owner} {url}`",
            )
    if not svc.webhook_owners.has_secret(owner):
        raise ApiError(
            409,
            "webhook_secret_missing",
            f"{owner} has no webhook signing secret yet; an admin creates it with "
            f"`manage.py auth webhook-secret {owner}` (and gives it to the receiver)",
        )
    check_pending(owner)
    return orjson.dumps({"url": url, "owner": owner}).decode()


def check_pending(owner: str) -> None:
    """429 `too_many_webhooks` while the owner keeps AETHERCORE_WEBHOOK_MAX_PENDING deliveries (pending, retrying, or
    failed and kept): each is charged to them from the job's end until it is delivered or expires. The count is read
    at most once a second per process, so a burst may pass it by what one second admits."""
    svc = services()
    pending = svc.held(owner)[DELIVERIES].count
    limit = svc.settings.webhook_max_pending
    if pending >= limit:
        raise ApiError(
            429,
            "too_many_webhooks",
            f"you keep {pending} webhook deliveries (pending, retrying, or failed and kept), the most "
            f"AETHERCORE_WEBHOOK_MAX_PENDING={limit} allows: retry once some are delivered or expire, or send the "
            "request without a webhook",
            {"pending": pending, "limit": limit},
            headers={"Retry-After": str(PENDING_RETRY_AFTER_S)},
        )


# -- a Batch API batch's webhook (api/blueprints/batches.py, batches/store.py) --------------------------------------
BATCH_WEBHOOK_KEY = "webhook_url"  # the batch's `metadata` key naming its webhook


def batch_webhook(metadata: dict[str, Any] | None) -> str | None:
    """The `webhook` to keep with a new batch (JSON {url, owner}) or None: `metadata.webhook_url`, else the caller's
    default endpoint; checked like a job's (422, 409). The Lua step that ends the batch makes its delivery due
    (batches/store.py `_END`); the dispatcher builds its body at the first attempt (batches/objects.py
    `webhook_body`)."""
    url = (metadata or {}).get(BATCH_WEBHOOK_KEY)
    return job_webhook(url, f"metadata.{BATCH_WEBHOOK_KEY}")
