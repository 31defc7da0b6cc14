"""Redis memory: a job's own retention (result_ttl) on every key it writes, and new jobs refused with a clear
503 before Redis reaches its maxmemory (real Redis, real worker)."""

import time

import redis

from tasks.names import job_events_key, job_key
from tests.conftest import client_for, poll, settings_for
from tests.support import RedisServer, WorkerProcess, wait_until

MLP = {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}}
GEN = {"model_id": "tiny-gpt2", "inputs": {"text": "Once"}, "parameters": {"max_length": 4}}


def test_a_job_keeps_its_own_retention_on_its_record_and_its_stream(client, main_redis_url):
    r = redis.Redis.from_url(main_redis_url, decode_responses=True)
    short = client.post("/serve?wait=60", json={**GEN, "result_ttl": 30}).get_json()
    default = client.post("/serve?wait=60", json=MLP).get_json()
    assert short["status"] == default["status"] == "succeeded" and short["chunks"] == 4
    for key in (job_key(short["job_id"]), job_events_key(short["job_id"])):
        assert 0 < r.ttl(key) <= 30, key  # kept through the worker's transitions, not reset to the default
    assert 60 < r.ttl(job_key(default["job_id"])) <= 3600  # AETHERCORE_RESULT_TTL's default: 1 h
    # Nobody followed it and it streamed nothing: no event stream at all (it would cost ~4.7 KB for nothing).
    assert not r.exists(job_events_key(default["job_id"]))
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


def test_a_worker_keeps_a_jobs_end_until_a_full_redis_takes_it():
    """Redis at its maxmemory refuses writes: the job finishing meanwhile is neither lost nor half-written,
    and the worker stays up; its end is written once Redis has room again."""
    server = RedisServer().start()
    worker = None
    try:
        url = server.url(0)
        worker = WorkerProcess(url, name="full-redis-worker").start()
        client = client_for(settings_for(url))
        r = redis.Redis.from_url(url, decode_responses=True)
        job_id = client.post("/serve", json={**GEN, "parameters": {"max_length": 48}}).get_json()["job_id"]
        wait_until(lambda: int(r.hget(job_key(job_id), "chunks") or 0) >= 2, 60, 0.02, "streaming")
        r.config_set("maxmemory", 1)  # every write refused from now on (noeviction)
        time.sleep(3)  # the 48 tokens are done meanwhile; their end cannot be written
        assert client.get(f"/jobs/{job_id}").get_json()["status"] == "running"
        r.config_set("maxmemory", 0)
        job = poll(client, job_id)
        assert job["status"] == "succeeded" and job["result"]["output"]["tokens"] == 48
        assert worker.proc.poll() is None and "retrying until Redis takes it" in worker.log()
    finally:
        if worker is not None:
            worker.stop()
        server.cleanup()
