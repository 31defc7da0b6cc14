"""The core job path against a real Redis and a real worker process running the real demo models."""

import re

import numpy as np
import pytest

from model_store.bootstrap import minilm_source_dir
from tests.conftest import poll, submit_and_wait


def embed(client, model_id, text, **parameters):
    job = submit_and_wait(client, {"model_id": model_id, "inputs": {"text": text}, "parameters": parameters})
    assert job["status"] == "succeeded", job
    return job


def test_submit_returns_202_and_location_then_poll(client):
    response = client.post(
        "/serve", json={"model_id": "minilm", "inputs": {"text": "Hello world"}, "parameters": {"max_length": 100}}
    )
    assert response.status_code == 202
    body = response.get_json()
    assert re.fullmatch(r"[0-9a-f]{32}", body["job_id"])
    assert body["status"] == "queued" and body["kind"] == "inference" and body["model_id"] == "minilm"
    assert response.headers["Location"] == f"/jobs/{body['job_id']}"
    job = poll(client, body["job_id"])
    assert job["status"] == "succeeded"
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    result = job["result"]
    assert result["model_id"] == "minilm" and result["task"] == "feature-extraction" and result["device"] == "cpu"
    assert result["worker"].startswith("cpu.")
    assert result["timings"]["queue_ms"] >= 0 and result["timings"]["inference_ms"] > 0
    assert len(result["output"]["embedding"]) == 384


def test_embeddings_equal_an_in_process_computation(client):
    from sentence_transformers import SentenceTransformer

    texts = ["Hello world", "Resident models answer fast."]
    reference = SentenceTransformer(str(minilm_source_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    for text, expected in zip(texts, reference):
        vector = np.array(embed(client, "minilm", text)["result"]["output"]["embedding"])
        assert float(vector @ expected) > 0.99999


def test_onnx_agrees_with_pytorch_through_the_api(client):
    a = np.array(embed(client, "minilm", "The quick brown fox")["result"]["output"]["embedding"])
    b = np.array(embed(client, "minilm-onnx", "The quick brown fox")["result"]["output"]["embedding"])
    assert float(a @ b) > 0.999


def test_generation_respects_max_length(client):
    for budget in (3, 12):
        job = submit_and_wait(
            client, {"model_id": "tiny-gpt2", "inputs": {"text": "Once"}, "parameters": {"max_length": budget}}
        )
        output = job["result"]["output"]
        assert output["tokens"] == budget and output["finish_reason"] == "length"
        assert output["text"]


def test_classification_and_tensor_outputs(client):
    job = submit_and_wait(client, {"model_id": "tiny-classifier", "inputs": {"text": "great"}})
    assert set(job["result"]["output"]) == {"label", "score", "scores"}
    job = submit_and_wait(client, {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}})
    assert job["result"]["output"]["logits"]["shape"] == [1, 3]


def test_wait_on_jobs_endpoint_and_202_while_pending(client):
    response = client.post(
        "/serve", json={"model_id": "tiny-gpt2", "inputs": {"text": "x"}, "parameters": {"max_length": 64}}
    )
    job_id = response.get_json()["job_id"]
    finished = client.get(f"/jobs/{job_id}?wait=60")
    assert finished.status_code == 200
    assert finished.get_json()["status"] == "succeeded"
    # ?wait is capped by AETHERCORE_MAX_WAIT instead of rejected.
    assert client.get(f"/jobs/{job_id}?wait=3600").status_code == 200


def test_model_stays_resident_between_requests(client):
    client.post("/models/minilm/load?wait=60")
    first = embed(client, "minilm", "one")["result"]
    second = embed(client, "minilm", "two")["result"]
    assert "load_ms" not in first["timings"] and "load_ms" not in second["timings"]
    status = client.get("/models/minilm/status").get_json()
    assert status["state"] == "loaded"
    assert len({r["loaded_at"] for r in status["replicas"]}) == 1


def test_load_status_info_unload_cycle(client):
    response = client.post("/models/tiny-mlp/load?wait=60")
    assert response.status_code == 200
    job = response.get_json()
    assert job["kind"] == "load" and job["status"] == "succeeded"
    assert job["result"]["state"] == "loaded" and len(job["result"]["replicas"]) == 1

    status = client.get("/models/tiny-mlp/status").get_json()
    assert status["state"] == "loaded" and status["device"] == "cpu"
    replica = status["replicas"][0]
    assert replica["device"] == "cpu" and replica["memory_bytes"] > 0 and replica["loaded_at"] > 0

    info = client.get("/models/tiny-mlp/info").get_json()
    assert info["config"]["model_type"] == "pytorch"
    assert info["loaded"]["inputs"] == [{"name": "features", "shape": [-1, 4], "datatype": "FP32"}]
    assert [o["name"] for o in info["loaded"]["outputs"]] == ["logits", "probabilities"]
    assert info["loaded"]["parameter_count"] == 4 * 16 + 16 + 16 * 3 + 3

    again = client.post("/models/tiny-mlp/load?wait=60").get_json()  # no-op success
    assert again["status"] == "succeeded"

    unloaded = client.post("/models/tiny-mlp/unload?wait=60").get_json()
    assert unloaded["status"] == "succeeded" and unloaded["result"]["state"] == "unloaded"
    status = client.get("/models/tiny-mlp/status").get_json()
    assert status["state"] == "unloaded" and status["replicas"] == []
    assert client.post("/models/tiny-mlp/unload?wait=60").get_json()["status"] == "succeeded"  # no-op


def test_serving_an_unloaded_model_loads_it_first(client):
    client.post("/models/tiny-classifier/unload?wait=60")
    assert client.get("/models/tiny-classifier/status").get_json()["state"] == "unloaded"
    job = submit_and_wait(client, {"model_id": "tiny-classifier", "inputs": {"text": "lazy"}})
    assert job["status"] == "succeeded"
    assert job["result"]["timings"]["load_ms"] > 0
    assert client.get("/models/tiny-classifier/status").get_json()["state"] == "loaded"


def test_models_list_shows_every_configured_model(client):
    body = client.get("/models").get_json()
    ids = {m["model_id"] for m in body["models"]}
    demos = {"minilm", "minilm-onnx", "tiny-gpt2", "tiny-mlp", "tiny-classifier", "bert-base-uncased"}
    assert demos | {"sim-h100", "sim-gpt2-h100"} == ids
    for model in body["models"]:
        assert model["state"] in {"unloaded", "loading", "loaded", "unloading", "failed"}


def test_unavailable_huggingface_model_fails_fast_with_clear_error(client):
    job = client.post("/models/bert-base-uncased/load?wait=60").get_json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_unavailable"
    assert "not in the local Hugging Face cache" in job["error"]["message"]
    status = client.get("/models/bert-base-uncased/status").get_json()
    assert status["state"] == "failed" and "Hugging Face" in status["error"]["message"]
    served = submit_and_wait(client, {"model_id": "bert-base-uncased", "inputs": {"text": "x"}})
    assert served["status"] == "failed" and served["error"]["code"] == "model_unavailable"


def test_bad_tensor_input_fails_only_that_job(client_without_signatures, main_worker):
    # The signature unknown to the API (no worker published it yet), the worker's check is what fails the job.
    client = client_without_signatures
    job = submit_and_wait(client, {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2]]}})
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_input"
    assert "shape" in job["error"]["message"]
    assert main_worker.proc.poll() is None
    assert (
        submit_and_wait(client, {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}})["status"]
        == "succeeded"
    )


