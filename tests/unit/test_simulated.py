"""The simulated device in-process: its timing model (the sleeps it asks for, read through a replaced clock, never
wall time), its outputs' form, and the running batch's rules it shares with the real scheduler."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from config.models import Simulation, load_models
from config.settings import Settings
from model_store.paths import ModelUnavailable, estimate_bytes, resolve_model_path
from model_store.signatures import artifact_signature
from tests.support import REPO_ROOT
from workers.runtimes import InvalidInput, create_runtime
from workers.runtimes.simulated import WORDS, device_sleep

SETTINGS = Settings.from_env({})
MODELS = load_models(SETTINGS.models_file)


class Clock:
    """Stands in for time.sleep: records each pass's seconds, takes none."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


def runtime(model_id: str, **overrides):
    spec = replace(MODELS[model_id], **overrides)
    made = create_runtime(spec, SETTINGS, "cpu")
    made.load()
    made.sleep = Clock()
    return made


def test_an_embedding_batch_sleeps_base_plus_per_item_times_its_size():
    sim = runtime("sim-h100")
    for size in (1, 32, 128):
        sim.run_batch([{"text": f"sentence {i}"} for i in range(size)], {})
    expected = [(3.0 + 0.113 * b) / 1000 for b in (1, 32, 128)]  # minilm on one H100: 3.14, 7.01, 17.48 ms
    assert sim.sleep.slept == pytest.approx(expected)


@pytest.mark.skipif(sys.platform != "linux", reason="timer slack is Linux's")
def test_the_simulated_device_sleeps_with_no_timer_slack_on_its_own_thread_only():
    def slack() -> int:
        return ctypes.CDLL(None).prctl(30, 0, 0, 0, 0)  # PR_GET_TIMERSLACK: the calling thread's, in ns

    seen: dict[str, int] = {}

    def device_thread() -> None:
        seen["before"] = slack()
        device_sleep(0.0001)
        seen["after"] = slack()

    thread = threading.Thread(target=device_thread)
    thread.start()
    thread.join()
    assert seen["before"] > 1 and seen["after"] == 1  # the kernel's default (50 µs), then none
    assert slack() > 1  # other threads keep theirs


