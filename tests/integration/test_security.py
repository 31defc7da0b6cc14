"""Authentication, roles, ownership, rate limits and hostile input, against the real app and Redis."""

import json
import time

import jwt
import pytest
import requests
import simple_websocket

from access.keys import KeyStore
from api.auth import SECURITY_SCHEMES
from api.security import OPEN_PATHS
from config.roles import ADMIN, ROLES, USER
from tasks.names import AUTH_KEYS, RECENT_JOBS
from tasks.redis_client import make_redis
from tests.conftest import DB_MISC, client_for, settings_for
from tests.support import (
    ADMIN_KEY,
    JWT_SECRET,
    OPERATOR_KEY,
    OTHER_USER_KEY,
    USER_KEY,
    VIEWER_KEY,
    ApiProcess,
    close_quietly,
    ws_connect,
)

TEXT = {"model_id": "minilm", "inputs": {"text": "hello"}}


@pytest.fixture(scope="module")
def as_role(main_redis_url, main_worker):
    settings = settings_for(main_redis_url)
    return lambda key: client_for(settings, key)


def token(role: str, sub: str = "alice", ttl: int = 300, secret: str = JWT_SECRET) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "role": role, "iat": now, "exp": now + ttl}, secret, algorithm="HS256")


def test_missing_or_bad_credentials_are_401_json(as_role):
    anonymous = as_role(None)
    for method, path in (("get", "/models"), ("post", "/serve"), ("get", "/jobs"), ("get", "/workers")):
        response = getattr(anonymous, method)(path, json=TEXT if method == "post" else None)
        assert response.status_code == 401, path
        assert response.get_json()["error"]["code"] == "unauthorized"
        assert "WWW-Authenticate" in response.headers
    assert as_role("not-a-real-key-at-all").get("/models").status_code == 401
    for open_path in ("/heartbeat", "/health", "/health/live", "/health/ready", "/openapi.json", "/docs", "/metrics"):
        assert anonymous.get(open_path).status_code in (200, 503), open_path


def test_x_api_key_header_works(main_redis_url, main_worker):
    client = client_for(settings_for(main_redis_url), None)
    assert client.get("/models", headers={"X-API-Key": VIEWER_KEY}).status_code == 200


@pytest.mark.parametrize(
    "key,method,path,expected",
    [
        (VIEWER_KEY, "get", "/models", 200),
        (VIEWER_KEY, "get", "/models/minilm/status", 200),
        (VIEWER_KEY, "post", "/serve", 403),
        (VIEWER_KEY, "get", "/jobs", 403),
        (VIEWER_KEY, "post", "/models/tiny-mlp/load", 403),
        (USER_KEY, "post", "/models/tiny-mlp/load", 403),
        (USER_KEY, "get", "/models", 200),
        (OPERATOR_KEY, "post", "/serve", 403),
        (OPERATOR_KEY, "post", "/models/tiny-mlp/load?wait=30", 200),
        (OPERATOR_KEY, "get", "/jobs", 200),
        (ADMIN_KEY, "post", "/models/tiny-mlp/load?wait=30", 200),
    ],
)
def test_roles(as_role, key, method, path, expected):
    response = getattr(as_role(key), method)(path, json=TEXT if path == "/serve" else None)
    assert response.status_code == expected, response.get_json()
    if expected == 403:
        assert response.get_json()["error"]["code"] == "forbidden"


def test_users_see_only_their_own_jobs(as_role):
    alice, bob, operator = as_role(USER_KEY), as_role(OTHER_USER_KEY), as_role(OPERATOR_KEY)
    job = alice.post("/serve?wait=60", json=TEXT).get_json()
    assert job["status"] == "succeeded"
    assert alice.get(f"/jobs/{job['job_id']}").status_code == 200
    hidden = bob.get(f"/jobs/{job['job_id']}")
    unknown = bob.get(f"/jobs/{'e' * 32}")
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.get_json()["error"]["code"] == unknown.get_json()["error"]["code"] == "job_not_found"
    assert bob.delete(f"/jobs/{job['job_id']}").status_code == 404
    assert bob.get(f"/jobs/{job['job_id']}/stream").status_code == 404
    assert job["job_id"] not in [j["job_id"] for j in bob.get("/jobs?limit=200").get_json()["jobs"]]
    assert job["job_id"] in [j["job_id"] for j in alice.get("/jobs?limit=200").get_json()["jobs"]]
    assert operator.get(f"/jobs/{job['job_id']}").status_code == 200  # operators read everything


