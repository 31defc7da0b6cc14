"""The batching logic on its own (a recording stand-in executor; the real model processes are in the
integration tests)."""

import threading
import time
from contextlib import contextmanager

import pytest

from workers.batch_requests import PoisonInput, split_by_length
from workers.batcher import ModelBatcher
from workers.model_errors import ModelProcessDied
from workers.retry import RetryPolicy


class RecordingExecutor:
    """Stands in for RemoteRuntime: `instances` model processes that echo their inputs."""

    def __init__(self, fail_on=None, crash_on=None, delay=0.0, instances=1):
        self.instances = [object()] * instances
        self.batches = []
        self.fail_on = fail_on
        self.crash_on = crash_on
        self.delay = delay
        self.revived = 0

    def run_batch_on(self, index, inputs, parameters):
        self.batches.append([i["text"] for i in inputs])
        time.sleep(self.delay)
        if self.crash_on and any(i["text"] == self.crash_on for i in inputs):
            raise ModelProcessDied("the model process died")
        if self.fail_on and any(i["text"] == self.fail_on for i in inputs):
            raise ValueError("bad input")
        return [{"echo": i["text"], "max_length": parameters.get("max_length")} for i in inputs]

    def revive(self, index):
        self.revived += 1
        return True


def batcher_for(executor, **kwargs):
    kwargs.setdefault("policy", RetryPolicy(max_attempts=3))
    return ModelBatcher(
        executor, "rec", kwargs.pop("max_batch_size", 8), kwargs.pop("max_batch_delay_ms", 50), **kwargs
    )


def test_split_by_length_groups_similar_lengths():
    assert split_by_length([10, 11, 12, 13], 32) == [4]  # similar: one batch
    assert split_by_length([10, 11, 12, 900], 32) == [3, 4]  # one long outlier gets its own pass
    assert split_by_length([5] * 10, 4) == [2, 6, 10]  # never more than max_size per batch
    assert split_by_length([], 8) == []


def test_jobs_waiting_together_share_one_batch_and_get_their_own_results():
    executor = RecordingExecutor(delay=0.2)
    batcher = batcher_for(executor)
    first = batcher.submit({"text": "first"}, {})  # an idle model runs it at once...
    time.sleep(0.05)
    futures = [batcher.submit({"text": f"t{i}"}, {}) for i in range(8)]  # ...these queue meanwhile
    assert first.result(5).batch_size == 1
    outcomes = [f.result(5) for f in futures]
    assert [o.output["echo"] for o in outcomes] == [f"t{i}" for i in range(8)]
    assert all(o.batch_size == 8 for o in outcomes)
    assert len(executor.batches) == 2
    batcher.close()


def test_an_idle_model_runs_a_lone_job_at_once():
    executor = RecordingExecutor()
    batcher = batcher_for(executor, max_batch_size=32, max_batch_delay_ms=5000)
    outcome = batcher.submit({"text": "alone"}, {}).result(2)  # would time out if held for the 5 s delay
    assert outcome.batch_size == 1 and outcome.batch_wait_ms < 1000
    batcher.close()


def test_under_load_a_batch_waits_for_as_many_companions_as_the_last_one():
    executor = RecordingExecutor(delay=0.1)
    batcher = batcher_for(executor, max_batch_size=8, max_batch_delay_ms=2000)
    batcher.submit({"text": "warm"}, {})
    time.sleep(0.02)
    first = [batcher.submit({"text": f"a{i}"}, {}) for i in range(4)]
    [f.result(5) for f in first]  # a batch of 4 ran: the model is under load
    trickle = []
    for i in range(4):  # arrive one by one, slower than the batcher could take them
        trickle.append(batcher.submit({"text": f"b{i}"}, {}))
        time.sleep(0.02)
    assert [f.result(5).batch_size for f in trickle] == [4, 4, 4, 4]
    batcher.close()


def test_only_equal_parameters_are_batched_together():
    executor = RecordingExecutor(delay=0.1)
    batcher = batcher_for(executor)
    batcher.submit({"text": "busy"}, {})
    time.sleep(0.02)
    futures = [batcher.submit({"text": f"t{i}"}, {"max_length": 8 if i % 2 else 16}) for i in range(6)]
    outcomes = [f.result(5) for f in futures]
    for i, o in enumerate(outcomes):
        assert o.output["max_length"] == (8 if i % 2 else 16)
    assert sorted(len(b) for b in executor.batches[1:]) == [3, 3]
    batcher.close()


def test_a_failing_batch_is_retried_one_by_one():
    executor = RecordingExecutor(fail_on="poison", delay=0.05)
    batcher = batcher_for(executor)
    batcher.submit({"text": "busy"}, {})
    time.sleep(0.01)
    futures = [batcher.submit({"text": t}, {}) for t in ("a", "poison", "b")]
    assert futures[0].result(5).output["echo"] == "a"
    with pytest.raises(ValueError):
        futures[1].result(5)
    assert futures[2].result(5).output["echo"] == "b"
    assert len(executor.batches) == 5  # busy, the failed batch of 3, then each job alone
    batcher.close()


