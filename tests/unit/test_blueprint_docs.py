"""api/json_provider.py Blueprint: `alt_response` documents a view exactly as flask-smorest's does, and leaves no
call-time wrapper around it."""

from __future__ import annotations

import flask_smorest
import marshmallow as ma
from flask import Flask
from flask.views import MethodView

from api.json_provider import Blueprint


class Body(ma.Schema):
    name = ma.fields.String(required=True)


class Answer(ma.Schema):
    id = ma.fields.String()


def build(blueprint_class: type) -> tuple[Flask, dict]:
    app = Flask(__name__)
    app.config.update(API_TITLE="t", API_VERSION="1", OPENAPI_VERSION="3.0.3")
    api = flask_smorest.Api(app)
    blp = blueprint_class("things", __name__)

    @blp.route("/things")
    class Things(MethodView):
        @blp.arguments(Body)
        @blp.response(202, Answer, description="Queued")
        @blp.alt_response(200, schema=Answer, description="Done")
        @blp.alt_response(404, description="Unknown")
        @blp.alt_response(409, description="Conflict")
        def post(self, body):
            return {"id": body["name"]}

    api.register_blueprint(blp)
    return app, api.spec.to_dict()


def test_the_openapi_document_is_flask_smorests():
    assert build(Blueprint)[1] == build(flask_smorest.Blueprint)[1]
    responses = build(Blueprint)[1]["paths"]["/things"]["post"]["responses"]
    assert set(responses) >= {"200", "202", "404", "409", "422"}


def test_no_wrapper_is_left_to_run_per_request():
    app, _ = build(Blueprint)
    view = app.view_functions["things.Things"].view_class.post
    chain = []
    while view is not None:
        chain.append(view.__code__.co_qualname)  # the function that runs (wraps copies __qualname__)
        view = getattr(view, "__wrapped__", None)
    assert not any("alt_response" in name for name in chain), chain
    assert app.test_client().post("/things", json={"name": "x"}).get_json() == {"id": "x"}
