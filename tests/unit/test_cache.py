"""The resident model cache with real (tiny) models: budget, LRU eviction, freeing on unload."""

import gc
import weakref

import pytest

from model_store.paths import artifact_bytes, resolve_model_path
from workers.cache import ModelCache, ModelLoadError
from workers.runtimes import create_runtime


def make_cache(settings, budget, evicted=None):
    return ModelCache(
        budget,
        "cpu",
        factory=lambda spec: create_runtime(spec, settings, "cpu"),
        estimate=lambda spec: artifact_bytes(resolve_model_path(spec, settings)),
        on_evict=(evicted.append if evicted is not None else lambda _: None),
    )


def test_second_get_returns_the_resident_copy(settings, models):
    cache = make_cache(settings, 10**9)
    first = cache.load(models["tiny-mlp"])
    assert cache.load(models["tiny-mlp"]) is first
    assert cache.get("tiny-mlp") is first


def test_model_larger_than_budget_fails_clearly(settings, models):
    cache = make_cache(settings, 50 * 10**6)
    with pytest.raises(ModelLoadError) as info:
        cache.load(models["minilm"])
    assert info.value.code == "model_too_large"
    assert "AETHERCORE_MODEL_CACHE_SIZE" in str(info.value)
    assert cache.resident() == []


def test_least_recently_used_model_is_evicted(settings, models):
    evicted = []
    # minilm (91 MB) + tiny-gpt2 (19 MB) fit in 200 MB; adding minilm-onnx (91 MB) needs one eviction.
    cache = make_cache(settings, 200 * 10**6, evicted)
    cache.load(models["minilm"])
    cache.load(models["tiny-gpt2"])
    cache.get("minilm")  # loaded first but used last: tiny-gpt2 is now the least recently used
    cache.load(models["minilm-onnx"])
    assert evicted == ["tiny-gpt2"]
    assert cache.resident() == ["minilm", "minilm-onnx"]
    assert cache.used_bytes() <= cache.budget_bytes


def test_unload_drops_every_reference(settings, models):
    cache = make_cache(settings, 10**9)
    runtime = cache.load(models["tiny-gpt2"])
    model_ref = weakref.ref(runtime.model)
    del runtime
    assert cache.unload("tiny-gpt2")
    gc.collect()
    assert model_ref() is None
    assert cache.resident() == [] and cache.used_bytes() == 0
    assert not cache.unload("tiny-gpt2")  # unloading an unloaded model is a no-op


def test_missing_files_fail_with_the_fix(settings, models, tmp_path):
    cache = make_cache(settings.with_overrides(model_store=tmp_path), 10**9)
    with pytest.raises(ModelLoadError) as info:
        cache.load(models["minilm"])
    assert info.value.code == "model_unavailable"
    assert "manage.py models bootstrap" in str(info.value)


def test_huggingface_model_missing_from_cache_fails_fast(settings, models, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cache = make_cache(settings, 10**9)
    with pytest.raises(ModelLoadError) as info:
        cache.load(models["bert-base-uncased"])
    assert "not in the local Hugging Face cache" in str(info.value)


def test_threads_waiting_for_a_failing_load_share_its_failure(models):
    """A thread arriving while a load is already failing gets that failure instead of loading again."""
    import threading
    import time

    attempts = []

    def failing_factory(spec):
        attempts.append(spec.id)
        time.sleep(0.5)
        raise RuntimeError("weights are corrupt")

    cache = ModelCache(10**9, "cpu", factory=failing_factory, estimate=lambda spec: 0)
    errors = []

    def load():
        try:
            cache.load(models["tiny-mlp"])
        except ModelLoadError as exc:
            errors.append(exc)

    first = threading.Thread(target=load)
    first.start()
    time.sleep(0.1)  # the second arrives while the first load is in progress
    second = threading.Thread(target=load)
    second.start()
    first.join(5)
    second.join(5)
    assert len(errors) == 2
    assert attempts == ["tiny-mlp"]
    assert all("weights are corrupt" in str(e) for e in errors)
    # a later call (not waiting for that load) tries again
    with pytest.raises(ModelLoadError):
        cache.load(models["tiny-mlp"])
    assert len(attempts) == 2
