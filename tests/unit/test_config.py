from pathlib import Path

import pytest

from config.models import load_models
from config.settings import SETTINGS, Settings
from config.units import parse_size
from config.values import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_match_the_seed():
    s = Settings.from_env({})
    assert (s.host, s.port, s.workers, s.log_level) == ("0.0.0.0", 8001, 1, "INFO")
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.gpu_enabled == "auto"
    assert s.model_cache_size == 10**9
    assert s.effective_broker_url == s.redis_url


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"AETHERCORE_PORT": "99999"}, "AETHERCORE_PORT='99999'"),
        ({"AETHERCORE_MODEL_CACHE_SIZE": "lots"}, "AETHERCORE_MODEL_CACHE_SIZE='lots'"),
        ({"AETHERCORE_GPU_ENABLED": "maybe"}, "AETHERCORE_GPU_ENABLED='maybe'"),
        ({"AETHERCORE_REDIS_URL": "http://x"}, "AETHERCORE_REDIS_URL='http://x'"),
        ({"AETHERCORE_AUTOLOAD": "perhaps"}, "AETHERCORE_AUTOLOAD='perhaps'"),
    ],
)
def test_bad_setting_names_the_variable_and_value(env, needle):
    with pytest.raises(ConfigError, match=needle.replace("?", r"\?")):
        Settings.from_env(env)


def test_sizes():
    assert parse_size("1GB") == 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size(1024) == 1024
    with pytest.raises(ValueError):
        parse_size("-1GB")


def test_shipped_models_yaml_is_valid():
    models = load_models(REPO / "config" / "models.yaml")
    assert {"minilm", "minilm-onnx", "tiny-gpt2", "tiny-mlp", "bert-base-uncased"} <= set(models)
    assert models["bert-base-uncased"].source == "huggingface"
    assert models["minilm-onnx"].providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    # Generation: a running batch of requests (continuous batching) and a KV-cache budget; encoders none.
    assert models["tiny-gpt2"].max_batch_size == 64 and models["tiny-gpt2"].kv_cache_memory == 64_000_000
    assert models["minilm"].kv_cache_memory is None
    # The simulated devices: no files, a declared signature, nothing reserved (no cache modelled).
    sim, gpt = models["sim-h100"], models["sim-gpt2-h100"]
    assert not sim.has_files and sim.autoload and gpt.autoload and gpt.kv_cache_memory is None
    assert (sim.simulate.base_ms, sim.simulate.per_item_ms, sim.simulate.dim) == (3.0, 0.113, 384)
    assert sim.signature.outputs[0].shape == (-1, 384) and gpt.max_batch_size == 256


@pytest.mark.parametrize(
    "body,needle",
    [
        ("models:\n  m1:\n    model_type: keras\n    model_path: x\n", "model 'm1': field 'model_type': 'keras'"),
        (
            "models:\n  m1:\n    model_type: onnx\n    model_path: x\n    device: tpu\n",
            "model 'm1': field 'device': 'tpu'",
        ),
        (
            "models:\n  m1:\n    model_type: pytorch\n    model_path: x\n    task: text-generation\n",
            "model 'm1': field 'task': 'text-generation'",
        ),
        ("models:\n  m1:\n    model_type: transformer\n", "model 'm1': field 'model_path': None"),
        (
            "models:\n  m1:\n    model_type: transformer\n    model_path: x\n    max_memory: huge\n",
            "model 'm1': field 'max_memory': 'huge'",
        ),
        ("models:\n  m1:\n    model_type: transformer\n    model_path: x\n    colour: red\n", "field 'colour'"),
        ("models:\n  'bad id!':\n    model_type: transformer\n    model_path: x\n", "model id 'bad id!'"),
        ("models: [1, 2]\n", "top-level 'models:' mapping"),
        ("models:\n  m1: {model_type: onnx, model_path: m.onnx, task: feature-extraction}\n", "field 'tokenizer_path'"),
        (
            "models:\n  m1: {model_type: transformer, model_path: x, task: text-generation, kv_cache_memory: lots}\n",
            "model 'm1': field 'kv_cache_memory': 'lots'",
        ),
        (
            "models:\n  m1: {model_type: transformer, model_path: x, kv_cache_memory: 1GB}\n",
            "field 'kv_cache_memory': '1GB' applies to text-generation only",
        ),
        # A simulated device: its profile checked field by field, and no files.
        ("models:\n  s: {model_type: simulated}\n", "model 's': field 'simulate': None is required"),
        (
            "models:\n  s: {model_type: simulated, simulate: {base_ms: 1, per_item_ms: 0.1}}\n",
            "model 's': field 'simulate.dim': None is required",
        ),
        (
            "models:\n  s: {model_type: simulated, simulate: {base_ms: -1, per_item_ms: 0.1, dim: 8}}\n",
            "model 's': field 'simulate.base_ms': -1 must be a number of milliseconds",
        ),
        (
            "models:\n  s: {model_type: simulated, simulate: {base_ms: 1, per_item_ms: 0.1, dim: 0.5}}\n",
            "field 'simulate.dim': 0.5 must be a whole number from 1",
        ),
        (
            "models:\n  s:\n    model_type: simulated\n    task: text-generation\n"
            "    simulate: {step_ms: 1, per_row_ms: 0, dim: 4}\n",
            "field 'simulate.dim': 4 is not a text-generation field",
        ),
        (
            "models:\n  s:\n    model_type: simulated\n    task: text-generation\n"
            "    simulate: {step_ms: 1, per_row_ms: 0, memory: x}\n",
            "field 'simulate.memory': 'x' is invalid",
        ),
        (
            "models:\n  s: {model_type: simulated, model_path: x, simulate: {base_ms: 1, per_item_ms: 0, dim: 4}}\n",
            "field 'model_path': 'x' does not apply to a simulated model",
        ),
        (
            "models:\n  s: {model_type: simulated, task: tensor, simulate: {base_ms: 1, per_item_ms: 0, dim: 4}}\n",
            "field 'task': 'tensor' is not served by model_type 'simulated'",
        ),
        (
            "models:\n  m: {model_type: onnx, model_path: m.onnx, task: tensor, simulate: {base_ms: 1}}\n",
            "field 'simulate': {'base_ms': 1} applies to model_type 'simulated' only",
        ),
    ],
)
def test_bad_models_file_names_model_field_and_value(tmp_path, body, needle):
    path = tmp_path / "models.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_models(path)
    assert needle in str(info.value)


def test_readme_and_env_example_document_every_setting():
    readme = (REPO / "README.md").read_text()
    env_example = (REPO / ".env.example").read_text()
    for spec in SETTINGS:
        assert f"`{spec.env}`" in readme, f"{spec.env} missing from README's configuration table"
        assert f"{spec.env}=" in env_example, f"{spec.env} missing from .env.example"