@pytest.mark.parametrize(
    "path,method",
    [
        ("/models/nope/status", "get"),
        ("/models/nope/info", "get"),
        ("/models/nope/load", "post"),
        ("/models/nope/unload", "post"),
    ],
)
def test_unknown_model_is_404(client, path, method):
    response = getattr(client, method)(path)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "model_not_found"


def test_unknown_model_on_serve_and_unknown_job(client):
    response = client.post("/serve", json={"model_id": "nope", "inputs": {"text": "x"}})
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "model_not_found"
    for job_id in ("0" * 32, "not-a-job", "x" * 500):
        response = client.get(f"/jobs/{job_id}")
        assert response.status_code == 404 and response.get_json()["error"]["code"] == "job_not_found"


@pytest.mark.parametrize(
    "body,field",
    [
        ({"inputs": {"text": "x"}}, "model_id"),
        ({"model_id": "minilm"}, "inputs"),
        ({"model_id": "minilm", "inputs": "text"}, "inputs"),
        ({"model_id": "minilm", "inputs": {"text": "x"}, "extra": 1}, "extra"),
        ({"model_id": "minilm", "inputs": {"text": ""}}, "inputs.text"),
        ({"model_id": "minilm", "inputs": {"text": "x"}, "parameters": {"max_length": -1}}, "parameters.max_length"),
        ({"model_id": "minilm", "inputs": {"text": "x"}, "parameters": {"max_length": 10**9}}, "parameters.max_length"),
        ({"model_id": "../etc", "inputs": {"text": "x"}}, "model_id"),
    ],
)
def test_invalid_body_is_422_with_field_errors(client, body, field):
    response = client.post("/serve", json=body)
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["details"]


def test_malformed_json_and_unknown_route_are_json_errors(client):
    response = client.post("/serve", data="{not json", content_type="application/json")
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "bad_request"
    response = client.get("/no/such/route")
    assert response.status_code == 404 and response.is_json
    response = client.delete("/models")
    assert response.status_code == 405 and response.get_json()["error"]["code"] == "method_not_allowed"


def test_health_heartbeat_metrics(client):
    health = client.get("/health")
    assert health.status_code == 200
    body = health.get_json()
    assert body["status"] == "ok" and body["checks"]["redis"]["status"] == "ok"
    assert body["checks"]["workers"]["live"] >= 1
    assert client.get("/heartbeat").status_code == 200
    client.post("/models/minilm/load?wait=60")
    metrics = client.get("/metrics").get_data(as_text=True)
    assert re.search(r'aethercore_requests_total\{endpoint="/health",method="GET",status="200"\} [1-9]', metrics)
    assert "aethercore_request_duration_seconds_bucket" in metrics
    memory = re.search(
        r'aethercore_model_memory_usage_bytes\{device="cpu",model="minilm",worker="cpu\.[^"]+"\} '
        r"(\S+)",
        metrics,
    )
    # Measured in the model process: the private memory loading it added (91 MB of weights, the tokenizer,
    # allocator caches), not the shared torch libraries every process maps.
    assert memory and 80e6 < float(memory.group(1)) < 200e6
    active = re.search(r"^aethercore_active_models (\d+)", metrics, re.M)
    assert active and int(active.group(1)) >= 1


def test_openapi_and_offline_docs(client):
    spec = client.get("/openapi.json").get_json()
    assert {"/serve", "/jobs/{job_id}", "/models", "/health"} <= set(spec["paths"])
    page = client.get("/docs").get_data(as_text=True)
    assert "/docs/assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
