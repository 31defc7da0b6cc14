"""Model signatures without loading: declared in models.yaml, read from the artifact's files, given by the task;
and the check a tensor request gets against them before anything is queued."""

import json
import shutil
from pathlib import Path

import pytest

from config.models import load_models
from config.signatures import ARTIFACT, DECLARED, Signature, TensorSpec, task_signature, tensor_input_errors
from config.values import ConfigError
from model_store.signatures import SIGNATURE_FILE, read_signature, write_signature

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / "model_store" / "artifacts"
MLP = Signature((TensorSpec("features", "FP32", (-1, 4)),), (TensorSpec("logits", "FP32", (-1, 3)),), DECLARED)

DECLARED_YAML = """
models:
  scorer:
    model_type: onnx
    model_path: scorer/model.onnx
    task: tensor
    inputs:
      - {name: x, datatype: FP32, shape: [-1, 8]}
      - {name: mask, datatype: BOOL, shape: [-1, 8]}
    outputs:
      - {name: y, datatype: FP32, shape: [-1]}
"""


def test_models_yaml_declares_a_signature(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(DECLARED_YAML)
    spec = load_models(path)["scorer"]
    assert spec.signature.source == DECLARED
    assert spec.signature.inputs == (TensorSpec("x", "FP32", (-1, 8)), TensorSpec("mask", "BOOL", (-1, 8)))
    assert spec.public()["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1]}]


@pytest.mark.parametrize(
    "inputs,outputs,needle",
    [
        ("[{name: x, datatype: FP33, shape: [1]}]", "[{name: y, datatype: FP32, shape: [1]}]", "FP33"),
        ("[{name: x, datatype: FP32, shape: [-2]}]", "[{name: y, datatype: FP32, shape: [1]}]", "-2"),
        ("[{name: x, datatype: FP32, shape: [1]}]", None, "'outputs'"),
        ("[{name: x, datatype: FP32, shape: [1]}, {name: x, datatype: FP32, shape: [1]}]", "[]", "twice"),
    ],
)
def test_a_bad_declared_signature_names_the_model_and_field(tmp_path, inputs, outputs, needle):
    body = "models:\n  m:\n    model_type: pytorch\n    model_path: m\n"
    body += f"    inputs: {inputs}\n" + (f"    outputs: {outputs}\n" if outputs is not None else "")
    path = tmp_path / "models.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match="model 'm'") as error:
        load_models(path)
    assert needle in str(error.value)


def test_signatures_read_from_the_artifacts_without_loading(tmp_path):
    # An ONNX text model with no config.json and no stored signature: the hidden size comes from the graph.
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    shutil.copy(STORE / "minilm-onnx" / "model.onnx", onnx_dir / "model.onnx")
    embedding = read_signature(onnx_dir / "model.onnx", "feature-extraction", "onnx")
    assert embedding.outputs == (TensorSpec("embedding", "FP32", (-1, 384)),) and embedding.source == ARTIFACT
    # The same graph as a tensor model: its real input and output names, dynamic dimensions as -1.
    graph = read_signature(onnx_dir / "model.onnx", "tensor", "onnx")
    assert [(t.name, t.datatype, len(t.shape)) for t in graph.inputs] == [
        ("input_ids", "INT64", 2),
        ("attention_mask", "INT64", 2),
    ]
    assert graph.outputs[0].shape[-1] == 384 and graph.outputs[0].shape[0] == -1
    # A transformers classifier: the labels from its config.json.
    classifier = read_signature(STORE / "tiny-classifier", "text-classification", "transformer")
    assert TensorSpec("scores", "FP32", (-1, 2)) in classifier.outputs
    # Stored beside the artifact by bootstrap, then read back as it is.
    write_signature(onnx_dir, "tensor", "onnx")
    stored = json.loads((onnx_dir / SIGNATURE_FILE).read_text())
    assert stored["inputs"][0]["name"] == "input_ids"
    assert read_signature(onnx_dir / "model.onnx", "tensor", "onnx").inputs == graph.inputs


def test_every_demo_model_has_its_signature_beside_it():
    for name in ("minilm", "minilm-onnx", "tiny-gpt2", "tiny-classifier", "tiny-mlp"):
        assert (STORE / name / SIGNATURE_FILE).is_file(), name
    assert task_signature("tensor") is None  # a tensor model's names can only come from its artifact or models.yaml


@pytest.mark.parametrize(
    "inputs,field,needle",
    [
        ({"features": [[1, 2, 3, 4], [5, 6, 7, 8.5]]}, None, None),
        ({"features": {"shape": [2, 4], "data": list(range(8))}}, None, None),
        ({"features": {"data": [[1, 2, 3, 4]], "datatype": "FP32"}}, None, None),
        ({"features": [[1, 2, 3]]}, "inputs.features", "[1, 3], the model takes [-1, 4]"),
        ({"features": [[1, 2, 3, 4], [1, 2]]}, "inputs.features", "not rectangular"),
        ({"features": [[1, 2, 3, True]]}, "inputs.features", "only numbers"),
        ({"features": [[1, 2, 3, "4"]]}, "inputs.features", "only numbers"),
        ({"features": {"shape": [2, 4], "data": [1, 2]}}, "inputs.features.shape", "does not hold"),
        ({"features": {"datatype": "INT64", "data": [[1, 2, 3, 4]]}}, "inputs.features.datatype", "'INT64'"),
        ({"features": {"shape": [0, 4], "data": []}}, "inputs.features", "no elements"),
        ({"feature": [[1, 2, 3, 4]]}, "inputs", "missing ['features'], unknown ['feature']"),
        ("features", "inputs", "object of named tensors"),
    ],
)
def test_tensor_requests_against_the_signature(inputs, field, needle):
    errors = tensor_input_errors(MLP, inputs)
    if field is None:
        assert errors == {}
    else:
        assert needle in errors[field][0], errors


@pytest.mark.parametrize(
    "datatype,fits,too_big",
    [
        ("UINT16", 65535, 65536),
        ("UINT32", 2**32 - 1, 2**32),
        ("UINT64", 2**64 - 1, 2**64),
        ("INT16", -32768, 32768),
    ],
)
def test_every_integer_datatype_of_the_protocol_is_declared_and_bounded(datatype, fits, too_big):
    """A model may declare any OIP integer datatype (an ONNX graph's uint16 input included); a value outside it is
    refused by the API, not overflowed in the worker."""
    signature = Signature(
        (TensorSpec("ids", datatype, (-1,)),), (), DECLARED
    )  # as models.yaml's `inputs:` would declare it
    assert tensor_input_errors(signature, {"ids": {"datatype": datatype, "data": [0, fits]}}) == {}
    errors = tensor_input_errors(signature, {"ids": {"datatype": datatype, "data": [0, too_big]}})
    assert "whole numbers from" in errors["inputs.ids"][0], errors
