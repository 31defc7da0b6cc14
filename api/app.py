"""Flask app factory: settings from env (or given), blueprints, errors, metrics, OpenAPI."""

from __future__ import annotations

import json

from flask import Flask, current_app
from flask_smorest import Api

from api.auth import CREDENTIALS, SECURITY_SCHEMES
from api.blueprints import batches, dead_letters, health, jobs, models, oip, openai_compat, serve, webhooks
from api.docs import ASSETS_URL, docs_assets
from api.errors import ErrorSchema, http_exception_response, register_error_handlers
from api.json_provider import OrjsonProvider
from api.metrics import init_metrics
from api.request_id import init_request_id
from api.security import init_security
from api.services import Services
from api.tracing import init_tracing
from batches.stores import open_stores
from config.models import load_models
from config.settings import Settings
from protocols.openapi_inputs import document_inputs
from submission.wiring import connect

VERSION = "0.1.0"


class AetherApi(Api):
    """flask-smorest Api whose errors use AetherCore's one JSON error shape."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error):
        return http_exception_response(error)

    def _openapi_json(self):
        """The document with /serve's bodies per configured model (protocols/openapi_inputs.py), built when served so
        the signatures workers published since start are in it."""
        svc = current_app.extensions["aethercore"]
        document = document_inputs(self.spec.to_dict(), svc.models, svc.signature, svc.settings.max_input_chars)
        return current_app.response_class(json.dumps(document, indent=2, sort_keys=False), mimetype="application/json")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask("aethercore")
    app.json = OrjsonProvider(app, max_depth=settings.max_json_depth)
    app.config.update(
        API_TITLE="AetherCore",
        API_VERSION=VERSION,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL=ASSETS_URL,
        JSON_SORT_KEYS=False,
        # Every operation needs credentials unless it says otherwise (health, metrics, the docs themselves).
        API_SPEC_OPTIONS={"security": CREDENTIALS},
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
    )
    connections = connect(settings)
    redis_client, cluster = connections.redis, connections.cluster
    app.extensions["aethercore"] = svc = Services(
        settings=settings,
        models=load_models(settings.models_file),
        jobs=connections.jobs,
        cluster=cluster,
        celery=connections.celery,
        dispatcher=connections.dispatcher,
    )
    app.extensions["aethercore_metrics"] = init_metrics(app, cluster)
    # The OpenAI Files and Batch APIs: their state in Redis (driven by the batch driver processes, batches/driver.py).
    holdings = svc.holdings
    files, batch_store = open_stores(settings, redis_client, holdings)
    app.extensions["aethercore_batches"] = {
        "files": files,
        "batches": batch_store,
        "holdings": holdings,
    }
    init_request_id(app)
    init_tracing(
        app, settings.trace_caller_sampling
    )  # on when OTEL_EXPORTER_OTLP_*ENDPOINT is set: the request's span, outside the request id's
    init_security(app, settings, redis_client)

    api = AetherApi(app)
    for name, scheme in SECURITY_SCHEMES.items():
        api.spec.components.security_scheme(name, scheme)
    for module in (health, serve, jobs, models, oip, openai_compat, batches, dead_letters, webhooks):
        api.register_blueprint(module.blp)
    app.register_blueprint(docs_assets)
    serve.register_websocket(app)  # WS /serve/stream, with its limits (api/websocket.py)
    register_error_handlers(app)
    return app
