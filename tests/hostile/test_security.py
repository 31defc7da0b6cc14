"""Issue 19, cases 6 and 9, attacked as an ordinary `user` (or an anonymous caller) against the suite's real API
and worker: a user cannot load (nor so evict) a model that is not declared `autoload: true`; failed
authentication is counted and limited without slowing anyone else; a model process inherits no secret."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
from requests.adapters import HTTPAdapter

from tests.hostile.conftest import assert_still_serving, auth, ensure_loaded
from tests.support import (
    ADMIN_KEY,
    JWT_SECRET,
    OPERATOR_KEY,
    OTHER_USER_KEY,
    USER_KEY,
    VIEWER_KEY,
    ApiProcess,
    wait_until,
)

# Declared in config/models.yaml: tiny-classifier without `autoload` (admins and operators load it), tiny-mlp
# with `autoload: true` (anyone who may serve loads it by using it).
MANAGED_MODEL = "tiny-classifier"
AUTOLOAD_MODEL = "tiny-mlp"


def unload(api: ApiProcess, model_id: str) -> None:
    response = requests.post(f"{api.base}/models/{model_id}/unload?wait=60", headers=auth(ADMIN_KEY), timeout=70)
    assert response.status_code in (200, 202), response.text


def status(api: ApiProcess, model_id: str) -> dict[str, Any]:
    return requests.get(f"{api.base}/models/{model_id}/status", headers=auth(ADMIN_KEY), timeout=10).json()


def resident(client: redis.Redis) -> dict[str, set[str]]:
    """What each live worker holds, from its heartbeat record."""
    from tasks.cluster import ClusterState

    return {w["name"]: set(w.get("models", {})) for w in ClusterState(client, 10).live_workers()}


def serve(api: ApiProcess, key: str, model_id: str, wait: float = 0) -> requests.Response:
    body = {"model_id": model_id, "inputs": {"text": "a hostile user's text"}}
    if model_id == AUTOLOAD_MODEL:
        body = {"model_id": model_id, "inputs": {"features": [[1.0, 2.0, 3.0, 4.0]]}}
    return requests.post(f"{api.base}/serve?wait={wait}", headers=auth(key), json=body, timeout=wait + 30)


# -- case 6: autoload -----------------------------------------------------------------------------------------
def test_a_user_cannot_load_a_model_that_is_not_declared_autoload(hostile_api, hostile_redis):
    ensure_loaded(hostile_api)  # another caller's model, which a load would be allowed to evict
    unload(hostile_api, MANAGED_MODEL)
    before = resident(hostile_redis)
    assert before and all(MANAGED_MODEL not in models for models in before.values())

    refused = serve(hostile_api, USER_KEY, MANAGED_MODEL)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "model_not_loaded" and f"/models/{MANAGED_MODEL}/load" in error["message"]
    # every protocol answers the same, in its own error shape
    oip = requests.post(
        f"{hostile_api.base}/v2/models/{MANAGED_MODEL}/infer",
        headers=auth(USER_KEY),
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]},
        timeout=30,
    )
    assert oip.status_code == 409 and isinstance(oip.json()["error"], str), oip.text
    ready = requests.get(f"{hostile_api.base}/v2/models/{MANAGED_MODEL}/ready", headers=auth(USER_KEY), timeout=10)
    assert ready.status_code != 200, "a model a user cannot load is not ready for that user"
    batch = requests.post(
        f"{hostile_api.base}/serve/batch",
        headers=auth(OTHER_USER_KEY),
        json={"model_id": MANAGED_MODEL, "inputs": [{"text": "a"}, {"text": "b"}]},
        timeout=30,
    )
    assert batch.status_code == 409, batch.text

    time.sleep(2.5)  # two heartbeats: a load, had one started, would show
    assert status(hostile_api, MANAGED_MODEL)["state"] == "unloaded"
    assert resident(hostile_redis) == before, "nothing loaded, nothing evicted"
    assert_still_serving(hostile_api, hostile_redis)


@pytest.mark.parametrize("key", [ADMIN_KEY])
def test_a_model_manager_still_autoloads_by_serving(hostile_api, hostile_redis, key):
    unload(hostile_api, MANAGED_MODEL)
    try:
        served = serve(hostile_api, key, MANAGED_MODEL, wait=120)
        assert served.status_code == 200, served.text
        assert served.json()["status"] == "succeeded"
        assert status(hostile_api, MANAGED_MODEL)["state"] == "loaded"
        # once loaded (by someone allowed to), every user serves it
        assert serve(hostile_api, USER_KEY, MANAGED_MODEL, wait=60).status_code == 200
    finally:
        unload(hostile_api, MANAGED_MODEL)
    assert_still_serving(hostile_api, hostile_redis)


def test_a_model_declared_autoload_loads_for_a_user(hostile_api, hostile_redis):
    info = requests.get(f"{hostile_api.base}/models/{AUTOLOAD_MODEL}/info", headers=auth(USER_KEY), timeout=10)
    assert info.json()["config"]["autoload"] is True
    listed = requests.get(f"{hostile_api.base}/models", headers=auth(USER_KEY), timeout=10).json()["models"]
    assert {m["model_id"]: m["autoload"] for m in listed}[AUTOLOAD_MODEL] is True
    unload(hostile_api, AUTOLOAD_MODEL)
    try:
        served = serve(hostile_api, USER_KEY, AUTOLOAD_MODEL, wait=120)
        assert served.status_code == 200, served.text
        assert served.json()["status"] == "succeeded"
    finally:
        unload(hostile_api, AUTOLOAD_MODEL)
    assert_still_serving(hostile_api, hostile_redis)


@pytest.fixture()
def recorded_jobs(hostile_redis_url, hostile_worker) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """An in-process API on the suite's database whose published inference jobs are recorded (and published)."""
    from api import create_app
    from tests.conftest import settings_for

    app = create_app(settings_for(hostile_redis_url, auth=True))
    svc = app.extensions["aethercore"]
    published: list[dict[str, Any]] = []
    original = svc.dispatcher.publish

    def record(model_id: str, device: str, work: dict[str, Any], **kwargs: Any) -> Any:
        published.append({"model_id": model_id, **work})
        return original(model_id, device, work, **kwargs)

    svc.dispatcher.publish = record
    yield app, published


