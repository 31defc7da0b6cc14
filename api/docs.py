"""Swagger UI assets served from the installed swagger-ui-bundle package, so /docs works offline."""

from __future__ import annotations

from flask import Blueprint, send_from_directory
from swagger_ui_bundle import swagger_ui_path

ASSETS_URL = "/docs/assets/"

docs_assets = Blueprint("docs_assets", __name__)


@docs_assets.route(f"{ASSETS_URL}<path:filename>")
def asset(filename: str):
    return send_from_directory(swagger_ui_path, filename, max_age=86400)
