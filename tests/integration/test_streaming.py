"""Streaming over WebSocket and Server-Sent Events from the real API server (gunicorn) and worker."""

import json
import threading
import time

import requests

from tests.support import close_quietly, read_sse, wait_until, ws_connect


def ws_url(api_server) -> str:
    return api_server.base.replace("http://", "ws://") + "/serve/stream"


def sse_collect(api_server, job_id, headers=None):
    chunks, final = [], None
    with requests.get(
        f"{api_server.base}/jobs/{job_id}/stream", stream=True, timeout=120, headers=headers or {}
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for event, event_id, data in read_sse(response):
            if event == "chunk":
                chunks.append((event_id, data))
            else:
                final = (event, data)
                break
    return chunks, final


def start_generation(api_server, tokens):
    response = requests.post(
        f"{api_server.base}/serve",
        timeout=10,
        json={"model_id": "tiny-gpt2", "inputs": {"text": "Tell me a story"}, "parameters": {"max_length": tokens}},
    )
    assert response.status_code == 202
    return response.json()["job_id"]


def test_websocket_streams_every_chunk_in_order_then_done(api_server):
    ws = ws_connect(ws_url(api_server))
    try:
        ws.send(json.dumps({"model_id": "tiny-gpt2", "inputs": {"text": "Hello"}, "parameters": {"max_length": 24}}))
        first = json.loads(ws.receive(timeout=30))
        assert first["type"] == "queued" and first["job_id"]
        chunks, final = [], None
        while final is None:
            message = json.loads(ws.receive(timeout=60))
            if message["type"] == "chunk":
                chunks.append(message)
            else:
                final = message
    finally:
        close_quietly(ws)
    assert final["type"] == "done"
    job = final["job"]
    assert job["status"] == "succeeded" and job["job_id"] == first["job_id"]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert len(chunks) == job["result"]["output"]["tokens"] == 24
    assert "".join(c["text"] for c in chunks) == job["result"]["output"]["text"]


def test_websocket_non_streaming_model_sends_one_chunk(api_server):
    ws = ws_connect(ws_url(api_server))
    try:
        ws.send(json.dumps({"model_id": "minilm", "inputs": {"text": "Hello"}}))
        messages = [json.loads(ws.receive(timeout=60)) for _ in range(3)]
    finally:
        close_quietly(ws)
    assert [m["type"] for m in messages] == ["queued", "chunk", "done"]
    assert messages[1]["index"] == 0 and len(messages[1]["output"]["embedding"]) == 384


def test_websocket_bad_request_gets_an_error_message(api_server):
    ws = ws_connect(ws_url(api_server))
    try:
        ws.send(json.dumps({"model_id": "nope", "inputs": {"text": "x"}}))
        message = json.loads(ws.receive(timeout=30))
        assert message["type"] == "error" and message["error"]["code"] == "model_not_found"
    finally:
        close_quietly(ws)
    ws = ws_connect(ws_url(api_server))
    try:
        ws.send("{not json")
        assert json.loads(ws.receive(timeout=30))["error"]["code"] == "bad_request"
    finally:
        close_quietly(ws)


def test_disconnecting_cancels_the_generation(api_server):
    ws = ws_connect(ws_url(api_server))
    ws.send(json.dumps({"model_id": "tiny-gpt2", "inputs": {"text": "Go on"}, "parameters": {"max_length": 256}}))
    job_id = json.loads(ws.receive(timeout=30))["job_id"]
    for _ in range(3):
        assert json.loads(ws.receive(timeout=60))["type"] == "chunk"
    ws.close()
    job = wait_until(
        lambda: (
            (j := requests.get(f"{api_server.base}/jobs/{job_id}", timeout=5).json())["status"]
            in {"cancelled", "succeeded"}
            and j
        ),
        60,
        0.1,
        "the job to end",
    )
    assert job["status"] == "cancelled"
    assert job["chunks"] < 256


def test_sse_late_and_after_the_end_subscribers_get_everything(api_server):
    job_id = start_generation(api_server, 120)
    # Join once generation is under way...
    wait_until(
        lambda: requests.get(f"{api_server.base}/jobs/{job_id}", timeout=5).json()["chunks"] >= 5,
        60,
        0.02,
        "the first chunks",
    )
    live_chunks, live_final = sse_collect(api_server, job_id)
    # ...and again after it finished.
    after_chunks, after_final = sse_collect(api_server, job_id)
    job = requests.get(f"{api_server.base}/jobs/{job_id}", timeout=5).json()
    text = job["result"]["output"]["text"]
    for chunks, final in ((live_chunks, live_final), (after_chunks, after_final)):
        assert [c["index"] for _, c in chunks] == list(range(120))
        assert "".join(c["text"] for _, c in chunks) == text
        assert final[0] == "done" and final[1]["job"]["status"] == "succeeded"
    # Resuming with Last-Event-ID continues right after that chunk, without repeats.
    resume_id = live_chunks[49][0]
    resumed, _ = sse_collect(api_server, job_id, headers={"Last-Event-ID": resume_id})
    assert [c["index"] for _, c in resumed] == list(range(50, 120))


def test_sse_for_unknown_job_is_404_json(api_server):
    response = requests.get(f"{api_server.base}/jobs/{'0' * 32}/stream", timeout=5)
    assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"


def test_many_concurrent_streams_do_not_block_each_other(api_server):
    job_ids = [start_generation(api_server, 16) for _ in range(12)]
    results: dict[str, tuple] = {}

    def follow(job_id):
        results[job_id] = sse_collect(api_server, job_id)

    threads = [threading.Thread(target=follow, args=(job_id,)) for job_id in job_ids]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert time.monotonic() - started < 120
    assert len(results) == 12
    for chunks, final in results.values():
        assert [c["index"] for _, c in chunks] == list(range(16)) and final[0] == "done"


def test_cli_serve_stream_prints_the_generated_text(api_server):
    import subprocess
    import sys

    from tests.support import REPO_ROOT

    env = dict(api_server.env, AETHERCORE_URL=api_server.base)
    out = subprocess.run(
        [sys.executable, "manage.py", "serve", "tiny-gpt2", "--text", "Once", "--max-length", "10", "--stream"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = out.stdout.strip()
    reference = requests.post(
        f"{api_server.base}/serve?wait=60",
        timeout=70,
        json={"model_id": "tiny-gpt2", "inputs": {"text": "Once"}, "parameters": {"max_length": 10}},
    ).json()
    assert printed == reference["result"]["output"]["text"].strip()
