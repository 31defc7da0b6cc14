"""A submission's completion webhook, decided on the request path without I/O beyond a cached read: the URL (the
request's, else the owner's default endpoint), checked against the outbound rules (webhooks/outbound.py; no DNS here,
the dispatcher resolves and checks again), and the owner whose secret signs it. The job carries the result
(`webhook` field, JSON {url, owner}); the Lua step that ends it makes the delivery due (webhooks/deliveries.py). A Batch
API batch's webhook (`batch_webhook`) is decided the same way.

May import: config/, tasks/, submission/."""

from __future__ import annotations

from typing import Any

import orjson

from submission.errors import (
    TOO_MANY_WEBHOOKS,
    VALIDATION_ERROR,
    WEBHOOK_DISABLED,
    WEBHOOK_FORBIDDEN,
    WEBHOOK_SECRET_MISSING,
    Refused,
)
from tasks.holdings import DELIVERIES, Held, Holdings
from tasks.ttl_cache import TTLCache
from webhooks.outbound import ForbiddenDestination, MalformedUrl, OutboundPolicy
from webhooks.owners import WebhookOwners

ANONYMOUS = "anonymous"
PENDING_RETRY_AFTER_S = 30  # a caller at AETHERCORE_WEBHOOK_MAX_PENDING: deliveries end at the receivers' pace
# The callers' default webhook endpoints, re-read at most this often (a change takes effect within it).
WEBHOOK_CACHE_S = 5.0
# What each caller holds (tasks/holdings.py), re-read at most this often where a request's admission depends on it.
HOLDINGS_CACHE_S = 1.0
BATCH_WEBHOOK_KEY = "webhook_url"  # a batch's `metadata` key naming its webhook


def with_trace(webhook: str, traceparent: str, tracestate: str | None) -> str:
    """A job's `webhook` (JSON {url, owner}) with the trace context each of its deliveries sends (`traceparent`,
    `tracestate` headers): the job's end moves the webhook into the delivery as it is
    (tasks/jobs/lua/transition.lua)."""
    hook = orjson.loads(webhook)
    hook["traceparent"] = traceparent
    if tracestate:
        hook["tracestate"] = tracestate
    return orjson.dumps(hook).decode()


class Webhooks:
    """The webhook rules of one process: its owners' endpoints and secrets, the outbound policy, and each owner's
    pending deliveries (charged in tasks/holdings.py)."""

    def __init__(self, owners: WebhookOwners, outbound: OutboundPolicy, holdings: Holdings, max_pending: int) -> None:
        self.owners = owners
        self.outbound = outbound
        self.holdings = holdings
        self.max_pending = max_pending
        self.endpoint_cache = TTLCache(WEBHOOK_CACHE_S)
        self.holdings_cache = TTLCache(HOLDINGS_CACHE_S)

    def held(self, owner: str) -> dict[str, Held]:
        """What `owner` holds of each kind (tasks/holdings.py `Held`), read at most once a second per process."""
        return self.holdings_cache.get(owner, lambda: self.holdings.usage(owner))

    def decide(
        self, owner: str | None, url: str | None, field: str = "webhook.url", default: bool = True
    ) -> str | None:
        """The `webhook` to store on a job (JSON {url, owner}) or None: `url`, else the owner's default endpoint
        (`manage.py auth webhook`; not one a 410 disabled) when `default`. 422 for a URL webhooks may not call, 403
        for a destination they may not reach, 409 while the owner has no signing secret or names an endpoint that
        answered 410, 429 while the owner keeps its most pending deliveries."""
        owner = owner or ANONYMOUS
        if url is None:
            if not default:
                return None
            url = self.endpoint_cache.get("endpoints", self.owners.endpoints).get(owner)
            if url is None or self.owners.disabled(owner, url):
                return None
        else:
            try:
                self.outbound.check_url(url)
            except MalformedUrl as exc:
                raise Refused(VALIDATION_ERROR, f"{field} {exc}", {field: [str(exc)]}) from None
            except ForbiddenDestination as exc:  # well formed, but not a destination webhooks may reach
                raise Refused(WEBHOOK_FORBIDDEN, f"{field} {exc}", {field: [str(exc)]}) from None
            if self.owners.disabled(owner, url):
                raise Refused(
                    WEBHOOK_DISABLED,
                    f"{url} answered 410 Gone to a delivery, so it is disabled for {owner}; an operator enables it "
                    f"again with `manage.py webhooks enable --owner {owner} {url}`",
                )
        if not self.owners.has_secret(owner):
            raise Refused(
                WEBHOOK_SECRET_MISSING,
                f"{owner} has no webhook signing secret yet; an admin creates it with "
                f"`manage.py auth webhook-secret {owner}` (and gives it to the receiver)",
            )
        self.check_pending(owner)
        return orjson.dumps({"url": url, "owner": owner}).decode()

    def check_pending(self, owner: str) -> None:
        """429 `too_many_webhooks` while the owner keeps AETHERCORE_WEBHOOK_MAX_PENDING deliveries (pending,
        retrying, or failed and kept): each is charged to them from the job's end until it is delivered or expires.
        The count is read at most once a second per process, so a burst may pass it by what one second admits."""
        pending = self.held(owner)[DELIVERIES].count
        limit = self.max_pending
        if pending >= limit:
            raise Refused(
                TOO_MANY_WEBHOOKS,
                f"you keep {pending} webhook deliveries (pending, retrying, or failed and kept), the most "
                f"AETHERCORE_WEBHOOK_MAX_PENDING={limit} allows: retry once some are delivered or expire, or send "
                "the request without a webhook",
                {"pending": pending, "limit": limit},
                retry_after_s=PENDING_RETRY_AFTER_S,
            )

    def batch_webhook(self, owner: str | None, metadata: dict[str, Any] | None) -> str | None:
        """The `webhook` to keep with a new batch (JSON {url, owner}) or None: `metadata.webhook_url`, else the
        owner's default endpoint; checked like a job's. The Lua step that ends the batch makes its delivery due
        (batches/lua/, through batches/store.py); the dispatcher builds its body at the first attempt
        (batches/objects.py `webhook_body`)."""
        url = (metadata or {}).get(BATCH_WEBHOOK_KEY)
        return self.decide(owner, url, f"metadata.{BATCH_WEBHOOK_KEY}")
