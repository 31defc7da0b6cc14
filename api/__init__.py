"""The thin HTTP API: validates requests, queues jobs, reads results. Never imports torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from config.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    # Imported on call, not with the package: `manage.py api` must set up prometheus-client's
    # multiprocess directory before anything imports prometheus_client (api/server.py).
    from api.app import create_app as _create_app

    return _create_app(settings)


__all__ = ["create_app"]
