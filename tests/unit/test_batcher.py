"""The batching logic on its own (a recording stand-in runtime; the real models are in the integration tests)."""

import threading
import time
from types import SimpleNamespace

import pytest

from workers.batcher import ModelBatcher, split_by_length


class RecordingRuntime:
    def __init__(self, fail_on=None, delay=0.0):
        self.spec = SimpleNamespace(id="rec")
        self.batches = []
        self.fail_on = fail_on
        self.delay = delay

    def run_batch(self, inputs, parameters):
        self.batches.append([i["text"] for i in inputs])
        time.sleep(self.delay)
        if self.fail_on and any(i["text"] == self.fail_on for i in inputs):
            raise ValueError("bad input")
        return [{"echo": i["text"], "max_length": parameters.get("max_length")} for i in inputs]


def test_split_by_length_groups_similar_lengths():
    assert split_by_length([10, 11, 12, 13], 32) == [4]  # similar: one batch
    assert split_by_length([10, 11, 12, 900], 32) == [3, 4]  # one long outlier gets its own pass
    assert split_by_length([5] * 10, 4) == [2, 6, 10]  # never more than max_size per batch
    assert split_by_length([], 8) == []


def test_jobs_waiting_together_share_one_batch_and_get_their_own_results():
    runtime = RecordingRuntime(delay=0.05)
    batcher = ModelBatcher(runtime, max_batch_size=8, max_batch_delay_ms=50)
    futures = [batcher.submit({"text": f"t{i}"}, {}) for i in range(8)]
    outcomes = [f.result(5) for f in futures]
    assert [o.output["echo"] for o in outcomes] == [f"t{i}" for i in range(8)]
    assert all(o.batch_size == 8 for o in outcomes)
    assert len(runtime.batches) == 1
    batcher.close()


def test_a_lone_job_waits_at_most_the_delay():
    runtime = RecordingRuntime()
    batcher = ModelBatcher(runtime, max_batch_size=32, max_batch_delay_ms=30)
    started = time.monotonic()
    outcome = batcher.submit({"text": "alone"}, {}).result(5)
    waited = time.monotonic() - started
    assert outcome.batch_size == 1
    assert 0.025 <= waited < 1.0  # held for its companions, then run (upper bound only guards a hang)
    batcher.close()


def test_only_equal_parameters_are_batched_together():
    runtime = RecordingRuntime()
    batcher = ModelBatcher(runtime, max_batch_size=8, max_batch_delay_ms=50)
    futures = [batcher.submit({"text": f"t{i}"}, {"max_length": 8 if i % 2 else 16}) for i in range(6)]
    outcomes = [f.result(5) for f in futures]
    for i, o in enumerate(outcomes):
        assert o.output["max_length"] == (8 if i % 2 else 16)
    assert sorted(len(b) for b in runtime.batches) == [3, 3]
    batcher.close()


def test_a_failing_batch_is_retried_one_by_one():
    runtime = RecordingRuntime(fail_on="poison")
    batcher = ModelBatcher(runtime, max_batch_size=8, max_batch_delay_ms=50)
    futures = [batcher.submit({"text": t}, {}) for t in ("a", "poison", "b")]
    assert futures[0].result(5).output["echo"] == "a"
    with pytest.raises(ValueError):
        futures[1].result(5)
    assert futures[2].result(5).output["echo"] == "b"
    assert len(runtime.batches) == 4  # the failed batch of 3, then each job alone
    batcher.close()


def test_instances_run_batches_side_by_side_with_their_thread_setup():
    both_running = threading.Barrier(2, timeout=5)  # breaks unless two forward passes overlap

    class Overlapping(RecordingRuntime):
        def run_batch(self, inputs, parameters):
            both_running.wait()
            return super().run_batch(inputs, parameters)

    set_up = []
    batcher = ModelBatcher(Overlapping(), max_batch_size=1, max_batch_delay_ms=0, instances=2,
                           setup_thread=lambda: set_up.append(threading.current_thread().name))
    futures = [batcher.submit({"text": t}, {}) for t in ("x", "y")]
    assert [f.result(10).output["echo"] for f in futures] == ["x", "y"]
    assert len(set_up) == 2
    batcher.close()
