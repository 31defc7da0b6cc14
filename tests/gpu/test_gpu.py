"""GPU workers (skipped without CUDA; run them with scripts/gpu-check.sh on a machine with a GPU)."""

import numpy as np
import pytest

from tasks.names import job_events_key

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_cluster(redis_server):
    from tests.conftest import client_for, settings_for
    from tests.support import WorkerProcess

    url = redis_server.url(20)
    worker = WorkerProcess(url, name="gpu-worker", device="cuda:0").start()
    yield worker, client_for(settings_for(url))
    worker.stop()


def test_auto_places_models_on_the_gpu_and_serves_there(gpu_cluster):
    worker, client = gpu_cluster
    job = client.post("/models/minilm/load?wait=120").get_json()
    assert job["status"] == "succeeded" and job["result"]["device"] == "cuda:0"
    replica = client.get("/models/minilm/status").get_json()["replicas"][0]
    assert replica["device"] == "cuda:0" and replica["gpu_memory_bytes"] > 50_000_000
    served = client.post("/serve?wait=60", json={"model_id": "minilm", "inputs": {"text": "on the GPU"}}).get_json()
    assert served["result"]["device"] == "cuda:0"


def _onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(
    not _onnxruntime_has_cuda(),
    reason="this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu, requirements/worker-gpu.txt)",
)
def test_onnx_runs_with_the_cuda_provider(gpu_cluster):
    worker, client = gpu_cluster
    client.post("/models/minilm-onnx/load?wait=120")
    info = client.get("/models/minilm-onnx/info").get_json()
    assert info["loaded"]["providers"][0] == "CUDAExecutionProvider"
    a = client.post("/serve?wait=60", json={"model_id": "minilm", "inputs": {"text": "agree"}}).get_json()
    b = client.post("/serve?wait=60", json={"model_id": "minilm-onnx", "inputs": {"text": "agree"}}).get_json()
    assert float(np.dot(a["result"]["output"]["embedding"], b["result"]["output"]["embedding"])) > 0.999


def test_the_model_runs_in_its_own_process_and_the_worker_holds_no_cuda_context(gpu_cluster):
    worker, client = gpu_cluster
    client.post("/models/minilm/load?wait=120")
    record = worker.record()
    pid = record["models"]["minilm"]["info"]["processes"][0]["pid"]
    assert pid != worker.proc.pid
    maps = open(f"/proc/{worker.proc.pid}/maps").read()
    assert "libcuda" not in maps and "libtorch" not in maps


def test_unload_returns_gpu_memory(gpu_cluster):
    worker, client = gpu_cluster
    client.post("/models/minilm/unload?wait=60")
    client.post("/models/minilm-onnx/unload?wait=60")
    before = worker.record()["memory"]["gpu_allocated_bytes"]
    client.post("/models/minilm/load?wait=120")
    loaded = worker.record()["memory"]["gpu_allocated_bytes"]
    client.post("/models/minilm/unload?wait=60")
    from tests.support import wait_until

    wait_until(
        lambda: worker.record()["memory"]["gpu_allocated_bytes"] <= before,
        15,
        0.5,
        "GPU memory back to its level before the load",
    )
    assert loaded > before


def test_concurrent_generations_share_one_running_batch_on_the_gpu(gpu_cluster):
    """Continuous batching on CUDA: the scheduler's tensors, cache and generators live on the GPU."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import redis

    worker, client = gpu_cluster
    assert client.post("/models/tiny-gpt2/load?wait=120").get_json()["status"] == "succeeded"
    bodies = [
        {"model_id": "tiny-gpt2", "inputs": {"text": f"Story {i}"}, "parameters": {"max_length": 24}} for i in range(16)
    ]
    bodies.append(
        {
            "model_id": "tiny-gpt2",
            "inputs": {"text": "Story"},
            "parameters": {"max_length": 24, "do_sample": True, "temperature": 0.8, "seed": 3},
        }
    )
    with ThreadPoolExecutor(17) as pool:
        jobs = list(pool.map(lambda body: client.post("/serve?wait=60", json=body).get_json(), bodies))
    r = redis.Redis.from_url(worker.redis_url, decode_responses=True)
    for job in jobs:
        assert job["status"] == "succeeded" and job["result"]["device"] == "cuda:0", job
        output = job["result"]["output"]
        assert output["tokens"] == 24
        chunks = [e for _id, e in r.xrange(job_events_key(job["job_id"])) if e["type"] == "chunk"]
        assert [int(e["index"]) for e in chunks] == list(range(len(chunks)))
        assert "".join(json.loads(e["data"])["text"] for e in chunks) == output["text"]
    assert max(job["result"]["timings"]["batch_size"] for job in jobs) > 1
