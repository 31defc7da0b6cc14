"""Idempotency-Key on every endpoint that creates a job, against a running API (auth on) and a real worker: the same
key and request return the same job (`Idempotency-Replayed: true`), another request under the key is 422, 20
concurrent duplicates create one job, keys are per caller, a refused request leaves its key free, a key whose job
expired is free again, and the stock `openai` client's retries (it sends the key when told to) create one job."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import redis
import requests

from tasks.names import RECENT_JOBS
from tests.support import ADMIN_KEY, OTHER_USER_KEY, USER_KEY, metric, wait_until

pytestmark = pytest.mark.slow

MLP = {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}}


def post(api, path: str, key: str | None, body=None, caller: str = USER_KEY, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {caller}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(f"{api.base}{path}", json=body, headers=headers, timeout=90, **kwargs)


def jobs_since(main_redis_url: str, since: float) -> int:
    return redis.Redis.from_url(main_redis_url).zcount(RECENT_JOBS, since, "+inf")


def test_the_same_key_and_request_return_the_same_job(auth_api_server):
    key = str(uuid.uuid4())
    first = post(auth_api_server, "/serve?wait=30", key, MLP)
    assert first.status_code == 200 and "Idempotency-Replayed" not in first.headers
    again = post(auth_api_server, "/serve", key, MLP)  # without ?wait: the finished job as it stands
    assert again.status_code == 200 and again.headers["Idempotency-Replayed"] == "true"
    assert again.json()["job_id"] == first.json()["job_id"] and again.json()["result"] == first.json()["result"]
    quoted = post(auth_api_server, "/serve", f'"{key}"', MLP)  # the draft's structured-field form: the same key
    assert quoted.json()["job_id"] == first.json()["job_id"]


def test_the_same_key_with_another_request_is_422(auth_api_server):
    key = str(uuid.uuid4())
    assert post(auth_api_server, "/serve", key, MLP).status_code == 202
    other = post(auth_api_server, "/serve", key, {**MLP, "inputs": {"features": [[4, 3, 2, 1]]}})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    elsewhere = post(auth_api_server, "/serve/batch", key, {"model_id": "minilm", "inputs": [{"text": "x"}]})
    assert elsewhere.status_code == 422  # the same key on another endpoint is another request


def test_twenty_concurrent_duplicates_create_one_job(auth_api_server, main_redis_url):
    key, since = str(uuid.uuid4()), time.time()
    body = {"model_id": "minilm", "inputs": {"text": f"concurrent duplicates {key}"}}
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _i: post(auth_api_server, "/serve?wait=20", key, body), range(20)))
    assert all(r.status_code in (200, 202) for r in responses), [r.text for r in responses]
    assert len({r.json()["job_id"] for r in responses}) == 1
    assert sum(r.headers.get("Idempotency-Replayed") == "true" for r in responses) == 19
    assert jobs_since(main_redis_url, since) == 1
    assert all(r.json()["status"] == "succeeded" for r in responses)  # each waited for the one job


def test_keys_are_per_caller(auth_api_server):
    key = str(uuid.uuid4())
    mine = post(auth_api_server, "/serve", key, MLP).json()
    theirs = post(auth_api_server, "/serve", key, MLP, caller=OTHER_USER_KEY).json()
    assert mine["job_id"] != theirs["job_id"] and mine["owner"] != theirs["owner"]


def test_a_refused_request_leaves_its_key_free(auth_api_server):
    key = str(uuid.uuid4())
    assert post(auth_api_server, "/serve", key, {**MLP, "model_id": "no-such-model"}).status_code == 404
    assert post(auth_api_server, "/serve", key, {"model_id": "tiny-mlp"}).status_code == 422  # invalid body
    created = post(auth_api_server, "/serve", key, MLP)
    assert created.status_code == 202 and "Idempotency-Replayed" not in created.headers


def test_a_key_whose_job_expired_is_free_again(auth_api_server):
    key = str(uuid.uuid4())
    first = post(auth_api_server, "/serve?wait=30", key, {**MLP, "result_ttl": 1}).json()
    assert first["status"] == "succeeded"
    time.sleep(2.2)
    second = post(auth_api_server, "/serve?wait=30", key, {**MLP, "result_ttl": 1})
    assert second.json()["job_id"] != first["job_id"] and "Idempotency-Replayed" not in second.headers


def test_malformed_keys_are_400(auth_api_server):
    for bad in ("", "a key with spaces", "x" * 300, "é"):
        response = requests.post(
            f"{auth_api_server.base}/serve",
            json=MLP,
            headers={"Authorization": f"Bearer {USER_KEY}", "Idempotency-Key": bad.encode("utf-8").decode("latin-1")},
            timeout=30,
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_idempotency_key", bad


def test_model_loads_and_oip_infer_replay(auth_api_server):
    key = str(uuid.uuid4())
    load = post(auth_api_server, "/models/tiny-mlp/load?wait=30", key, caller=ADMIN_KEY)
    again = post(auth_api_server, "/models/tiny-mlp/load", key, caller=ADMIN_KEY)
    assert load.json()["job_id"] == again.json()["job_id"] and again.headers["Idempotency-Replayed"] == "true"

    key = str(uuid.uuid4())
    infer = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    first = post(auth_api_server, "/v2/models/tiny-mlp/infer", key, infer)
    second = post(auth_api_server, "/v2/models/tiny-mlp/infer", key, infer)
    assert first.status_code == second.status_code == 200, first.text
    assert second.headers["Idempotency-Replayed"] == "true" and second.json()["outputs"] == first.json()["outputs"]


class RetryingOpenAI(openai.OpenAI):
    """The stock client, told to send its (per request, reused on every retry) idempotency key."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._idempotency_header = "Idempotency-Key"


