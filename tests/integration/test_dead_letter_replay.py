"""Issue 34 case 14: a dead letter's replay is a new submission of its owner, on a real app and the session's real
Redis with no worker on its database, so the replayed job's message is read where it waits: in the original
request's lane, the owner's job, refused as the owner would be (their role's lanes and autoload now, Redis full),
and an entry written before dead letters kept their submission answers 409 `not_replayable`.

The dead letters are made as a worker makes them: the owner submits through the app, then the job is taken after its
deadline and ended by the same Lua step a worker's end runs (tasks/jobs/lifecycle.py `end_jobs`), naming it a dead
letter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from config.lanes import LANES
from config.settings import Settings
from tasks.deadletters import EXPIRED_IN_QUEUE
from tasks.errors import DEADLINE_EXCEEDED, POISON_JOB
from tasks.jobs import Jobs
from tasks.jobs.lifecycle import JobEnd
from tasks.names import dead_entry_key, dead_letter_key, lane_list
from tasks.states import EXPIRED, FAILED
from tests.conftest import DB_SCRATCH
from tests.support import ADMIN_KEY, USER_KEY, base_env

pytestmark = pytest.mark.slow

USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEXT = {"model_id": "minilm", "inputs": {"text": "hello"}, "timeout": 0.001}


@pytest.fixture()
def make_app(redis_server, scratch_redis) -> Iterator[Any]:
    from api import create_app

    url = redis_server.url(DB_SCRATCH)

    def make(**env: str) -> Any:
        return create_app(Settings.from_env(base_env(url, AETHERCORE_AUTH="true", **env)))

    yield make
    scratch_redis.config_set("maxmemory", 0)


def dead_letter_of(app: Any, body: dict[str, Any], who: dict[str, str] = USER) -> str:
    """A request of `who` that becomes a dead letter as a worker would make it: taken after its deadline."""
    created = app.test_client().post("/serve", json=body, headers=who)
    assert created.status_code == 202, created.get_json()
    job_id = created.get_json()["job_id"]
    jobs: Jobs = app.extensions["aethercore"].jobs
    payload = jobs.redis.hget(f"aethercore:job:{job_id}", "payload")
    assert jobs.lifecycle.mark_running(job_id, "a-worker", payload) == 1
    ending = JobEnd(job_id, EXPIRED, DEADLINE_EXCEEDED, "waited", dead=EXPIRED_IN_QUEUE)
    assert jobs.lifecycle.end_jobs([ending]) == [True]
    _drain(jobs)
    return job_id


def _drain(jobs: Jobs) -> None:
    """No worker here: the messages waiting in the queue's lanes are dropped, so a replay's is the only one."""
    jobs.redis.delete(*(lane_list("cpu", lane) for lane in LANES))


def waiting(jobs: Jobs) -> dict[str, int]:
    return {lane: int(jobs.redis.llen(lane_list("cpu", lane))) for lane in LANES}


def replay(app: Any, job_id: str) -> Any:
    return app.test_client().post(f"/dead-letters/{job_id}/replay", headers=ADMIN)


def test_a_replay_is_its_owners_request_in_its_lane(make_app):
    app = make_app()
    jobs = app.extensions["aethercore"].jobs
    dead = dead_letter_of(app, {**TEXT, "priority": "low"})
    answer = replay(app, dead)
    assert answer.status_code == 202, answer.get_json()
    job = answer.get_json()["job"]
    assert job["replay_of"] == dead and job["owner"] == jobs.records.get(dead)["owner"]
    assert waiting(jobs) == {"high": 0, "normal": 0, "low": 1}  # the original's lane, not kombu's default (high)
    assert jobs.redis.hget(dead_entry_key(dead), "replayed_as") == job["job_id"]
    again = replay(app, dead)
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "already_replayed"


def test_a_replay_is_refused_what_its_owner_may_not_do_now(make_app, scratch_redis):
    app = make_app()
    svc = app.extensions["aethercore"]
    granting = make_app(AETHERCORE_PRIORITY_LANES="user:high+normal+low")  # users may use `high` when it is sent
    high = dead_letter_of(granting, {**TEXT, "priority": "high"})
    # the model was loaded when the owner (a `user`) sent it; it is not now, and a user may not load it
    svc.cluster.desire("tiny-classifier", "cpu")
    svc.submitter.desired_cache.clear("tiny-classifier")
    unloaded = dead_letter_of(app, {**TEXT, "model_id": "tiny-classifier"})
    svc.cluster.undesire("tiny-classifier")
    svc.submitter.desired_cache.clear("tiny-classifier")
    refused = replay(app, unloaded)
    assert refused.status_code == 409 and refused.get_json()["error"]["code"] == "model_not_loaded", refused.get_json()

    refused = replay(app, high)  # users lost `high` since (the default: normal and low)
    assert refused.status_code == 403 and "'high' priority lane" in refused.get_json()["error"]["message"]

    plain = dead_letter_of(app, TEXT)
    scratch_redis.config_set("maxmemory", int(scratch_redis.info("memory")["used_memory"] * 1.02) + 1)
    time.sleep(1.1)  # the API's view of Redis's memory is at most a second old
    full = replay(app, plain)
    assert full.status_code == 503 and full.get_json()["error"]["code"] == "redis_full", full.get_json()
    scratch_redis.config_set("maxmemory", 0)
    assert waiting(svc.jobs) == {"high": 0, "normal": 0, "low": 0}  # none of the refused replays was queued
    assert not scratch_redis.hget(dead_entry_key(plain), "replayed_as")


def test_a_dead_letter_kept_as_a_celery_message_answers_409(make_app, scratch_redis):
    app = make_app()
    legacy = "cd" * 16
    message = b'{"task":"aethercore.infer","queue":"cpu","kwargs":{"model_id":"minilm","jobs":[{"inputs":{}}]}}'
    scratch_redis.hset(
        dead_entry_key(legacy),
        mapping={"job_id": legacy, "queue": "cpu", "reason": "poison_job", "dead_at": time.time(), "payload": message},
    )
    scratch_redis.zadd(dead_letter_key("cpu"), {legacy: time.time()})
    answer = replay(app, legacy)
    assert answer.status_code == 409 and answer.get_json()["error"]["code"] == "not_replayable"
    assert "older version" in answer.get_json()["error"]["message"]
    assert waiting(app.extensions["aethercore"].jobs) == {"high": 0, "normal": 0, "low": 0}


def test_a_load_is_replayed_as_its_admins_load(make_app, scratch_redis):
    app = make_app()
    svc = app.extensions["aethercore"]
    loaded = app.test_client().post("/models/tiny-mlp/load", headers=ADMIN)
    assert loaded.status_code == 202
    job_id = loaded.get_json()["job_id"]
    payload = svc.jobs.redis.hget(f"aethercore:job:{job_id}", "payload")
    assert svc.jobs.lifecycle.mark_running(job_id, "a-worker", payload) == 1
    # its worker died with it AETHERCORE_MAX_ATTEMPTS times: the reaper ends it poison_job
    poison = JobEnd(job_id, FAILED, POISON_JOB, "killed", dead="poison_job")
    assert svc.jobs.lifecycle.end_jobs([poison]) == [True]
    answer = replay(app, job_id)
    assert answer.status_code == 202, answer.get_json()
    job = answer.get_json()["job"]
    assert job["kind"] == "load" and job["model_id"] == "tiny-mlp" and job["replay_of"] == job_id
    assert job["owner"] == svc.jobs.records.get(job_id)["owner"]