def test_every_inference_job_says_whether_its_caller_may_load_the_model(recorded_jobs, hostile_api, hostile_redis):
    app, published = recorded_jobs
    ensure_loaded(hostile_api, MANAGED_MODEL)
    try:
        for key, model_id, expected in (
            (USER_KEY, MANAGED_MODEL, False),  # loaded now, but this user could not have loaded it
            (USER_KEY, AUTOLOAD_MODEL, True),  # declared autoload
            (ADMIN_KEY, MANAGED_MODEL, True),  # admins (and operators) manage models
        ):
            client = app.test_client()
            body = {"model_id": model_id, "inputs": {"text": "x"}}
            if model_id == AUTOLOAD_MODEL:
                body = {"model_id": model_id, "inputs": {"features": [[1.0, 2.0, 3.0, 4.0]]}}
            response = client.post("/serve?wait=60", json=body, headers=auth(key))
            assert response.status_code == 200, response.get_json()
            assert published[-1]["model_id"] == model_id and published[-1]["autoload"] is expected, published[-1]
    finally:
        unload(hostile_api, MANAGED_MODEL)
        unload(hostile_api, AUTOLOAD_MODEL)
    assert_still_serving(hostile_api, hostile_redis)


# -- case 9: failed authentication is limited -----------------------------------------------------------------
class SourceAddress(HTTPAdapter):
    """Connect from another loopback address: a second client machine, as far as the API can tell."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(address: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", SourceAddress(address))
    return session


LIMIT, WINDOW = 5, 60


@pytest.fixture(scope="module")
def limited_api(hostile_redis_url, hostile_worker) -> Iterator[ApiProcess]:
    """The suite's cluster behind an API process with a low limit of failed authentications."""
    server = ApiProcess(
        hostile_redis_url,
        name="hostile-api-auth-limit",
        AETHERCORE_AUTH="true",
        AETHERCORE_WORKERS="1",
        AETHERCORE_AUTH_FAILURE_LIMIT=str(LIMIT),
        AETHERCORE_AUTH_FAILURE_WINDOW=str(WINDOW),
    ).start()
    yield server
    server.stop()