def completions_requests(api) -> float:
    return metric(
        requests.get(f"{api.base}/metrics", timeout=10).text,
        "aethercore_requests_total",
        method="POST",
        endpoint="/v1/completions",
    )


def test_the_openai_clients_retries_create_one_job(auth_api_server, main_redis_url):
    since, before = time.time(), completions_requests(auth_api_server)
    # Each try gives up after 0.4 s, before the generation ends: the client retries with the same key, and each
    # retry waits on the one job until it has ended.
    client = RetryingOpenAI(base_url=f"{auth_api_server.base}/v1", api_key=USER_KEY, max_retries=10, timeout=0.4)
    prompt = f"Retried {uuid.uuid4()}"
    done = client.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=256, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 256
    tries = wait_until(lambda: (n := completions_requests(auth_api_server) - before) >= 2 and n, 20, 0.2, "the tries")
    print(f"\nthe openai client sent the completion {tries:.0f} times (one key): one job")
    mine = requests.get(
        f"{auth_api_server.base}/jobs",
        params={"model_id": "tiny-gpt2", "limit": 50},
        headers={"Authorization": f"Bearer {USER_KEY}"},
        timeout=10,
    ).json()["jobs"]
    created = [j for j in mine if j["created_at"] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since))]
    assert len(created) == 1 and done.id == f"cmpl-{created[0]['job_id']}", created
    assert jobs_since(main_redis_url, since) == 1

    with ThreadPoolExecutor(4) as pool:  # the same key sent explicitly by several clients at once: one job
        key = str(uuid.uuid4())
        plain = openai.OpenAI(base_url=f"{auth_api_server.base}/v1", api_key=USER_KEY, max_retries=0, timeout=60)
        answers = list(
            pool.map(
                lambda _i: plain.embeddings.create(
                    model="minilm", input="one embedding", extra_headers={"Idempotency-Key": key}
                ),
                range(4),
            )
        )
    assert len({tuple(a.data[0].embedding) for a in answers}) == 1
