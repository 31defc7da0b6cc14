"""Dynamic batching in the worker and POST /serve/batch, against the real worker and models."""

import numpy as np

from tests.conftest import poll, submit_and_wait

TEXTS = [f"sentence number {i} " + "with some padding words " * (i % 7) for i in range(48)]


def test_concurrent_jobs_are_batched_and_equal_single_results(client):
    client.post("/models/minilm/load?wait=60")
    alone = {}
    for text in TEXTS[:6]:
        job = submit_and_wait(client, {"model_id": "minilm", "inputs": {"text": text}})
        assert job["result"]["timings"]["batch_size"] == 1
        alone[text] = np.array(job["result"]["output"]["embedding"])
    # Submit all at once without waiting: the worker sees many queued jobs and batches them.
    job_ids = [
        client.post("/serve", json={"model_id": "minilm", "inputs": {"text": t}}).get_json()["job_id"] for t in TEXTS
    ]
    jobs = [poll(client, job_id) for job_id in job_ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    sizes = [j["result"]["timings"]["batch_size"] for j in jobs]
    assert max(sizes) > 1, sizes
    assert all(1 <= s <= 32 for s in sizes)
    for text, job in zip(TEXTS, jobs):
        if text in alone:
            batched = np.array(job["result"]["output"]["embedding"])
            assert 1 - float(batched @ alone[text]) < 1e-5
    assert all(j["result"]["timings"]["batch_wait_ms"] >= 0 for j in jobs)


def test_batch_endpoint_keeps_order_and_isolates_bad_inputs(client_without_signatures):
    # With the signature known the API refuses the bad item before queueing (test_model_signatures.py); here it
    # is not known yet, so the worker's check fails that item alone.
    client = client_without_signatures
    inputs = [{"features": [[1, 2, 3, 4]]}, {"features": [[1, 2]]}, {"features": [[0, 0, 0, 1], [1, 1, 1, 1]]}]
    response = client.post("/serve/batch?wait=60", json={"model_id": "tiny-mlp", "inputs": inputs})
    assert response.status_code == 200, response.get_json()
    outputs = response.get_json()["result"]["outputs"]
    assert len(outputs) == 3
    assert outputs[0]["output"]["logits"]["shape"] == [1, 3]
    assert outputs[1]["error"]["code"] == "invalid_input"
    assert outputs[2]["output"]["logits"]["shape"] == [2, 3]
    single = submit_and_wait(client, {"model_id": "tiny-mlp", "inputs": inputs[2]})["result"]["output"]
    np.testing.assert_allclose(outputs[2]["output"]["logits"]["data"], single["logits"]["data"], atol=1e-6)


def test_batch_endpoint_text_order(client):
    texts = ["alpha", "a much longer sentence about beta and gamma", "delta"]
    response = client.post("/serve/batch?wait=60", json={"model_id": "minilm", "inputs": [{"text": t} for t in texts]})
    outputs = response.get_json()["result"]["outputs"]
    for text, item in zip(texts, outputs):
        alone = submit_and_wait(client, {"model_id": "minilm", "inputs": {"text": text}})
        assert 1 - float(np.dot(item["output"]["embedding"], alone["result"]["output"]["embedding"])) < 1e-5


def test_batch_limits_and_validation(client, app):
    limit = app.extensions["aethercore"].settings.max_batch_inputs
    response = client.post("/serve/batch", json={"model_id": "minilm", "inputs": [{"text": "x"}] * (limit + 1)})
    assert response.status_code == 413
    assert str(limit) in response.get_json()["error"]["message"]
    response = client.post("/serve/batch", json={"model_id": "minilm", "inputs": [{"text": "ok"}, {"text": ""}]})
    assert response.status_code == 422 and "inputs.1.text" in response.get_json()["error"]["details"]
    response = client.post("/serve/batch", json={"model_id": "minilm", "inputs": []})
    assert response.status_code == 422
