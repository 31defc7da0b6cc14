"""Verified model artifacts and the model-store boundary (model_store/verify.py, model_store/paths.py),
on real files: a copy of the demo tiny-gpt2 that is tampered with in each way a test names."""

import hashlib
import shutil

import pytest

from config.models import ConfigError, ModelSpec, load_models
from config.settings import Settings
from model_store.paths import ModelPathForbidden, resolve_model_path
from model_store.verify import MANIFEST_NAME, ArtifactRejected, verify_artifact, write_manifest


@pytest.fixture()
def store(tmp_path):
    """A model store holding a copy of tiny-gpt2 with its manifest."""
    source = Settings.from_env().model_store / "tiny-gpt2"
    shutil.copytree(source, tmp_path / "store" / "gpt")
    write_manifest(tmp_path / "store" / "gpt")
    return tmp_path / "store"


def settings_for(store, roots=()):
    return Settings.from_env().with_overrides(model_store=store, model_roots=tuple(roots))


def spec(model_path="gpt", **fields) -> ModelSpec:
    return ModelSpec(
        id="m",
        name="m",
        model_type="transformer",
        source="local",
        model_path=model_path,
        task="text-generation",
        **fields,
    )


def test_a_verified_directory_passes_and_every_tampering_is_named(store):
    settings = settings_for(store)
    verify_artifact(spec(manifest=True), settings, store / "gpt")

    weights = store / "gpt" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped
    with pytest.raises(ArtifactRejected, match="model.safetensors does not match"):
        verify_artifact(spec(manifest=True), settings, store / "gpt")
    weights.write_bytes(original)

    (store / "gpt" / "pytorch_model.bin").write_bytes(b"slipped in beside verified files")
    with pytest.raises(ArtifactRejected, match="pytorch_model.bin holds weights but is not in"):
        verify_artifact(spec(manifest=True), settings, store / "gpt")
    (store / "gpt" / "pytorch_model.bin").unlink()

    (store / "gpt" / "config.json").unlink()
    with pytest.raises(ArtifactRejected, match="config.json is listed in .* but missing"):
        verify_artifact(spec(manifest=True), settings, store / "gpt")

    (store / "gpt" / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactRejected, match="cannot read its manifest"):
        verify_artifact(spec(manifest=True), settings, store / "gpt")


def test_a_single_file_is_checked_against_its_sha256(store):
    settings = settings_for(store)
    file = store / "gpt" / "model.safetensors"
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    verify_artifact(spec("gpt/model.safetensors", sha256=digest), settings, file)
    with pytest.raises(ArtifactRejected, match="does not match its declared sha256"):
        verify_artifact(spec("gpt/model.safetensors", sha256="0" * 64), settings, file)
    with pytest.raises(ArtifactRejected, match="single file"):
        verify_artifact(spec(sha256=digest), settings, store / "gpt")


def test_pickle_weights_are_refused_unless_the_model_allows_them(store):
    settings = settings_for(store)
    pickled = store / "pickled"
    pickled.mkdir()
    shutil.copy(store / "gpt" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle would run code here")
    with pytest.raises(ArtifactRejected, match="pytorch_model.bin is pickle-based"):
        verify_artifact(spec("pickled"), settings, pickled)
    verify_artifact(spec("pickled", allow_pickle=True), settings, pickled)
    (store / "weights.pt").write_bytes(b"x")
    with pytest.raises(ArtifactRejected, match="weights.pt is pickle-based"):
        verify_artifact(spec("weights.pt"), settings, store / "weights.pt")
    verify_artifact(spec(), settings, store / "gpt")  # safetensors: the default path


def test_model_paths_cannot_leave_the_model_store(store, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(store / "gpt", outside)
    settings = settings_for(store)
    assert resolve_model_path(spec(), settings) == store / "gpt"
    with pytest.raises(ModelPathForbidden, match="outside the model store"):
        resolve_model_path(spec(str(outside)), settings)  # absolute, outside every root
    (store / "link").symlink_to(outside)
    with pytest.raises(ModelPathForbidden):
        resolve_model_path(spec("link"), settings)  # a symlink that leads out
    assert resolve_model_path(spec(str(outside)), settings_for(store, [tmp_path])) == outside  # a declared root


def test_models_yaml_refuses_dot_dot_and_bad_digests(tmp_path):
    for fields, needle in (
        ("model_path: ../secrets", "may not contain '..'"),
        ("model_path: a/../../b", "may not contain '..'"),
        ("model_path: x\n    sha256: abc", "64 hexadecimal digits"),
        ("model_path: x\n    allow_pickle: 'yes'", "true or false"),
        (f"model_path: x\n    manifest: true\n    sha256: {'a' * 64}", "exclude each other"),
    ):
        path = tmp_path / "models.yaml"
        path.write_text(f"models:\n  m:\n    model_type: transformer\n    {fields}\n")
        with pytest.raises(ConfigError, match=needle):
            load_models(path)


def test_the_demo_models_are_declared_with_their_manifests():
    settings = Settings.from_env()
    for model_id, model in load_models(settings.models_file).items():
        if model.source == "local":
            assert model.manifest is True, model_id
            verify_artifact(model, settings, resolve_model_path(model, settings))
