"""Submitting a job: the one use case every way in calls (POST /serve, /serve/batch, WS /serve/stream, OIP infer,
OpenAI /v1 sync and streaming, a Batch API line, a dead letter's replay, model load and unload).

`Submitter.submit(SubmitRequest)` (submitter.py) does it in one pass: validate (validation.py) -> route (the model's
spec, desired state, the autoload decision, the device) -> admission (admission.py: the caller's role and lane,
Redis's memory, the queue's depth per lane, the webhook (webhooks.py), the caller's rate limit, counted in the step
that creates the job: ratelimit.py) -> create and queue (dispatch.py, coalescing concurrent submissions) -> an
optional wait (replies.py). A refusal is `Refused` (errors.py), a domain error each protocol turns into its own
shape; nothing here speaks HTTP. A dead letter's replay (replay.py) is a new submission of its owner. An
Idempotency-Key's record, fingerprint and stored answer (idempotency.py) are the store half of api/idempotency.py's
`@idempotent`.

May import: config/, tasks/, access/ (the caller), webhooks/ (a URL checked, an owner held) and third-party
libraries (celery, redis, orjson, limits, loguru). Never api/, flask,
flask_smorest or workers/: the HTTP layer sits above this room and translates into it.
"""