def test_a_flood_of_bad_credentials_is_refused_with_429_and_others_are_still_served(
    limited_api, hostile_api, hostile_redis
):
    attacker = session_from("127.0.0.2")
    answers = [
        attacker.get(f"{limited_api.base}/models", headers=auth(f"guess-{i:04d}-0123456789abcdef"), timeout=10)
        for i in range(LIMIT + 5)
    ]
    codes = [a.status_code for a in answers]
    assert codes[:LIMIT] == [401] * LIMIT and set(codes[LIMIT + 1 :]) == {429}, codes
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "too_many_failed_authentications"
    assert 0 < int(refused.headers["Retry-After"]) <= WINDOW
    assert "AETHERCORE_AUTH_FAILURE_LIMIT" in refused.json()["error"]["message"]
    # the blocked address may not try a valid key either (that would tell it which guess was right)
    assert attacker.get(f"{limited_api.base}/models", headers=auth(USER_KEY), timeout=10).status_code == 429
    # probes stay open to everyone
    assert attacker.get(f"{limited_api.base}/health/live", timeout=10).status_code == 200

    # another address, with valid credentials, is served at once: nothing of the flood slows it
    started = time.monotonic()
    for key in (USER_KEY, OTHER_USER_KEY, VIEWER_KEY, OPERATOR_KEY):
        assert requests.get(f"{limited_api.base}/models", headers=auth(key), timeout=10).status_code == 200
    assert time.monotonic() - started < 2.0
    served = serve(limited_api, OTHER_USER_KEY, "tiny-gpt2", wait=60)
    assert served.status_code in (200, 409), served.text  # 409 only if the victim model was evicted meanwhile

    assert_still_serving(hostile_api, hostile_redis)


def test_guesses_at_one_key_from_many_addresses_are_limited_per_key(limited_api, hostile_api, hostile_redis):
    from access.keys import KeyStore

    store = KeyStore(hostile_redis)
    key_id, key = store.create("user", "guessed at")
    try:
        codes = []
        for i in range(LIMIT + 3):
            source = session_from(f"127.0.1.{10 + i}")  # each guess from an address of its own
            guess = f"ack_{key_id}.wrong-secret-{i:04d}"
            codes.append(source.get(f"{limited_api.base}/models", headers=auth(guess), timeout=10).status_code)
        assert codes[:LIMIT] == [401] * LIMIT and set(codes[LIMIT + 1 :]) == {429}, codes
        # a JWT or another key is not held back by the guesses at this one
        other_id, other = store.create("user", "not guessed at")
        assert (
            session_from("127.0.1.99").get(f"{limited_api.base}/models", headers=auth(other), timeout=10).status_code
            == 200
        )
        store.revoke(other_id)
    finally:
        store.revoke(key_id)
    assert_still_serving(hostile_api, hostile_redis)


# -- case 9: a model process inherits no secret ---------------------------------------------------------------
def test_a_model_process_holds_no_secret_in_its_environment(hostile_api, hostile_redis):
    ensure_loaded(hostile_api)
    pids: list[int] = []

    def found() -> bool:
        pids.clear()
        from tasks.cluster import ClusterState

        for worker in ClusterState(hostile_redis, 10).live_workers():
            for model in worker.get("models", {}).values():
                pids.extend(p["pid"] for p in (model.get("info") or {}).get("processes", []))
        return bool(pids)

    wait_until(found, 10, 0.5, "a model process in a heartbeat")
    secrets_ = [ADMIN_KEY, OPERATOR_KEY, USER_KEY, OTHER_USER_KEY, VIEWER_KEY, JWT_SECRET]
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read().decode(errors="replace")
        names = {entry.split("=", 1)[0] for entry in environ.split("\0") if entry}
        assert not {"AETHERCORE_API_KEYS", "AETHERCORE_JWT_SECRET", "AETHERCORE_API_KEY"} & names, names
        leaked = [s for s in secrets_ if s in environ]
        assert not leaked, f"model process {pid} inherited {len(leaked)} secret(s)"
    assert_still_serving(hostile_api, hostile_redis)
