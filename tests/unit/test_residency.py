"""Reconciling a worker's resident models with the desired state, against a real Redis and a real model cache."""

import threading
import time

from model_store.paths import estimate_bytes
from tasks.cluster import ClusterState
from workers.cache import ModelCache
from workers.residency import Residency
from workers.runtimes import create_runtime

# Long enough that a pass held up by the drain cannot pass for one that was not.
HELD_S = 30


def test_a_draining_unload_holds_up_no_other_model(settings, models, scratch_redis):
    """An unload drains for up to AETHERCORE_UNLOAD_DRAIN while its jobs run; meanwhile the worker's next
    reconcile passes must still load (and unload) other models, and must not start the same unload twice."""
    drains, release = [], threading.Event()

    def drain(model_id, runtime, reason, drain_s):  # ModelCache's on_unload: its jobs are still running
        drains.append(model_id)
        release.wait(HELD_S)

    cache = ModelCache(
        10**10,
        "cpu",
        factory=lambda spec: create_runtime(spec, settings, "cpu"),
        estimate=lambda spec: estimate_bytes(spec, settings),
        on_unload=drain,
    )
    cluster = ClusterState(scratch_redis, 10)
    residency = Residency(settings, "worker-a", models, cluster, cache, publish=lambda: None)

    def reconcile_pass() -> None:
        done = threading.Thread(target=residency.reconcile)
        done.start()
        done.join(HELD_S / 3)
        assert not done.is_alive(), "a reconcile pass waited for another model's drain"

    cluster.desire("sim-h100", "cpu")
    reconcile_pass()
    assert set(cache.resident()) == {"sim-h100"}
    try:
        cluster.undesire("sim-h100")
        cluster.desire("tiny-mlp", "cpu")
        reconcile_pass()  # loads tiny-mlp, starts sim-h100's drain
        deadline = time.monotonic() + 10
        while drains != ["sim-h100"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert drains == ["sim-h100"]
        cluster.desire("sim-gpt2-h100", "cpu")
        reconcile_pass()  # sim-h100 still drains
        assert set(cache.resident()) == {"tiny-mlp", "sim-gpt2-h100"}
        assert drains == ["sim-h100"]  # not a second unload of the model that drains
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while residency._unloading and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not residency._unloading
    for model_id in list(cache.resident()):
        cache.unload(model_id)
