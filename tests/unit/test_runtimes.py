"""The runtimes in-process, on the real demo models."""

import numpy as np
import pytest

from config.signatures import TENSOR_DATATYPES
from model_store.bootstrap import minilm_source_dir
from tasks.tensors import DTYPES, pack
from workers.runtimes import InvalidInput, create_runtime

SENTENCES = ["Hello world", "AetherCore keeps models resident in worker memory.", "short", "a " * 40]


@pytest.fixture(scope="module")
def runtime(settings, models):
    cache = {}

    def get(model_id):
        if model_id not in cache:
            cache[model_id] = create_runtime(models[model_id], settings, "cpu")
            cache[model_id].load()
        return cache[model_id]

    return get


@pytest.fixture(scope="module")
def reference_embeddings():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_source_dir()), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=True)


def test_minilm_matches_sentence_transformers(runtime, reference_embeddings):
    vectors = np.array([o["embedding"] for o in runtime("minilm").run_batch([{"text": s} for s in SENTENCES], {})])
    assert vectors.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = (vectors * reference_embeddings).sum(axis=1)
    assert cosines.min() > 0.99999


def test_onnx_agrees_with_pytorch(runtime):
    inputs = [{"text": s} for s in SENTENCES]
    torch_vectors = np.array([o["embedding"] for o in runtime("minilm").run_batch(inputs, {})])
    onnx_vectors = np.array([o["embedding"] for o in runtime("minilm-onnx").run_batch(inputs, {})])
    assert ((torch_vectors * onnx_vectors).sum(axis=1)).min() > 0.999


@pytest.mark.parametrize("model_id", ["minilm", "minilm-onnx"])
def test_padding_does_not_change_an_embedding(runtime, model_id):
    alone = np.array(runtime(model_id).run({"text": "short"}, {})["embedding"])
    padded = np.array(runtime(model_id).run_batch([{"text": "short"}, {"text": "a " * 60}], {})[0]["embedding"])
    assert 1 - alone @ padded < 1e-5


def test_max_length_truncates_encoder_input(runtime):
    long_text = "word " * 200
    full = np.array(runtime("minilm").run({"text": long_text}, {"max_length": 256})["embedding"])
    cut = np.array(runtime("minilm").run({"text": long_text}, {"max_length": 8})["embedding"])
    same = np.array(runtime("minilm").run({"text": "word " * 6}, {"max_length": 256})["embedding"])
    assert 1 - full @ cut > 1e-4  # truncation changed the input
    assert 1 - cut @ same < 1e-5  # to exactly the first 6 words plus [CLS]/[SEP]


@pytest.mark.parametrize("budget", [1, 5, 17])
def test_generation_produces_max_length_new_tokens(runtime, budget):
    out = runtime("tiny-gpt2").run({"text": "Once upon a time"}, {"max_length": budget})
    assert out["tokens"] == budget
    assert out["finish_reason"] == "length"
    assert isinstance(out["text"], str) and out["text"]


def test_generation_streams_pieces_that_add_up_to_the_text(runtime):
    pieces: dict[int, list[str]] = {0: [], 1: []}
    results = runtime("tiny-gpt2").generate_all(
        [{"text": "Hello"}, {"text": "Once upon a time there"}],
        {"max_length": 8},
        on_text=lambda i, piece: pieces[i].append(piece),
    )
    for index, out in results:
        assert len(pieces[index]) >= 2
        assert "".join(pieces[index]) == out["text"]


def test_classification_scores_sum_to_one(runtime):
    out = runtime("tiny-classifier").run({"text": "I like this"}, {})
    assert out["label"] in {"negative", "positive"}
    assert sum(out["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert out["score"] == max(out["scores"].values())


def test_tensor_model_takes_named_tensors(runtime):
    mlp = runtime("tiny-mlp")
    out = mlp.run({"features": {"shape": [3, 4], "datatype": "FP32", "data": list(range(12))}}, {})
    assert out["logits"]["shape"] == [3, 3]
    assert out["probabilities"]["datatype"] == "FP32"
    probabilities = np.array(out["probabilities"]["data"]).reshape(3, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    nested = mlp.run({"features": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]}, {})
    packed = mlp.run({"features": pack(np.arange(12, dtype="<f4").reshape(3, 4))}, {})  # as OIP sends it
    for other in (nested, packed):
        assert other.keys() == out.keys()
        for name, tensor in out.items():
            assert other[name]["shape"] == tensor["shape"] and other[name]["datatype"] == tensor["datatype"]
            np.testing.assert_array_equal(other[name]["data"], tensor["data"])
    # Batch 3 works although the export was traced at batch 2 (dynamic batch dimension).
    assert mlp.describe()["inputs"] == [{"name": "features", "shape": [-1, 4], "datatype": "FP32"}]


@pytest.mark.parametrize(
    "model_id,inputs,parameters",
    [
        ("minilm", {"text": ""}, {}),
        ("minilm", {"txt": "x"}, {}),
        ("minilm", {"text": "x"}, {"max_length": -3}),
        ("minilm", {"text": "x"}, {"max_length": float("nan")}),
        ("tiny-gpt2", {"text": "x"}, {"max_length": 10**9}),
        ("tiny-mlp", {"features": [[1, 2, 3]]}, {}),
        ("tiny-mlp", {"other": [[1, 2, 3, 4]]}, {}),
        ("tiny-mlp", {"features": [[1, 2, "x", 4]]}, {}),
        ("tiny-mlp", {"features": [[1, 2, float("nan"), 4]]}, {}),
        ("tiny-mlp", {"features": {"shape": [2, 4], "data": [1, 2]}}, {}),
    ],
)
def test_bad_inputs_raise_invalid_input(runtime, model_id, inputs, parameters):
    with pytest.raises(InvalidInput):
        runtime(model_id).run(inputs, parameters)


def test_every_packable_datatype_is_accepted_by_the_model_process():
    from tasks.tensors import DTYPES
    from workers.runtimes.tensors import decode_tensor, encode_tensor

    for name, dtype in DTYPES.items():
        array = np.zeros((2, 3), dtype=dtype)
        assert decode_tensor("x", pack(array), "FP32").dtype == dtype, name
        assert decode_tensor("x", {"datatype": name, "shape": [2, 3], "data": [0] * 6}, "FP32").dtype == dtype
        assert encode_tensor(array)["datatype"] == name


def test_every_numeric_datatype_a_model_may_declare_is_read_from_an_onnx_graph():
    """An ONNX input of any OIP numeric type gets that datatype in the model's signature, read from the graph
    without loading it (model_store/signatures.py) and from the loaded session (the runtime's describe)."""
    import onnx

    from model_store.signatures import _ONNX_TYPES
    from workers.runtimes.onnx import _ORT_TYPES

    assert set(_ORT_TYPES.values()) == set(TENSOR_DATATYPES)
    for code, datatype in _ONNX_TYPES.items():
        assert onnx.helper.tensor_dtype_to_np_dtype(code) == DTYPES.get(datatype, np.dtype(object)), datatype
    assert set(_ONNX_TYPES.values()) == {*TENSOR_DATATYPES, "BYTES"}