def test_jwt_expired_tampered_and_wrong_role(as_role):
    assert as_role(token("user")).post("/serve?wait=60", json=TEXT).get_json()["status"] == "succeeded"
    assert as_role(token("user", ttl=-10)).get("/models").status_code == 401  # expired
    forged = token("admin", secret="someone-elses-secret-of-32-bytes-or-more")
    assert as_role(forged).get("/models").status_code == 401  # tampered signature
    header, payload, signature = token("viewer").split(".")
    escalated = json.loads(jwt.utils.base64url_decode(payload))
    escalated["role"] = "admin"
    swapped = ".".join([header, jwt.utils.base64url_encode(json.dumps(escalated).encode()).decode(), signature])
    assert as_role(swapped).get("/models").status_code == 401  # edited claims
    assert as_role(token("viewer")).post("/serve", json=TEXT).status_code == 403  # wrong role
    assert as_role(token("superuser")).get("/models").status_code == 401  # unknown role


def test_stored_keys_are_hashed_and_revocable(main_redis_url, main_worker):
    redis_client = make_redis(main_redis_url)
    store = KeyStore(redis_client)
    key_id, key = store.create("user", "test")
    assert key not in json.dumps(redis_client.hgetall(AUTH_KEYS))  # only a digest is stored
    settings = settings_for(main_redis_url)
    assert client_for(settings, key).post("/serve?wait=60", json=TEXT).get_json()["status"] == "succeeded"
    assert store.revoke(key_id)
    assert client_for(settings, key).get("/models").status_code == 401  # a fresh process: no cache


def test_rate_limit_answers_429_with_retry_after(main_redis_url, main_worker):
    limited = client_for(settings_for(main_redis_url, rate_limit="5/minute"), VIEWER_KEY)
    codes = [limited.get("/models").status_code for _ in range(6)]
    assert codes[:5] == [200] * 5 and codes[5] == 429
    response = limited.get("/models")
    assert response.get_json()["error"]["code"] == "too_many_requests"
    assert int(response.headers["Retry-After"]) > 0
    assert limited.get("/health").status_code == 200  # probes are never limited


def test_hostile_input(main_redis_url, main_worker):
    client = client_for(settings_for(main_redis_url, max_request_bytes=2048, max_input_chars=100))
    too_big = client.post(
        "/serve", data=json.dumps({**TEXT, "inputs": {"text": "x" * 5000}}), content_type="application/json"
    )
    assert too_big.status_code == 413 and too_big.get_json()["error"]["code"] == "payload_too_large"
    form = client.post("/serve", data="model_id=minilm", content_type="application/x-www-form-urlencoded")
    assert form.status_code == 415 and form.get_json()["error"]["code"] == "unsupported_media_type"
    assert client.post("/serve", data="{not json", content_type="application/json").status_code == 400
    long_text = client.post("/serve", json={**TEXT, "inputs": {"text": "y" * 101}})
    assert long_text.status_code == 422 and "100" in json.dumps(long_text.get_json())
    nan = client.post(
        "/serve",
        data='{"model_id": "minilm", "inputs": {"text": "x"}, "parameters": {"max_length": NaN}}',
        content_type="application/json",
    )
    assert nan.status_code == 400  # NaN is not JSON (RFC 8259): the one body parser refuses it (api/json_provider.py)
    for bad_id in ("../../etc/passwd", "a" * 200, "job:*"):
        assert client.get(f"/jobs/{bad_id}").status_code == 404
        assert client.get(f"/models/{bad_id}/status").status_code == 404
    assert client.post("/serve", json={**TEXT, "timeout": -1}).status_code == 422
    assert client.post("/serve", json={**TEXT, "model_id": "x" * 65}).status_code == 422


def test_backpressure_when_a_queue_is_full(redis_server):
    # No worker consumes this database, so queued jobs pile up.
    client = client_for(settings_for(redis_server.url(DB_MISC + 2), max_queue_depth=3))
    codes = [client.post("/serve", json=TEXT).status_code for _ in range(4)]
    assert codes == [202, 202, 202, 429]
    response = client.post("/serve", json=TEXT)
    assert response.get_json()["error"]["code"] == "queue_full" and response.headers["Retry-After"]


@pytest.fixture(scope="module")
def secured_api(main_redis_url, main_worker):
    api = ApiProcess(main_redis_url, name="api-auth", AETHERCORE_AUTH="true").start()
    yield api
    api.stop()


