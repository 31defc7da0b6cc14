"""The thin HTTP API: validates requests, queues jobs, reads results. Never imports torch."""

from __future__ import annotations

from api.app import create_app

__all__ = ["create_app"]
