"""The hot routes' hand-checked arguments (api/fast_args.py) and the job projection (tasks/jobs/public.py)
against marshmallow, the reference: whatever the fast path accepts, the schema loads to the same value, and
the projection equals JobSchema's dump."""

from __future__ import annotations

import marshmallow as ma
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from api.fast_args import load_batch, load_serve, load_wait, loader_for
from protocols.schemas import BatchRequestSchema, JobSchema, ServeRequestSchema, UnloadQuerySchema, WaitQuerySchema
from tasks.jobs.public import public_job

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["float", "base64", "minilm", "sim-h100", "30", "1e3", "", "bad id!"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
field_values = {
    "model_id": st.one_of(st.sampled_from(["minilm", "sim-h100", "a" * 64, "a" * 65, "-x", "x\n"]), json_values),
    "inputs": st.one_of(st.just({"text": "hi"}), st.lists(st.just({"text": "x"}), max_size=3), json_values),
    "parameters": st.one_of(st.just({}), st.just({"max_length": 5}), json_values),
    "result_ttl": st.one_of(st.sampled_from([0, 1, 60, 604800, 604801, True, 5.0, "60"]), json_values),
    "timeout": st.one_of(st.sampled_from([0, 0.0005, 0.001, 1, 2.5, 86400, 86400.5, False, "3"]), json_values),
    "encoding_format": st.one_of(st.sampled_from(["float", "base64", "b64", None, 1]), json_values),
    "priority": st.one_of(st.sampled_from(["high", "normal", "low", "urgent", None, 0]), json_values),
    "stray": json_values,
}
bodies = st.one_of(
    st.fixed_dictionaries({}, optional=field_values),
    st.fixed_dictionaries(
        {"model_id": st.just("minilm"), "inputs": st.just({"text": "x"})},
        optional={k: v for k, v in field_values.items() if k not in ("model_id", "inputs")},
    ),
    json_values,
)


def schema_load(schema: ma.Schema, data):
    try:
        return schema.load(data)
    except ma.ValidationError:
        return "invalid"


@settings(max_examples=600, deadline=None)
@given(bodies)
def test_serve_fast_path_agrees_with_the_schema(body):
    loaded = load_serve(body)
    if loaded is not None:
        assert schema_load(ServeRequestSchema(), body) == loaded


@settings(max_examples=600, deadline=None)
@given(bodies)
def test_batch_fast_path_agrees_with_the_schema(body):
    loaded = load_batch(body)
    if loaded is not None:
        assert schema_load(BatchRequestSchema(), body) == loaded


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["0", "30", "3600", "3600.5", "1.5", "1e2", "-1", "nan", " 5", "x", "0.0000001"])))
def test_wait_fast_path_agrees_with_the_schema(values):
    args = MultiDict([("wait", v) for v in values] + [("other", "1")])
    loaded = load_wait(args)
    if loaded is not None:
        # webargs hands the schema the first value of a repeated non-list query field
        assert schema_load(WaitQuerySchema(), {"wait": values[0]} if values else {}) == loaded


def test_the_common_shapes_take_the_fast_path():
    # The point of the module: the bodies clients send do not reach marshmallow.
    assert load_serve({"model_id": "minilm", "inputs": {"text": "hi"}}) == {
        "model_id": "minilm",
        "inputs": {"text": "hi"},
        "parameters": {},
        "encoding_format": "float",
        "priority": "normal",
    }
    assert load_serve({"model_id": "m", "inputs": {}, "timeout": 5, "result_ttl": 60, "parameters": {"a": 1}})
    assert load_batch({"model_id": "m", "inputs": [{"text": "a"}, {"text": "b"}]})
    assert load_wait(MultiDict([("wait", "30")])) == {"wait": 30.0}
    assert load_wait(MultiDict()) == {"wait": 0.0}


@pytest.mark.parametrize(
    "body",
    [
        {"model_id": "m", "inputs": {}, "extra": 1},  # unknown key: the schema names it
        {"model_id": "m", "inputs": {}, "result_ttl": "60"},  # a string the schema coerces
        {"model_id": "m", "inputs": {}, "result_ttl": True},
        {"model_id": "m", "inputs": {}, "timeout": 0},
        {"model_id": "m"},
        {"model_id": "bad id", "inputs": {}},
        [],
    ],
)
def test_anything_else_is_left_to_the_schema(body):
    assert load_serve(body) is None


def test_loaders_are_chosen_by_exact_schema_and_location():
    assert loader_for(ServeRequestSchema, "json") is load_serve
    assert loader_for(ServeRequestSchema(), None) is load_serve
    assert loader_for(WaitQuerySchema, "query") is load_wait
    assert loader_for(UnloadQuerySchema, "query") is None  # a subclass has fields the loader does not know
    assert loader_for(ServeRequestSchema, "query") is None


jobs = st.fixed_dictionaries(
    {
        "job_id": st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
        "status": st.sampled_from(["queued", "running", "succeeded", "failed"]),
    },
    optional={
        "kind": st.sampled_from(["inference", "load", "unload"]),
        "model_id": st.text(max_size=8),
        "device": st.none() | st.just("cpu"),
        "worker": st.none() | st.text(max_size=8),
        "attempts": st.integers(0, 5),
        "request_id": st.none() | st.text(max_size=8),
        "owner": st.none() | st.text(max_size=8),
        "chunks": st.integers(0, 5),
        "created_at": st.none() | st.just("2026-12-01T00:00:00.000Z"),
        "started_at": st.none() | st.just("2026-12-01T00:00:00.000Z"),
        "finished_at": st.none() | st.just("2026-12-01T00:00:00.000Z"),
        "result": st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3),
        "error": st.none()
        | st.fixed_dictionaries(
            {"code": st.just("internal_error"), "message": st.text(max_size=8)}, optional={"x": st.just(1)}
        ),
        "_created_ts": st.floats(allow_nan=False),
        "notify": st.text(max_size=5),
    },
)


@settings(max_examples=300, deadline=None)
@given(jobs)
def test_the_job_projection_is_the_schemas_dump(job):
    assert public_job(job) == JobSchema().dump(job)


def test_the_public_projection_names_exactly_the_documented_fields():
    from protocols.schemas import JobErrorSchema
    from tasks.jobs.public import ERROR_FIELDS, JOB_FIELDS

    assert JOB_FIELDS == tuple(JobSchema._declared_fields)
    assert ERROR_FIELDS == tuple(JobErrorSchema._declared_fields)
