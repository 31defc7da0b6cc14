"""Open Inference Protocol v2 with the stock client: `tritonclient.http` against a running API (auth on) and a
real worker, with its default arguments (binary inputs, binary outputs), and what it gets when it is wrong."""

import numpy as np
import pytest
import requests
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.conftest import submit_and_wait
from tests.support import ADMIN_KEY, USER_KEY


def auth() -> dict[str, str]:
    """A fresh dict each call: tritonclient writes Inference-Header-Content-Length into the one it is given."""
    return {"Authorization": f"Bearer {USER_KEY}"}


@pytest.fixture(scope="module")
def triton(auth_api_server):
    client = triton_http.InferenceServerClient(url=auth_api_server.base.removeprefix("http://"))
    yield client
    client.close()


def text_input(texts: list[str], name: str = "text") -> triton_http.InferInput:
    tensor = triton_http.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))  # binary, the default
    return tensor


def test_health_and_server_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()  # open probes, like /health/*
    metadata = triton.get_server_metadata(headers=auth())
    assert metadata["name"] == "aethercore" and "binary_tensor_data" in metadata["extensions"]
    with pytest.raises(InferenceServerException) as refused:
        triton.get_server_metadata()  # no credentials
    assert refused.value.status() == "401" and "credentials" in refused.value.message()