def test_a_crashed_batch_retries_each_job_alone_and_only_the_culprit_is_poison():
    executor = RecordingExecutor(crash_on="killer", delay=0.05)
    batcher = batcher_for(executor, policy=RetryPolicy(max_attempts=2))
    batcher.submit({"text": "busy"}, {})
    time.sleep(0.01)
    futures = [batcher.submit({"text": t}, {}) for t in ("a", "killer", "b")]
    assert futures[0].result(5).output["echo"] == "a"
    assert futures[2].result(5).output["echo"] == "b"
    with pytest.raises(PoisonInput):
        futures[1].result(5)
    assert executor.batches.count(["killer"]) == 2  # charged only when it crashed the model alone
    assert executor.revived == 3  # after the batch, then after each of its two lone crashes
    batcher.close()


def test_completion_sees_every_finished_batch_before_the_futures_resolve():
    seen = []
    executor = RecordingExecutor()
    batcher = batcher_for(executor, on_complete=lambda batch: seen.extend(r.context for r in batch))
    future = batcher.submit({"text": "x"}, {}, context="job-1")
    assert future.result(5).output["echo"] == "x"
    assert seen == ["job-1"]
    batcher.close()


def test_instances_run_batches_side_by_side():
    both_running = threading.Barrier(2, timeout=5)  # breaks unless two forward passes overlap

    class Overlapping(RecordingExecutor):
        def run_batch_on(self, index, inputs, parameters):
            both_running.wait()
            return super().run_batch_on(index, inputs, parameters)

    batcher = batcher_for(Overlapping(instances=2), max_batch_size=1, max_batch_delay_ms=0)
    futures = [batcher.submit({"text": t}, {}) for t in ("x", "y")]
    assert [f.result(10).output["echo"] for f in futures] == ["x", "y"]
    batcher.close()


def test_an_exclusive_job_runs_in_a_forward_pass_of_its_own():
    executor = RecordingExecutor(delay=0.2)
    seen, ran_by_then = [], []

    @contextmanager
    def announced(batch):
        texts = [r.inputs["text"] for r in batch]
        seen.append(texts)
        assert texts not in executor.batches  # entered before the pass runs...
        yield
        ran_by_then.append(texts in executor.batches)  # ...and left once it has

    batcher = batcher_for(executor, on_forward=announced)
    first = batcher.submit({"text": "first"}, {})
    time.sleep(0.05)
    futures = [batcher.submit({"text": t}, {}, exclusive=(t == "alone")) for t in ("a", "alone", "b", "c")]
    assert first.result(5).batch_size == 1
    assert [f.result(5).batch_size for f in futures] == [3, 1, 3, 3]
    assert ["alone"] in executor.batches and sorted(executor.batches[-1] + executor.batches[-2]) == sorted(
        ["a", "b", "c", "alone"]
    )
    assert seen == executor.batches  # every pass is announced before it runs
    assert ran_by_then == [True] * len(seen)


def test_a_model_going_away_drains_then_ends_what_is_still_pending():
    from workers.model_errors import ModelGone, unloaded

    executor = RecordingExecutor(delay=0.3)
    batcher = batcher_for(executor, max_batch_size=1, max_batch_delay_ms=0)
    futures = [batcher.submit({"text": f"t{i}"}, {}) for i in range(4)]
    time.sleep(0.05)
    batcher.close(unloaded("rec"), drain_s=0.4)  # time for the first one or two, not for all four
    ended = [f.exception(5) for f in futures]
    assert ended[0] is None  # drained: it ran to its end
    assert isinstance(ended[-1], ModelGone) and ended[-1].code == "model_unloaded"
    with pytest.raises(ModelGone):  # nothing new is taken
        batcher.submit({"text": "late"}, {})


def test_a_drained_batcher_ends_nothing_when_everything_finishes_in_time():
    from workers.model_errors import evicted

    batcher = batcher_for(RecordingExecutor(delay=0.05), max_batch_size=1, max_batch_delay_ms=0)
    futures = [batcher.submit({"text": f"t{i}"}, {}) for i in range(3)]
    batcher.close(evicted("rec"), drain_s=5)
    assert [f.result(5).output["echo"] for f in futures] == ["t0", "t1", "t2"]


def test_a_process_that_cannot_restart_ends_the_batch_and_reports_the_model_dead():
    from workers.model_errors import ModelGone

    class Unrevivable(RecordingExecutor):
        def revive(self, index):
            return False

    dead = []
    batcher = batcher_for(Unrevivable(crash_on="x"), on_model_dead=dead.append)
    with pytest.raises(ModelGone) as ended:
        batcher.submit({"text": "x"}, {}).result(5)
    assert ended.value.code == "model_process_died" and dead == [ended.value]
    batcher.close()