def test_streams_enforce_the_same_rules(secured_api):
    ws_url = secured_api.base.replace("http://", "ws://") + "/serve/stream"
    # The handshake is refused with 401 (seen at the HTTP level; simple_websocket then raises ConnectionError, or
    # OSError when the server's close wins the race with its reader thread).
    handshake = requests.get(
        f"{secured_api.base}/serve/stream",
        timeout=10,
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert handshake.status_code == 401
    with pytest.raises((simple_websocket.ConnectionError, OSError)):
        ws_connect(ws_url)
    viewer = ws_connect(ws_url, headers={"Authorization": f"Bearer {VIEWER_KEY}"})
    try:
        message = json.loads(viewer.receive(timeout=30))
        assert message["type"] == "error" and message["error"]["code"] == "forbidden"
    finally:
        close_quietly(viewer)
    user = ws_connect(ws_url, headers={"Authorization": f"Bearer {USER_KEY}"})
    try:
        user.send(json.dumps({"model_id": "tiny-gpt2", "inputs": {"text": "hi"}, "parameters": {"max_length": 4}}))
        job_id = json.loads(user.receive(timeout=30))["job_id"]
        while json.loads(user.receive(timeout=60))["type"] == "chunk":
            pass
    finally:
        close_quietly(user)
    sse = f"{secured_api.base}/jobs/{job_id}/stream"
    assert requests.get(sse, timeout=10).status_code == 401
    assert requests.get(sse, timeout=10, headers={"X-API-Key": OTHER_USER_KEY}).status_code == 404
    with requests.get(sse, timeout=30, stream=True, headers={"X-API-Key": USER_KEY}) as response:
        assert response.status_code == 200


def test_inference_rate_limit_is_counted_with_the_job_and_refuses_without_creating_one(main_redis_url, main_worker):
    import redis as redis_lib

    limited = client_for(settings_for(main_redis_url, rate_limit="3/minute"), OTHER_USER_KEY)
    body = {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}}
    before = redis_lib.Redis.from_url(main_redis_url).zcard(RECENT_JOBS)
    answers = [limited.post("/serve", json=body) for _ in range(4)]
    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    assert [a.headers.get("X-RateLimit-Remaining") for a in answers[:3]] == ["2", "1", "0"]
    refused = answers[3]
    assert refused.get_json()["error"]["code"] == "too_many_requests" and int(refused.headers["Retry-After"]) > 0
    after = redis_lib.Redis.from_url(main_redis_url).zcard(RECENT_JOBS)
    assert after - before == 3  # the refused request created no job


def test_the_people_who_run_the_service_are_not_limited_per_caller(main_redis_url, main_worker):
    """A tenant's limit must not throttle the operators' load generators and dashboards (the same rule as the
    per-caller stream cap): past a user's limit, an admin's or operator's submissions and reads still pass."""
    settings = settings_for(main_redis_url, rate_limit="4/minute")  # a limit (counter) no other test uses
    redis = make_redis(main_redis_url)
    for pattern in ("*:ratelimit:*:4/60", "LIMITER*/4/1/minute"):  # a rerun within the minute starts afresh
        for counter in redis.scan_iter(pattern):
            redis.delete(counter)
    body = {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}}
    user = client_for(settings, USER_KEY)
    assert [user.post("/serve", json=body).status_code for _ in range(5)] == [202] * 4 + [429]
    assert [user.get("/models").status_code for _ in range(5)] == [200] * 4 + [429]
    admin = client_for(settings, ADMIN_KEY)
    served = [admin.post("/serve", json=body) for _ in range(6)]
    assert [a.status_code for a in served] == [202] * 6
    assert all("X-RateLimit-Remaining" not in a.headers for a in served)
    for key in (ADMIN_KEY, OPERATOR_KEY):  # an operator may not serve (403), but reads everything
        assert [client_for(settings, key).get("/models").status_code for _ in range(6)] == [200] * 6, key


def test_the_openapi_document_declares_the_credentials_and_the_role_of_every_operation(client):
    """Swagger UI's Authorize button and generated clients work from this: each operation either needs no
    credentials (probes, metrics) or names the schemes it takes and the roles allowed."""
    spec = client.get("/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": SECURITY_SCHEMES["bearerAuth"]["description"],
    }
    assert spec["components"]["securitySchemes"]["apiKeyHeader"]["name"] == "X-API-Key"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":  # the path's own parameters, not an operation
                continue
            if path in (*OPEN_PATHS, "/metrics"):  # /metrics: open unless AETHERCORE_METRICS_AUTH
                assert operation["security"] == [], (method, path)
                continue
            assert operation["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}], (method, path)
            assert set(operation["x-required-roles"]) <= set(ROLES), (method, path)
            assert {"401", "403"} <= set(operation["responses"]), (method, path)
    assert spec["paths"]["/serve"]["post"]["x-required-roles"] == [ADMIN, USER]
    # What the document says is what the API does: a viewer may read models but not serve.
    viewer = client_for(settings_for(client.application.extensions["aethercore"].settings.redis_url), VIEWER_KEY)
    assert viewer.get("/models").status_code == 200
    assert viewer.post("/serve", json={"model_id": "minilm", "inputs": {"text": "x"}}).status_code == 403
