"""Case 5 of issue 19: one caller could take every thread of an API process. Each SSE stream, WebSocket and
`?wait` (and each request of the protocols that wait: OIP infer, OpenAI /v1) holds one of the process's
AETHERCORE_API_THREADS threads for as long as it lasts, and gthread queues every further connection, probes
included, until a thread frees.

Now each caller may hold at most AETHERCORE_MAX_STREAMS_PER_CALLER of them per API process (429 beyond, with
Retry-After, before any job is created), and all callers together at most AETHERCORE_API_THREADS minus
AETHERCORE_RESERVED_THREADS (503 beyond): the reserved threads are always there for short requests and
probes.
"""

from __future__ import annotations

import pytest
import requests

from tests.hostile.conftest import (
    another_callers_stream,
    assert_live_within,
    assert_still_serving,
    auth,
    ensure_loaded,
)
from tests.hostile.streams import held_job, open_sse, within
from tests.support import ADMIN_KEY, OTHER_USER_KEY, USER_KEY, ApiProcess

# AETHERCORE_MAX_STREAMS_PER_CALLER's default (the suite's API runs with the defaults).
DEFAULT_PER_CALLER = 32

WS_HANDSHAKE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def own_jobs(api: ApiProcess, key: str) -> set[str]:
    response = requests.get(f"{api.base}/jobs?limit=500", headers=auth(key), timeout=10)
    return {job["job_id"] for job in response.json()["jobs"]}


def close_all(responses: list[requests.Response]) -> None:
    for response in responses:
        response.close()


def test_a_caller_over_its_cap_gets_429_and_others_still_stream(hostile_api, hostile_redis):
    api = hostile_api
    ensure_loaded(api)
    with held_job(hostile_redis, USER_KEY) as job_id:
        held: list[requests.Response] = []
        try:
            for _ in range(DEFAULT_PER_CALLER):
                held.append(open_sse(api, USER_KEY, job_id))
                assert held[-1].status_code == 200, held[-1].text[:300]

            # one more stream of any kind, or a wait, is refused at once, in its protocol's shape
            refused, took = within(5, "the refused stream", lambda: open_sse(api, USER_KEY, job_id))
            held.append(refused)
            assert refused.status_code == 429, f"stream {DEFAULT_PER_CALLER + 1} answered {refused.status_code}"
            assert refused.json()["error"]["code"] == "too_many_streams"
            assert int(refused.headers["Retry-After"]) > 0
            assert "AETHERCORE_MAX_STREAMS_PER_CALLER" in refused.json()["error"]["message"]

            waited = requests.get(f"{api.base}/jobs/{job_id}?wait=20", headers=auth(USER_KEY), timeout=10)
            assert waited.status_code == 429 and waited.elapsed.total_seconds() < 2

            before = own_jobs(api, USER_KEY)
            body = {"model_id": "tiny-gpt2", "inputs": {"text": "hi"}, "parameters": {"max_length": 4}}
            submitted = requests.post(f"{api.base}/serve?wait=20", json=body, headers=auth(USER_KEY), timeout=10)
            assert submitted.status_code == 429, submitted.text[:300]
            assert own_jobs(api, USER_KEY) == before  # refused before any job was created

            socket = requests.get(f"{api.base}/serve/stream", headers={**auth(USER_KEY), **WS_HANDSHAKE}, timeout=10)
            assert socket.status_code == 429 and socket.json()["error"]["code"] == "too_many_streams"

            chat = requests.post(
                f"{api.base}/v1/chat/completions",
                json={"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                headers=auth(USER_KEY),
                timeout=10,
            )
            assert chat.status_code == 429 and chat.json()["error"]["type"] == "rate_limit_error"

            # another caller is not held back by it
            assert_live_within(api, 1.0)
            within(60, "another caller's stream", lambda: another_callers_stream(api))
            assert_live_within(api, 1.0)
        finally:
            close_all(held)
    assert_still_serving(api, hostile_redis)


@pytest.fixture(scope="module")
def small_api(hostile_redis_url, hostile_worker):
    """A process with 8 threads, 2 of them reserved for short requests, and 4 long-held requests per caller."""
    server = ApiProcess(
        hostile_redis_url,
        name="hostile-api-small",
        AETHERCORE_AUTH="true",
        AETHERCORE_WORKERS="1",
        AETHERCORE_API_THREADS="8",
        AETHERCORE_RESERVED_THREADS="2",
        AETHERCORE_MAX_STREAMS_PER_CALLER="4",
    ).start()
    yield server
    server.stop()


PROBES = ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/heartbeat")


def test_probes_answer_within_a_second_when_every_long_held_slot_is_taken(small_api, hostile_redis):
    api = small_api
    ensure_loaded(api)
    with held_job(hostile_redis, USER_KEY) as mine, held_job(hostile_redis, OTHER_USER_KEY) as theirs:
        held: list[requests.Response] = []
        try:
            # two callers try to hold as many streams as the process has threads
            for i in range(8):
                key, job_id = (USER_KEY, mine) if i % 2 == 0 else (OTHER_USER_KEY, theirs)
                held.append(open_sse(api, key, job_id))
            for _ in range(3):
                for path in PROBES:
                    _, took = within(1.0, f"GET {path}", lambda p=path: requests.get(f"{api.base}{p}", timeout=1))
                    assert took < 1.0
            assert_live_within(api, 1.0)
            codes = [response.status_code for response in held]
            assert codes == [200] * 6 + [503, 503], codes
            busy = held[-1]
            assert busy.json()["error"]["code"] == "server_busy" and int(busy.headers["Retry-After"]) > 0

            # while it is full, every protocol that would wait says so in its own shape, at once
            chat = requests.post(
                f"{api.base}/v1/chat/completions",
                json={"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                headers=auth(ADMIN_KEY),
                timeout=5,
            )
            assert chat.status_code == 503 and chat.json()["error"]["type"] == "server_error"
            oip = requests.post(
                f"{api.base}/v2/models/minilm/infer",
                json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]},
                headers=auth(ADMIN_KEY),
                timeout=5,
            )
            assert oip.status_code == 503 and isinstance(oip.json()["error"], str)
            # short requests still go through
            assert requests.get(f"{api.base}/jobs/{mine}", headers=auth(USER_KEY), timeout=1).status_code == 202
        finally:
            close_all(held)
    assert_still_serving(api, hostile_redis)
