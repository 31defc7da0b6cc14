"""Which device queue a model's jobs go to (tasks/routing.py), against a real redis-server's cluster state."""

import dataclasses

import pytest

from config.models import load_models
from config.settings import Settings
from tasks.cluster import ClusterState
from tasks.routing import NoDeviceAvailable, resolve_device


@pytest.fixture()
def cluster(scratch_redis):
    return ClusterState(scratch_redis, worker_ttl_s=30)


@pytest.fixture(scope="module")
def spec():
    return load_models(Settings.from_env().models_file)["minilm"]


def worker(cluster, name, device, gpu_free=None):
    memory = {"gpu_free_bytes": gpu_free} if gpu_free is not None else {}
    cluster.publish_worker({"name": name, "device": device, "models": {}, "failures": {}, "memory": memory})


def test_fixed_devices_go_to_their_own_queue(cluster, spec):
    assert resolve_device(dataclasses.replace(spec, device="cpu"), cluster, "auto") == "cpu"
    assert resolve_device(dataclasses.replace(spec, device="cuda:1"), cluster, "auto") == "cuda:1"


def test_auto_picks_the_gpu_with_the_most_free_memory_and_falls_back_to_the_cpu(cluster, spec):
    auto = dataclasses.replace(spec, device="auto")
    assert resolve_device(auto, cluster, "auto") == "cpu"  # no GPU worker alive
    worker(cluster, "a", "cuda:0", gpu_free=1 << 30)
    worker(cluster, "b", "cuda:1", gpu_free=4 << 30)
    worker(cluster, "c", "cpu")
    assert resolve_device(auto, cluster, "auto") == "cuda:1"
    assert resolve_device(auto, cluster, "false") == "cpu"  # GPUs switched off


def test_cuda_without_a_gpu_is_a_clear_error(cluster, spec):
    cuda = dataclasses.replace(spec, device="cuda")
    with pytest.raises(NoDeviceAvailable, match="no GPU worker is alive"):
        resolve_device(cuda, cluster, "auto")
    with pytest.raises(NoDeviceAvailable, match="AETHERCORE_GPU_ENABLED=false"):
        resolve_device(cuda, cluster, "false")


def test_a_model_meant_to_be_resident_somewhere_keeps_going_there(cluster, spec):
    worker(cluster, "b", "cuda:1", gpu_free=4 << 30)
    cluster.desire(spec.id, "cpu")
    assert resolve_device(dataclasses.replace(spec, device="auto"), cluster, "auto") == "cpu"
