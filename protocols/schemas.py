"""The native API's request and response schemas (/serve, /serve/batch, /jobs, /models, /health): validation and the
OpenAPI document come from the same code. Below HTTP: the blueprints and api/fast_args.py use them.

May import config/, tasks/, protocols/ and marshmallow; never api or flask."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import validate

from config.lanes import LANES
from config.models import MODEL_ID_RE
from protocols.webhook import WebhookSchema
from tasks.names import DEFAULT_LANE
from tasks.states import JOB_KINDS, MODEL_STATES, STATUSES

JOB_ID_RE = r"^[0-9a-f]{32}$"
# Bounds shared with the hot routes' hand-checked arguments (api/fast_args.py).
RESULT_TTL_MAX = 7 * 86400
TIMEOUT_MIN, TIMEOUT_MAX = 0.001, 86400
WAIT_MAX = 3600
ENCODINGS = ("float", "base64")


class _InferenceRequest(ma.Schema):
    """What every inference body carries besides its inputs and parameters."""

    model_id = ma.fields.String(
        required=True, validate=validate.Regexp(MODEL_ID_RE.pattern), metadata={"example": "minilm"}
    )
    result_ttl = ma.fields.Integer(
        validate=validate.Range(min=1, max=RESULT_TTL_MAX),
        metadata={
            "description": "Seconds this job and its result are kept after it ends (default AETHERCORE_RESULT_TTL)"
        },
    )
    timeout = ma.fields.Float(
        validate=validate.Range(min=TIMEOUT_MIN, max=TIMEOUT_MAX),
        metadata={"description": "Seconds the job may wait in the queue; not started by then, it ends `expired`"},
    )
    priority = ma.fields.String(
        load_default=DEFAULT_LANE,
        validate=validate.OneOf(LANES),
        metadata={
            "description": "Priority lane: workers always start the highest waiting lane's work first (`high`, "
            "`normal`, `low`); a waiting lower lane moves up after AETHERCORE_LANE_AGING_S, so it is never starved "
            "for longer. A role may be limited to some lanes (AETHERCORE_PRIORITY_LANES: 403)."
        },
    )
    encoding_format = ma.fields.String(
        load_default="float",
        validate=validate.OneOf(ENCODINGS),
        metadata={
            "description": "How embeddings are returned: JSON numbers (`float`) or `base64` of their "
            "little-endian float32 bytes (a quarter of the size, and exact)"
        },
    )
    webhook = ma.fields.Nested(
        WebhookSchema,
        metadata={"description": "POST the job's end here (default: the caller's endpoint, `manage.py auth webhook`)"},
    )


class ServeRequestSchema(_InferenceRequest):
    inputs = ma.fields.Dict(required=True, metadata={"example": {"text": "Hello world"}})
    parameters = ma.fields.Dict(load_default=dict, metadata={"example": {"max_length": 100}})


class BatchRequestSchema(_InferenceRequest):
    inputs = ma.fields.List(
        ma.fields.Dict(),
        required=True,
        validate=validate.Length(min=1),
        metadata={"example": [{"text": "first"}, {"text": "second"}]},
    )
    parameters = ma.fields.Dict(load_default=dict, metadata={"example": {"max_length": 128}})


class WaitQuerySchema(ma.Schema):
    wait = ma.fields.Float(
        load_default=0.0,
        validate=validate.Range(min=0, max=WAIT_MAX),
        metadata={"description": "Seconds to wait for the job to finish (capped by AETHERCORE_MAX_WAIT)"},
    )


class UnloadQuerySchema(WaitQuerySchema):
    force = ma.fields.Boolean(
        load_default=False,
        metadata={
            "description": "End the model's running jobs at once (`model_unloaded`) instead of letting them finish "
            "for AETHERCORE_UNLOAD_DRAIN seconds"
        },
    )


class JobErrorSchema(ma.Schema):
    code = ma.fields.String()
    message = ma.fields.String()


class JobSchema(ma.Schema):
    job_id = ma.fields.String(required=True)
    kind = ma.fields.String(validate=validate.OneOf(JOB_KINDS))
    model_id = ma.fields.String()
    status = ma.fields.String(validate=validate.OneOf(STATUSES))
    device = ma.fields.String(allow_none=True)
    worker = ma.fields.String(allow_none=True)
    attempts = ma.fields.Integer()
    request_id = ma.fields.String(allow_none=True)
    trace_id = ma.fields.String(
        metadata={
            "description": "The W3C trace id of the job's trace (its submitting request's, or the one the caller's "
            "traceparent named); absent when the job has none (tracing off and no traceparent sent)"
        }
    )
    owner = ma.fields.String(allow_none=True, metadata={"description": "Who submitted it (API key id or JWT subject)"})
    chunks = ma.fields.Integer(metadata={"description": "Chunks streamed so far"})
    created_at = ma.fields.String(allow_none=True)
    started_at = ma.fields.String(allow_none=True)
    finished_at = ma.fields.String(allow_none=True)
    result = ma.fields.Dict(allow_none=True)
    error = ma.fields.Nested(JobErrorSchema, allow_none=True)
    replay_of = ma.fields.String(
        metadata={"description": "The dead letter this job replays (`manage.py jobs replay`); absent otherwise"}
    )


class ReplicaSchema(ma.Schema):
    class Meta:
        unknown = ma.INCLUDE

    worker = ma.fields.String()
    device = ma.fields.String()
    state = ma.fields.String()
    memory_bytes = ma.fields.Integer()
    loaded_at = ma.fields.Float()


class ModelStatusSchema(ma.Schema):
    model_id = ma.fields.String()
    state = ma.fields.String(validate=validate.OneOf(MODEL_STATES))
    device = ma.fields.String(allow_none=True)
    replicas = ma.fields.List(ma.fields.Dict())
    error = ma.fields.Dict(allow_none=True)


class ModelSummarySchema(ModelStatusSchema):
    name = ma.fields.String()
    model_type = ma.fields.String()
    task = ma.fields.String()
    source = ma.fields.String()
    configured_device = ma.fields.String()
    autoload = ma.fields.Boolean(
        metadata={"description": "A `user`'s request loads it when it is not loaded (admins and operators: any model)"}
    )


class ModelListSchema(ma.Schema):
    models = ma.fields.List(ma.fields.Nested(ModelSummarySchema))


class ModelInfoSchema(ma.Schema):
    model_id = ma.fields.String()
    config = ma.fields.Dict()
    state = ma.fields.String()
    signature = ma.fields.Dict(
        allow_none=True,
        metadata={
            "description": "Inputs and outputs ({name, datatype, shape}; -1: any size), loaded or not, and where "
            "they come from: models.yaml, the artifact, or the task; null while nothing says yet"
        },
    )
    loaded = ma.fields.Dict(allow_none=True, metadata={"description": "What the loaded model reports"})


class HealthSchema(ma.Schema):
    status = ma.fields.String()
    checks = ma.fields.Dict()


class WorkerSchema(ma.Schema):
    name = ma.fields.String()
    device = ma.fields.String()
    queue = ma.fields.String()
    hostname = ma.fields.String()
    pid = ma.fields.Integer()
    started_at = ma.fields.Float()
    heartbeat_age_s = ma.fields.Float()
    concurrency = ma.fields.Integer(allow_none=True)
    memory = ma.fields.Dict()
    models = ma.fields.Dict()


class WorkersSchema(ma.Schema):
    workers = ma.fields.List(ma.fields.Nested(WorkerSchema))


class JobListQuerySchema(ma.Schema):
    limit = ma.fields.Integer(load_default=50, validate=validate.Range(min=1, max=1000))
    status = ma.fields.String(validate=validate.OneOf(STATUSES))
    model_id = ma.fields.String(validate=validate.Regexp(MODEL_ID_RE.pattern))
    kind = ma.fields.String(validate=validate.OneOf(JOB_KINDS))


class JobListSchema(ma.Schema):
    jobs = ma.fields.List(ma.fields.Nested(JobSchema))