def test_model_metadata_is_known_without_loading(triton, auth_api_server):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    requests.post(f"{auth_api_server.base}/models/tiny-classifier/unload?wait=30", headers=admin, timeout=40)
    status = requests.get(f"{auth_api_server.base}/models/tiny-classifier/status", headers=auth(), timeout=10).json()
    assert status["state"] == "unloaded"
    classifier = triton.get_model_metadata("tiny-classifier", headers=auth())
    assert classifier["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {"name": "scores", "datatype": "FP32", "shape": [-1, 2]} in classifier["outputs"]
    mlp = triton.get_model_metadata("tiny-mlp", model_version="1", headers=auth())
    assert mlp["platform"] == "pytorch_torch_export" and mlp["versions"] == ["1"]
    assert mlp["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in mlp["outputs"]] == ["logits", "probabilities"]
    minilm = triton.get_model_metadata("minilm-onnx", headers=auth())
    assert minilm["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert triton.is_model_ready("minilm", headers=auth())  # autoload: a live worker takes it on first use
    with pytest.raises(InferenceServerException) as unknown:
        triton.get_model_metadata("no-such-model", headers=auth())
    assert unknown.value.status() == "404" and "no-such-model" in unknown.value.message()
    with pytest.raises(InferenceServerException) as version:
        triton.get_model_metadata("tiny-mlp", model_version="7", headers=auth())
    assert version.value.status() == "404"


def test_text_model_infer_with_the_clients_defaults_equals_serve(triton, client):
    texts = ["the quick brown fox", "a second, longer sentence about something else entirely", "third"]
    result = triton.infer("minilm", [text_input(texts)], headers=auth(), request_id="req-42")
    embeddings = result.as_numpy("embedding")
    assert embeddings.shape == (3, 384) and embeddings.dtype == np.float32
    assert result.get_response()["id"] == "req-42" and result.get_response()["model_name"] == "minilm"
    for text, vector in zip(texts, embeddings):
        alone = submit_and_wait(client, {"model_id": "minilm", "inputs": {"text": text}})
        assert np.allclose(vector, alone["result"]["output"]["embedding"], atol=1e-5)
    one = triton.infer("minilm", [text_input(texts[:1])], headers=auth()).as_numpy("embedding")
    assert np.allclose(one[0], embeddings[0], atol=1e-5)  # one row: a plain job, batched with /serve traffic


def test_tensor_model_infer_binary_and_json(triton, client):
    features = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    tensor = triton_http.InferInput("features", [3, 4], "FP32")
    tensor.set_data_from_numpy(features)
    result = triton.infer("tiny-mlp", [tensor], headers=auth())
    probabilities, logits = result.as_numpy("probabilities"), result.as_numpy("logits")
    assert probabilities.shape == (3, 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    served = submit_and_wait(client, {"model_id": "tiny-mlp", "inputs": {"features": features.tolist()}})
    assert np.allclose(logits, np.array(served["result"]["output"]["logits"]["data"]).reshape(3, 3), atol=1e-5)

    as_json = triton_http.InferInput("features", [3, 4], "FP32")
    as_json.set_data_from_numpy(features, binary_data=False)
    only = triton_http.InferRequestedOutput("probabilities", binary_data=False)
    chosen = triton.infer("tiny-mlp", [as_json], outputs=[only], headers=auth())
    response = chosen.get_response()
    assert [o["name"] for o in response["outputs"]] == ["probabilities"] and "data" in response["outputs"][0]
    assert np.allclose(chosen.as_numpy("probabilities"), probabilities, atol=1e-6)

    for algorithm in ("gzip", "deflate"):  # the client's request compression
        packed = triton.infer("tiny-mlp", [tensor], headers=auth(), request_compression_algorithm=algorithm)
        assert np.allclose(packed.as_numpy("logits"), logits, atol=1e-6)


def test_generation_takes_validated_parameters(triton):
    def generate(seed: int) -> tuple[str, str]:
        result = triton.infer(
            "tiny-gpt2",
            [text_input(["Once upon a time"])],
            headers=auth(),
            parameters={"max_length": 6, "temperature": 0.9, "top_k": 50, "seed": seed},
        )
        return result.as_numpy("text")[0].decode(), result.as_numpy("finish_reason")[0].decode()

    rows = triton.infer(
        "tiny-gpt2", [text_input(["One", "Two", "Three"])], headers=auth(), parameters={"max_length": 3}
    )
    assert rows.as_numpy("text").shape == (3,) and set(rows.as_numpy("finish_reason")) <= {b"length", b"stop"}
    first = generate(7)
    assert first == generate(7) and first[1] == "length"  # same seed and input: same text
    with pytest.raises(InferenceServerException) as bad:
        triton.infer("tiny-gpt2", [text_input(["x"])], headers=auth(), parameters={"temprature": 0.5})
    assert bad.value.status() == "422" and "temprature" in bad.value.message()


def jobs_of(base: str, model_id: str) -> int:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return len(requests.get(f"{base}/jobs?model_id={model_id}&limit=1000", headers=admin, timeout=10).json()["jobs"])


def test_mismatched_tensors_get_422_before_anything_is_queued(triton, auth_api_server):
    before = jobs_of(auth_api_server.base, "tiny-mlp")
    wrong_shape = triton_http.InferInput("features", [2, 5], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((2, 5), dtype=np.float32))
    wrong_name = triton_http.InferInput("inputs", [2, 4], "FP32")
    wrong_name.set_data_from_numpy(np.zeros((2, 4), dtype=np.float32))
    wrong_type = triton_http.InferInput("features", [2, 4], "INT64")
    wrong_type.set_data_from_numpy(np.zeros((2, 4), dtype=np.int64))
    for tensor, named in ((wrong_shape, "[2, 5]"), (wrong_name, "inputs"), (wrong_type, "INT64")):
        with pytest.raises(InferenceServerException) as refused:
            triton.infer("tiny-mlp", [tensor], headers=auth())
        assert refused.value.status() == "422" and named in refused.value.message()
    assert jobs_of(auth_api_server.base, "tiny-mlp") == before
    with pytest.raises(InferenceServerException) as unknown:
        triton.infer("no-such-model", [text_input(["x"])], headers=auth())
    assert unknown.value.status() == "404"


def test_malformed_binary_bodies_get_oip_errors(auth_api_server):
    url = f"{auth_api_server.base}/v2/models/minilm/infer"
    header = b'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":9}}]}'
    cut = requests.post(
        url,
        data=header + b"\x05\x00\x00\x00abc",  # says 9 bytes follow, and its element says 5: only 7 are there
        headers={**auth(), "Inference-Header-Content-Length": str(len(header))},
        timeout=10,
    )
    assert cut.status_code == 400 and "binary_data_size" in cut.json()["error"]
    not_json = requests.post(url, data=b"\x00\x01", headers=auth(), timeout=10)
    assert not_json.status_code == 400 and isinstance(not_json.json()["error"], str)
