"""Property-based fuzzing of the whole HTTP API from its own OpenAPI document (schemathesis):
no request, however odd, gets a 5xx, and every response matches what /openapi.json documents."""

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.conftest import settings_for
from tests.support import ADMIN_KEY

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
READINESS = (
    "/health/ready",
    "/v2/health/ready",
    "/health",
    "/v2/models/{model_name}/ready",
    "/v2/models/{model_name}/versions/{model_version}/ready",
)


def _has_empty_list(body) -> bool:
    return isinstance(body, dict) and any(value == [] for value in body.values())


def test_api_conforms_to_its_schema(main_redis_url, main_worker):
    from api import create_app

    # Short waits keep fuzzed ?wait values from stalling the run; everything else is as deployed.
    app = create_app(settings_for(main_redis_url, max_wait=0.2))
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    failures: dict[str, str] = {}
    calls = {"n": 0, "statuses": set()}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)  # valid requests, then hostile ones
    for operation, mode in [(op, mode) for op in operations for mode in modes]:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            calls["n"] += 1
            # 503 is a readiness probe's documented "not ready" (a fuzzed load of a model whose files are not here
            # leaves it meant to be loaded and absent), not a server error; its body is still validated.
            probe = case.path in READINESS
            # A multipart field generated as an empty list is sent as no part at all: the request on the wire is a
            # valid one (the field's default), which the API rightly accepts. Not a hostile request; skip it.
            assume(not (case.media_type == "multipart/form-data" and _has_empty_list(case.body)))
            if case.meta.generation.mode.is_positive and "Idempotency-Key" in (case.headers or {}):
                # A fuzzer sends unrelated bodies under the few keys it generates: each would be a reused key (422,
                # as it should). Fresh keys here; what a key does is tested in test_idempotency.py.
                case.headers["Idempotency-Key"] = uuid.uuid4().hex
            response = case.call_and_validate(headers=AUTH, excluded_checks=[not_a_server_error] if probe else [])
            if not (probe and response.status_code == 503):
                calls["statuses"].add(response.status_code)

        try:
            fuzz()
        except Unsatisfiable:
            pass  # nothing in this operation can be made invalid (no parameters, no body)
        except Exception as exc:  # collect every operation's first failure, then report them all
            failures[f"{operation.label} ({mode.value})"] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    assert calls["n"] >= 20 * len(operations)  # the fuzzing really ran, both ways
    assert {200, 404, 422} <= calls["statuses"] and not any(s >= 500 for s in calls["statuses"])
