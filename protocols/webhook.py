"""A request's completion webhook as every protocol's body carries it (/serve, /v1; docs: README "Completion
webhooks"): the schema that checks it and documents it in the OpenAPI document."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import validate

from webhooks.outbound import MAX_URL_CHARS, URL_PATTERN


class WebhookSchema(ma.Schema):
    """A request's completion webhook (docs: README "Completion webhooks")."""

    class Meta:
        unknown = ma.RAISE

    url = ma.fields.String(
        required=True,
        validate=[validate.Length(min=1, max=MAX_URL_CHARS), validate.Regexp(URL_PATTERN)],
        metadata={
            "description": "Where the job's end is POSTed, signed per Standard Webhooks with the caller's secret: "
            "https (http only to hosts AETHERCORE_WEBHOOK_ALLOW names), never a private or loopback address "
            "unless allowed there",
            "example": "https://example.com/hooks/aethercore",
        },
    )
