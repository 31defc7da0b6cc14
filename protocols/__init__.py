"""The protocols' codecs below the HTTP layer: what a protocol's body means and how an answer or an error is
written in its shape, without HTTP (no request, no response, no app). The HTTP layer (api/: blueprints, error
handlers) and the processes beside it (batches/: the batch driver runs a /v1 body per line; webhooks/: a job's
public JSON in a delivery) import these. May import config/, tasks/ and marshmallow; never api, flask,
flask_smorest or workers.
"""
