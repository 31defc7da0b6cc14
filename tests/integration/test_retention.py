"""Redis memory: a job's own retention (result_ttl) on every key it writes, and new jobs refused with a clear
503 before Redis reaches its maxmemory (real Redis, real worker)."""

import time

import redis

from tests.conftest import client_for, settings_for
from tests.support import RedisServer

MLP = {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}}


def test_a_job_keeps_its_own_retention_on_its_record_and_its_stream(client, main_redis_url):
    r = redis.Redis.from_url(main_redis_url, decode_responses=True)
    short = client.post("/serve?wait=60", json={**MLP, "result_ttl": 30}).get_json()
    default = client.post("/serve?wait=60", json=MLP).get_json()
    assert short["status"] == default["status"] == "succeeded"
    for key in (f"aethercore:job:{short['job_id']}", f"aethercore:job:{short['job_id']}:events"):
        assert 0 < r.ttl(key) <= 30, key  # kept through the worker's transitions, not reset to the default
    assert r.ttl(f"aethercore:job:{default['job_id']}") > 3600
    bad = client.post("/serve", json={**MLP, "result_ttl": 0})
    assert bad.status_code == 422 and "result_ttl" in bad.get_json()["error"]["details"]


def test_new_jobs_are_refused_with_503_before_redis_is_full():
    server = RedisServer().start()
    try:
        url = server.url(0)
        client = client_for(settings_for(url))
        r = redis.Redis.from_url(url)
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", used + 1024)  # Redis itself would still accept writes: we stop earlier
        refused = client.post("/serve", json=MLP)
        assert refused.status_code == 503, refused.get_json()
        body = refused.get_json()["error"]
        assert body["code"] == "redis_full" and "maxmemory" in body["message"]
        assert refused.headers["Retry-After"] == "30"
        r.config_set("maxmemory", 0)
        time.sleep(1.1)  # the API reads Redis's memory at most once a second
        assert client.post("/serve", json=MLP).status_code == 202
    finally:
        server.stop()