def test_a_failing_model_dead_callback_leaves_the_batcher_serving():
    class Unrevivable(RecordingExecutor):
        def revive(self, index):
            return False

    def model_dead(gone):
        raise ConnectionError("redis went away")

    batcher = batcher_for(Unrevivable(crash_on="x"), on_model_dead=model_dead)
    assert batcher.submit({"text": "x"}, {}).exception(5) is not None
    assert batcher.submit({"text": "y"}, {}).result(5).output["echo"] == "y"  # the feeder still runs
    batcher.close()


def test_an_exception_escaping_a_feeder_ends_the_jobs_it_holds():
    calls = []

    def on_batch(size):
        calls.append(size)
        if len(calls) == 1:
            raise RuntimeError("a bug in the feeder")

    batcher = batcher_for(RecordingExecutor(), on_batch=on_batch)
    ended = batcher.submit({"text": "a"}, {}).exception(5)
    assert isinstance(ended, RuntimeError) and "a bug" in str(ended)
    assert batcher.submit({"text": "b"}, {}).result(5).output["echo"] == "b"
    batcher.close()
    batcher._completer.join(5)
    assert not batcher._completer.is_alive()  # every feeder's exit is accounted for


def test_a_job_refused_during_the_drain_is_told_the_model_went_not_that_it_outran_the_drain():
    from workers.model_errors import ModelGone, unloaded

    executor = RecordingExecutor(delay=0.3)
    batcher = batcher_for(executor, max_batch_size=1, max_batch_delay_ms=0)
    futures = [batcher.submit({"text": f"t{i}"}, {}) for i in range(3)]
    time.sleep(0.05)
    outran, refused = unloaded("rec", "its jobs did not end within 0.4 s"), unloaded("rec")
    closing = threading.Thread(target=batcher.close, args=(outran, 0.4), kwargs={"refused": refused})
    closing.start()
    time.sleep(0.05)
    with pytest.raises(ModelGone) as late:
        batcher.submit({"text": "late"}, {})
    assert "did not end within" not in str(late.value)
    closing.join(5)
    assert "did not end within" in str(futures[-1].exception(5))


class CostlyExecutor(RecordingExecutor):
    """A device whose pass time depends on its size: `base_s` + `per_item_s` per input (a CPU: linear; a GPU: flat)."""

    def __init__(self, base_s, per_item_s):
        super().__init__()
        self.base_s, self.per_item_s = base_s, per_item_s

    def run_batch_on(self, index, inputs, parameters):
        self.batches.append([i["text"] for i in inputs])
        time.sleep(self.base_s + self.per_item_s * len(inputs))
        return [{"echo": i["text"]} for i in inputs]


def backlog_then_high(executor, lows=96):
    """A lone high job (the pass of 1 is measured), then a backlog of low jobs, and a high job once the backlog's
    first full pass has run: the passes as they ran."""
    # A pass waits up to 50 ms to fill: the backlog is queued in well under that even on a loaded machine (the
    # submitting thread shares the GIL with the batcher's), so its passes are full whatever the machine's load.
    batcher = batcher_for(executor, max_batch_size=32, max_batch_delay_ms=50)
    now = time.time()
    batcher.submit({"text": "warm"}, {}, lane="high", submitted_at=now).result(5)
    time.sleep(1.1)  # the high job is no longer recent: the backlog's passes are full
    with batcher._cond:  # the backlog arrives at once (the lock is re-entrant): its first pass sees all of it queued
        backlog = [batcher.submit({"text": f"low{i}"}, {}, lane="low", submitted_at=now) for i in range(lows)]
    while len(executor.batches) < 3:  # the first full pass of low ones ran (measured), the second is running
        time.sleep(0.005)
    high = batcher.submit({"text": "high"}, {}, lane="high", submitted_at=time.time())
    outcome = high.result(10)
    [f.result(10) for f in backlog]
    batcher.close()
    return outcome, executor.batches


def test_on_a_cpu_a_pass_that_carries_a_high_job_takes_no_low_ones_and_low_passes_shrink_after_it():
    outcome, passes = backlog_then_high(CostlyExecutor(base_s=0.02, per_item_s=0.01))
    assert outcome.batch_size <= 2  # 1 plus measurement noise at most; old: filled to 32 with low jobs
    carried = next(i for i, p in enumerate(passes) if "high" in p)
    assert len(passes[carried - 1]) == 32, [len(p) for p in passes]  # the pass it waited for (running when it came)
    after = [len(p) for p in passes[carried + 1 :]]
    assert after and max(after) < 32  # the high job was seen recently: the low passes behind it are short


def test_on_a_gpu_low_jobs_still_ride_along_with_a_high_one():
    outcome, passes = backlog_then_high(CostlyExecutor(base_s=0.04, per_item_s=0.00002))
    assert outcome.batch_size == 32  # a pass of 32 costs what a pass of 1 does: the backlog fills it
    assert all(len(p) == 32 for p in passes[1:4]), [len(p) for p in passes]