def test_embeddings_have_the_transformers_runtimes_form_and_one_vector_per_text():
    sim = runtime("sim-h100")
    texts = ["Hello world", "AetherCore keeps models resident", "short", "Hello world"]
    out = sim.run_batch([{"text": t} for t in texts], {})
    vectors = np.stack([o["embedding"] for o in out])
    assert vectors.dtype == np.float32 and vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)  # L2-normalised, as minilm's
    assert np.array_equal(vectors[0], vectors[3]) and not np.array_equal(vectors[0], vectors[1])
    again = sim.run_batch([{"text": "short"}], {})[0]["embedding"]
    assert np.array_equal(again, vectors[2])  # deterministic per text, whatever the batch
    assert [o["tokens"] for o in out] == [4, 6, 3, 4]  # words + the encoder's two special tokens
    assert sim.run_batch([{"text": "a " * 50}], {"max_length": 8})[0]["tokens"] == 8  # truncated
    assert sim.describe()["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [384]}]


def test_a_simulated_model_checks_its_inputs_like_a_real_one():
    sim = runtime("sim-h100")
    with pytest.raises(InvalidInput, match="inputs.text"):
        sim.run_batch([{"text": "  "}], {})
    with pytest.raises(InvalidInput, match="max_length"):
        sim.run_batch([{"text": "x"}], {"max_length": 10_000})
    gpt = runtime("sim-gpt2-h100")
    with pytest.raises(InvalidInput, match="temperature"):
        gpt.sequence(0, {"text": "x"}, {"temperature": -1})
    with pytest.raises(InvalidInput, match="inputs.messages"):
        gpt.sequence(0, {"messages": []}, {})
    assert gpt.sequence(0, {"messages": [{"role": "user", "content": "hi there"}]}, {}).prompt  # rendered
    assert sim.sleep.slept == [] and gpt.sleep.slept == []  # nothing ran


def drain(batcher, arrivals: dict[int, list] | None = None, cancel: dict[int, list] | None = None):
    """Step until idle, adding `arrivals[step]` (and cancelling `cancel[step]`) before that step."""
    arrivals, cancel = arrivals or {}, cancel or {}
    results, texts, log, rows = {}, {}, [], []
    step = 0
    while batcher.has_work() or any(s >= step for s in arrivals):
        for sequence in arrivals.get(step, []):
            batcher.add(sequence)
        for key in cancel.get(step, []):
            batcher.cancel(key)
        for event in batcher.step():
            log.append((step, event))
            if event[0] == "chunk":
                texts[event[1]] = texts.get(event[1], "") + event[2]
            elif event[0] in ("result", "cancelled", "error"):
                results[event[1]] = event
        rows.append(batcher.stats()["running"])
        step += 1
    return results, texts, log, rows


def test_each_decoding_step_sleeps_step_plus_per_row_times_the_rows_and_gives_every_row_one_token():
    gpt = runtime("sim-gpt2-h100")
    batcher = gpt.continuous_batcher()
    arrivals = {0: [gpt.sequence(0, {"text": "Once upon a time"}, {"max_length": 5})], 2: []}
    arrivals[2] = [gpt.sequence(1, {"text": "Hello"}, {"max_length": 2})]
    results, texts, log, _rows = drain(batcher, arrivals)
    # steps 0-1: one row; 2-3: two rows (the second joins, leaves after its 2 tokens); 4: one row again
    rows = [1, 1, 2, 2, 1]
    assert gpt.sleep.slept == pytest.approx([(3.886 + 0.0048 * r) / 1000 for r in rows])
    for key, tokens, prompt in ((0, 5, 4), (1, 2, 1)):
        kind, _key, output = results[key]
        assert kind == "result" and output["finish_reason"] == "length"
        assert output["tokens"] == tokens and output["prompt_tokens"] == prompt  # usage
        assert output["text"] == texts[key] and len(output["text"].split()) == tokens
        assert sum(1 for _s, e in log if e[0] == "chunk" and e[1] == key) == tokens  # one chunk per token
    assert set(output["text"].split()) <= {w.strip() for w in WORDS}
    # Deterministic per prompt: a retry streams the same text.
    again, _texts, _log, _rows = drain(gpt.continuous_batcher(), {0: [gpt.sequence(9, {"text": "Hello"}, {})]})
    assert again[9][2]["text"].startswith(results[1][2]["text"])


def test_the_running_batch_is_admitted_by_max_batch_size_and_the_rest_are_told_they_wait():
    gpt = runtime("sim-gpt2-h100", max_batch_size=2)
    batcher = gpt.continuous_batcher()
    sequences = [gpt.sequence(i, {"text": f"prompt {i}"}, {"max_length": 3}) for i in range(5)]
    sequences[4].stream = False  # a /serve/batch item: not told, it has no stream
    results, _texts, log, rows = drain(batcher, {0: sequences})
    assert max(rows) == 2 and all(results[i][0] == "result" for i in range(5))
    queued = [e[1] for _s, e in log if e[0] == "queued"]
    assert sorted(queued) == [2, 3]  # once each, streamed ones only
    assert len(gpt.sleep.slept) == 9  # 3 steps for each pair of rows, then 3 for the last one


def test_cancel_and_deadline_drop_a_row_at_the_next_step_and_the_others_go_on():
    gpt = runtime("sim-gpt2-h100")
    batcher = gpt.continuous_batcher()
    keep = gpt.sequence("keep", {"text": "a b"}, {"max_length": 6})
    dropped = gpt.sequence("dropped", {"text": "c d"}, {"max_length": 6})
    late = gpt.sequence("late", {"text": "e f"}, {"max_length": 6}, deadline=time.time() - 1)
    results, texts, _log, _rows = drain(batcher, {0: [keep, dropped], 1: [late]}, cancel={2: ["dropped"]})
    assert results["dropped"][0] == "cancelled" and len(texts["dropped"].split()) == 2
    assert results["late"][:3] == ("error", "late", "deadline")
    assert results["keep"][0] == "result" and results["keep"][2]["tokens"] == 6


def test_an_exclusive_request_runs_alone():
    gpt = runtime("sim-gpt2-h100")
    batcher = gpt.continuous_batcher()
    first = gpt.sequence("first", {"text": "a"}, {"max_length": 2})
    alone = gpt.sequence("alone", {"text": "b"}, {"max_length": 2}, exclusive=True)
    after = gpt.sequence("after", {"text": "c"}, {"max_length": 2})
    _results, _texts, log, rows = drain(batcher, {0: [first, alone, after]})
    assert rows == [1, 0, 1, 0, 1, 0]  # each of the three alone: the exclusive one waits for an empty batch
    assert [e[1] for _s, e in log if e[0] == "result"] == ["first", "alone", "after"]


def test_a_stop_string_ends_the_row_and_is_never_streamed():
    gpt = runtime("sim-gpt2-h100")
    probe = drain(gpt.continuous_batcher(), {0: [gpt.sequence(0, {"text": "z"}, {"max_length": 6})]})[0]
    words = probe[0][2]["text"].split()
    stop = " " + words[2]  # the third word
    results, texts, _log, _rows = drain(
        gpt.continuous_batcher(), {0: [gpt.sequence(0, {"text": "z"}, {"max_length": 6, "stop": stop})]}
    )
    output = results[0][2]
    assert output["finish_reason"] == "stop" and output["text"] == " " + " ".join(words[:2])
    assert texts[0] == output["text"] and stop not in texts[0]


def test_a_declared_kv_cache_bounds_the_running_batch_like_a_real_one():
    spec = MODELS["sim-gpt2-h100"]
    gpt = runtime(
        "sim-gpt2-h100",
        simulate=replace(spec.simulate, kv_bytes_per_token=1000),
        kv_cache_memory=3 * 10 * 1000,  # three rows of 10 tokens
    )
    batcher = gpt.continuous_batcher()
    sequences = [gpt.sequence(i, {"text": "one two"}, {"max_length": 8}) for i in range(5)]  # 10 tokens each
    results, _texts, _log, rows = drain(batcher, {0: sequences})
    assert max(rows) == 3 and len(results) == 5
    with pytest.raises(InvalidInput, match="kv_cache_memory"):
        batcher.add(gpt.sequence(9, {"text": "one two"}, {"max_length": 100}))


def test_a_model_with_no_files_resolves_estimates_and_signs_cleanly():
    sim, gpt = MODELS["sim-h100"], MODELS["sim-gpt2-h100"]
    with pytest.raises(ModelUnavailable, match="no files"):
        resolve_model_path(sim, SETTINGS)
    assert artifact_signature(sim, SETTINGS) is None  # its signature is declared (simulate.dim)
    assert estimate_bytes(sim, SETTINGS) == 0 and estimate_bytes(gpt, SETTINGS) == 0
    declared = replace(sim, simulate=Simulation(base_ms=1, per_item_ms=0, dim=8, memory=5_000_000), instances=2)
    assert estimate_bytes(declared, SETTINGS) == 10_000_000
    assert create_runtime(declared, SETTINGS, "cpu").memory_bytes() == 5_000_000


def test_the_simulated_runtimes_import_neither_torch_nor_transformers():
    script = (
        "import sys\n"
        "from config.models import load_models\n"
        "from config.settings import Settings\n"
        "from workers.runtimes import create_runtime\n"
        "s = Settings.from_env({}); m = load_models(s.models_file)\n"
        "for mid in ('sim-h100', 'sim-gpt2-h100'):\n"
        "    r = create_runtime(m[mid], s, 'cpu'); r.load(); r.run_batch([{'text': 'x y'}], {'max_length': 2})\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
