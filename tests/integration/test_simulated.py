"""The simulated devices served like any model, end to end on the real worker and API: loaded and unloaded over
HTTP, embeddings batched by the worker's batcher (/serve, /serve/batch, /v1/embeddings, the peer benchmark's
request), generation streamed over SSE through the model process's running batch, cancelled, and /v1/completions;
the metrics count them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import redis
import requests
import yaml

from tasks.names import job_key
from tests.conftest import client_for, poll, settings_for, submit_and_wait
from tests.integration.test_continuous_batching import follow_sse
from tests.support import ADMIN_KEY, REPO_ROOT, USER_KEY, ApiProcess, WorkerProcess, read_sse, wait_until

EMBEDDER, DECODER = "sim-h100", "sim-gpt2-h100"
DB_THREADS = 22


def served(client, model_id: str, body: dict) -> dict:
    return submit_and_wait(client, {"model_id": model_id, **body})


def test_a_simulated_encoder_loads_serves_batches_and_unloads_like_a_model(client, main_redis_url):
    loaded = client.post(f"/models/{EMBEDDER}/load?wait=60").get_json()
    assert loaded["status"] == "succeeded", loaded
    status = client.get(f"/models/{EMBEDDER}/status").get_json()
    assert status["state"] == "loaded" and status["replicas"][0]["memory_bytes"] < 50 * 2**20  # no weights
    info = client.get(f"/models/{EMBEDDER}/info").get_json()
    assert info["config"]["model_type"] == "simulated" and info["config"]["simulate"]["dim"] == 384
    assert info["signature"]["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]

    # What the peer benchmark sends (/serve?wait=30, admin key) and reads (result.output.embedding).
    job = client.post("/serve?wait=30", json={"model_id": EMBEDDER, "inputs": {"text": "hello world"}}).get_json()
    embedding = job["result"]["output"]["embedding"]
    assert job["status"] == "succeeded" and len(embedding) == 384
    assert abs(float(np.linalg.norm(embedding)) - 1) < 1e-5 and job["result"]["timings"]["batch_size"] == 1

    batch = client.post(
        "/serve/batch?wait=30", json={"model_id": EMBEDDER, "inputs": [{"text": "hello world"}, {"text": "other"}]}
    ).get_json()
    outputs = batch["result"]["outputs"]
    assert [len(o["output"]["embedding"]) for o in outputs] == [384, 384]
    assert np.allclose(outputs[0]["output"]["embedding"], embedding)  # deterministic per text

    openai = client.post("/v1/embeddings", json={"model": EMBEDDER, "input": ["a", "b c"], "encoding_format": "float"})
    body = openai.get_json()
    assert openai.status_code == 200 and [len(d["embedding"]) for d in body["data"]] == [384, 384]
    assert body["usage"]["prompt_tokens"] == 3 + 4  # words + two special tokens each, as usage counts them

    unloaded = client.post(f"/models/{EMBEDDER}/unload?wait=60").get_json()
    assert unloaded["status"] == "succeeded", unloaded
    assert client.get(f"/models/{EMBEDDER}/status").get_json()["state"] == "unloaded"
    # autoload: true, like the other demo models: a user's request loads it again.
    user = client_for(settings_for(main_redis_url), USER_KEY)
    again = served(user, EMBEDDER, {"inputs": {"text": "hello world"}})
    assert again["result"]["output"]["embedding"] == embedding and again["result"]["timings"]["load_ms"] > 0


def test_concurrent_requests_to_a_simulated_encoder_are_batched_and_metered(client, api_server):
    served(client, EMBEDDER, {"inputs": {"text": "warm"}})
    job_ids: list[str] = []
    lock = threading.Lock()

    def submit(worker: int) -> None:
        with requests.Session() as session:
            for i in range(8):
                body = {"model_id": EMBEDDER, "inputs": {"text": f"client {worker} sentence {i}"}}
                job_id = session.post(f"{api_server.base}/serve", json=body, timeout=30).json()["job_id"]
                with lock:
                    job_ids.append(job_id)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    jobs = [poll(client, job_id) for job_id in job_ids]
    assert len(jobs) == 128 and all(j["status"] == "succeeded" for j in jobs)
    sizes = [j["result"]["timings"]["batch_size"] for j in jobs]
    assert max(sizes) > 1 and all(1 <= s <= 128 for s in sizes), sizes

    def metered():
        text = client.get("/metrics").get_data(as_text=True)
        lines = [line for line in text.splitlines() if f'model="{EMBEDDER}"' in line]
        succeeded = [
            float(line.split()[-1])
            for line in lines
            if line.startswith("aethercore_jobs_total") and 'status="succeeded"' in line
        ]
        passes = [float(line.split()[-1]) for line in lines if line.startswith("aethercore_batch_size_sum")]
        return succeeded and succeeded[0] >= 129 and passes and passes[0] >= 129 and lines

    assert wait_until(metered, 15, 0.5, "the simulated model's job and batch-size metrics")


def test_a_simulated_decoder_streams_one_chunk_per_token_and_cancels(client, api_server):
    def submit(tokens: int) -> str:
        body = {"model_id": DECODER, "inputs": {"text": "Once upon a time"}, "parameters": {"max_length": tokens}}
        response = requests.post(f"{api_server.base}/serve", json=body, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    streams = {}
    threads = [
        threading.Thread(target=lambda n=n: streams.__setitem__(n, follow_sse(api_server, submit(n))))
        for n in (5, 12, 20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for tokens, result in streams.items():
        kind, job = result["final"]
        output = job["result"]["output"]
        assert kind == "done" and job["status"] == "succeeded", job
        assert len(result["chunks"]) == tokens  # one token per row per step, one chunk each
        assert "".join(c["text"] for c in result["chunks"]) == output["text"]
        assert output["tokens"] == tokens and output["prompt_tokens"] == 4 and output["finish_reason"] == "length"

    victim = submit(256)  # 256 steps of ~3.9 ms: about a second
    with requests.get(f"{api_server.base}/jobs/{victim}/stream", stream=True, timeout=60) as response:
        for count, _event in enumerate(e for e in read_sse(response) if e[0] == "chunk"):
            if count == 2:
                break
    assert requests.delete(f"{api_server.base}/jobs/{victim}", timeout=10).status_code == 202
    ended = wait_until(
        lambda: (j := client.get(f"/jobs/{victim}").get_json())["status"] in ("cancelled", "succeeded") and j,
        30,
        0.05,
        "the cancel",
    )
    assert ended["status"] == "cancelled", ended

    completion = client.post("/v1/completions", json={"model": DECODER, "prompt": "Once upon a time", "max_tokens": 8})
    body = completion.get_json()
    assert completion.status_code == 200, body
    assert len(body["choices"][0]["text"].split()) == 8 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}

    def metered():
        text = client.get("/metrics").get_data(as_text=True)
        tokens = [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("aethercore_generated_tokens_total") and f'model="{DECODER}"' in line
        ]
        return tokens and tokens[0] >= 5 + 12 + 20 + 8

    assert wait_until(metered, 15, 0.5, "the simulated decoder's token count")
    assert client.post(f"/models/{DECODER}/unload?wait=60").get_json()["status"] == "succeeded"


def test_generations_submitted_together_share_one_message_and_each_streams_its_own_tokens_once(
    main_redis_url, main_worker, api_server
):
    """Concurrent generations leave an API process in one message, like /serve jobs (submission/submitter.py,
    `coalesce`): the worker runs that message's generations side by side in the model's running batch, and each
    streams its own tokens, once, and ends on its own."""
    from api import create_app
    from api.services import services

    app = create_app(settings_for(main_redis_url))
    with app.app_context():
        dispatcher = services().dispatcher
    groups: list[int] = []
    create_and_push = dispatcher.jobs.create_and_push

    def counted(device, queue, entries, message):
        groups.append(len(entries))
        return create_and_push(device, queue, entries, message)

    dispatcher.jobs.create_and_push = counted
    dispatcher.in_flight = lambda: 10**6  # as under load: the first submission waits for its companions
    dispatcher.linger_s = 2.0  # the first waits this long for the others (the threads start within ms)
    lengths = (3, 7, 11, 16)
    job_ids: dict[int, str] = {}

    def submit(tokens: int) -> None:
        body = {"model_id": DECODER, "inputs": {"text": f"row {tokens}"}, "parameters": {"max_length": tokens}}
        own = app.test_client()  # one client per thread, one app (and its dispatcher) for all
        own.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_KEY}"
        response = own.post("/serve", json=body)
        assert response.status_code == 202, response.get_json()
        job_ids[tokens] = response.get_json()["job_id"]

    threads = [threading.Thread(target=submit, args=(n,)) for n in lengths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert groups == [len(lengths)], groups  # one Lua step, one message, for all four
    streams = {}
    followers = [
        threading.Thread(target=lambda n=n: streams.__setitem__(n, follow_sse(api_server, job_ids[n]))) for n in lengths
    ]
    for thread in followers:
        thread.start()
    for thread in followers:
        thread.join(120)
    for tokens in lengths:
        kind, job = streams[tokens]["final"]
        assert kind == "done" and job["status"] == "succeeded", job
        chunks = streams[tokens]["chunks"]
        assert [c["index"] for c in chunks] == list(range(len(chunks))) and len(chunks) == tokens
        assert "".join(c["text"] for c in chunks) == job["result"]["output"]["text"]
        assert job["result"]["output"]["tokens"] == tokens


@pytest.mark.slow
def test_a_worker_runs_as_many_jobs_at_once_as_a_model_batches_whatever_its_concurrency(redis_server, tmp_path):
    """A job holds its task thread until it ends, so a worker with fewer threads than a model's batch holds could
    never fill that batch (64 threads capped 256 streams at 64 rows). With AETHERCORE_WORKER_CONCURRENCY=2 and a
    decoder whose running batch holds 6, six generations, each its own message, all run at once."""
    models = yaml.safe_load((REPO_ROOT / "config" / "models.yaml").read_text())
    decoder = {**models["models"][DECODER], "max_batch_size": 6, "simulate": {"step_ms": 40.0, "per_row_ms": 0.0}}
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump({**models, "models": {DECODER: decoder}}))
    url = redis_server.url(DB_THREADS)
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    env = {"AETHERCORE_MODELS_FILE": str(models_file)}
    worker = WorkerProcess(url, name="threads", AETHERCORE_WORKER_CONCURRENCY="2", **env).start()
    api = ApiProcess(url, name="threads-api", **env).start()
    try:
        assert requests.post(f"{api.base}/models/{DECODER}/load?wait=60", timeout=70).json()["status"] == "succeeded"
        assert wait_until(lambda: (worker.record() or {}).get("concurrency") == 6, 15, 0.2, "the worker's threads")
        jobs = []
        for n in range(6):  # one after another: six messages, not one group
            body = {"model_id": DECODER, "inputs": {"text": f"stream {n}"}, "parameters": {"max_length": 100}}
            response = requests.post(f"{api.base}/serve", json=body, timeout=10)
            assert response.status_code == 202, response.text
            jobs.append(response.json()["job_id"])
        # 100 steps of 40 ms: each runs ~4 s, so all six running together means none waited for a thread.
        assert wait_until(
            lambda: all(r.hget(job_key(j), "status") == "running" for j in jobs), 3, 0.05, "six jobs running at once"
        )
        for job_id in jobs:
            requests.delete(f"{api.base}/jobs/{job_id}", timeout=10)
    finally:
        api.stop()
        worker.stop()
