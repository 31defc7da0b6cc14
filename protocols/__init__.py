"""The protocols' codecs below the HTTP layer: what a protocol's body means and how an answer or an error is
written in its shape, without HTTP (no request, no response, no app): OpenAI's /v1 bodies and their translation
(openai.py), the refusal every codec speaks (errors.py), the bounded JSON parser (json.py), a request's webhook
field (webhook.py), the Open Inference Protocol's tensor codec, JSON and binary (oip.py), and its OpenAPI schemas
(oip_schemas.py); the native API's schemas (schemas.py) and /serve's bodies per model in the OpenAPI document
(openapi_inputs.py). The HTTP layer (api/: blueprints, error handlers) and the processes beside it (batches/: the
batch driver runs a /v1 body per line) import these.

May import config/, tasks/, submission/ (its checks and `Refused`), webhooks/ (the URL rules of outbound.py),
marshmallow and numpy; never api, flask, flask_smorest or workers. What openai.py's translation looks up (the
models, the settings' bounds) it is handed as a `Catalog`.
"""
