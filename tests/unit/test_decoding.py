"""The continuous-batching scheduler on the real tiny-gpt2, checked against transformers' own generate()."""

from __future__ import annotations

import pytest
import torch

from config.models import load_models
from config.settings import Settings
from workers.runtimes import InvalidInput, create_runtime
from workers.runtimes.decoding import ContinuousBatcher, Sequence

PROMPTS = [
    "Once upon a time",
    "The weather today is",
    "In a galaxy far away there lived a very small",
    "Hello",
    "A list of things: apples, pears, plums, and",
    "Why",
]


@pytest.fixture(scope="module")
def gpt2():
    settings = Settings.from_env()
    runtime = create_runtime(load_models(settings.models_file)["tiny-gpt2"], settings, "cpu")
    runtime.load()
    return runtime


def reference(gpt2, prompt: str, tokens: int, **generate_options) -> str:
    ids = torch.tensor([gpt2.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = gpt2.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=0, **generate_options
        )
    return gpt2.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def batcher(gpt2, **overrides) -> ContinuousBatcher:
    options = {"max_batch_size": 64, "kv_budget_bytes": 64 << 20, "device": "cpu", **overrides}
    return ContinuousBatcher(gpt2.model, gpt2.tokenizer, **options)


def drain(scheduler: ContinuousBatcher, arrivals: dict[int, list[Sequence]] | None = None) -> tuple[dict, dict, list]:
    """Step until idle, adding `arrivals[step]` before that step; (results, streamed text, every event)."""
    arrivals = arrivals or {}
    results, texts, log = {}, {}, []
    step = 0
    while scheduler.has_work() or any(s >= step for s in arrivals):
        for sequence in arrivals.get(step, []):
            scheduler.add(sequence)
        for event in scheduler.step():
            log.append((step, event))
            if event[0] == "chunk":
                texts[event[1]] = texts.get(event[1], "") + event[2]
            elif event[0] in ("result", "cancelled", "error"):
                results[event[1]] = event
        step += 1
    return results, texts, log


def seq(gpt2, key, prompt: str, tokens: int, **parameters) -> Sequence:
    return gpt2.sequence(key, {"text": prompt}, {"max_length": tokens, **parameters})


def test_requests_joining_and_leaving_mid_batch_get_what_generate_gives_alone(gpt2):
    # Six requests of different lengths join at different steps, so rows are padded, merged and cut.
    arrivals = {
        0: [seq(gpt2, 0, PROMPTS[0], 12), seq(gpt2, 1, PROMPTS[1], 3)],
        2: [seq(gpt2, 2, PROMPTS[2], 20)],
        5: [seq(gpt2, 3, PROMPTS[3], 1), seq(gpt2, 4, PROMPTS[4], 9)],
        9: [seq(gpt2, 5, PROMPTS[5], 16)],
    }
    tokens = {0: 12, 1: 3, 2: 20, 3: 1, 4: 9, 5: 16}
    results, texts, _ = drain(batcher(gpt2), arrivals)
    for key, budget in tokens.items():
        kind, _key, output = results[key]
        assert kind == "result"
        assert output["text"] == reference(gpt2, PROMPTS[key], budget), key
        assert texts.get(key, "") == output["text"]  # the streamed pieces add up to the result
        assert output["tokens"] == budget and output["finish_reason"] == "length"


def test_the_running_batch_never_exceeds_max_batch_size_and_the_rest_are_told_they_wait(gpt2):
    scheduler = batcher(gpt2, max_batch_size=2)
    for key in range(5):
        scheduler.add(seq(gpt2, key, PROMPTS[key], 4))
    sizes = []
    log = []
    while scheduler.has_work():
        events = scheduler.step()
        sizes.append(scheduler.stats()["running"] + sum(1 for e in events if e[0] == "result"))
        log += events
    assert max(sizes) == 2
    assert sorted(e[1] for e in log if e[0] == "queued") == [2, 3, 4]  # once each
    assert sorted(e[1] for e in log if e[0] == "result") == [0, 1, 2, 3, 4]


def test_requests_that_do_not_fit_the_kv_budget_wait_and_one_that_never_fits_is_refused(gpt2):
    per_token = batcher(gpt2).bytes_per_token
    first, second = seq(gpt2, 0, PROMPTS[0], 20), seq(gpt2, 1, PROMPTS[1], 20)
    # Room for one request's reservation, not two: the second waits until the first leaves.
    scheduler = batcher(gpt2, kv_budget_bytes=per_token * (first.horizon + 2))
    scheduler.add(first)
    scheduler.add(second)
    running = []
    while scheduler.has_work():
        scheduler.step()
        running.append(scheduler.stats()["running"])
        assert scheduler.kv_cache_bytes() <= scheduler.kv_budget_bytes
    assert max(running) == 1
    with pytest.raises(InvalidInput, match="kv_cache_memory"):
        batcher(gpt2, kv_budget_bytes=per_token * 4).add(seq(gpt2, 2, PROMPTS[2], 20))


def test_a_cancelled_request_leaves_at_the_next_step_and_the_others_are_unaffected(gpt2):
    scheduler = batcher(gpt2)
    scheduler.add(seq(gpt2, "a", PROMPTS[0], 30))
    scheduler.add(seq(gpt2, "b", PROMPTS[2], 10))
    scheduler.step()
    scheduler.step()
    assert scheduler.cancel("a") is not None
    events = scheduler.step()
    assert ("cancelled", "a") in events
    assert [s.key for s in scheduler.running] == ["b"]
    results, _, _ = drain(scheduler)
    assert results["b"][2]["text"] == reference(gpt2, PROMPTS[2], 10)


def test_a_request_past_its_deadline_is_dropped(gpt2):
    scheduler = batcher(gpt2)
    scheduler.add(Sequence(key=1, prompt=[5, 6, 7], max_new=50, deadline=0.0))
    events = scheduler.step()
    assert events[0][:3] == ("error", 1, "deadline")
    assert not scheduler.has_work()


def test_each_row_keeps_its_own_sampling_settings_in_a_shared_batch(gpt2):
    def sampled(seed_value):
        return seq(gpt2, seed_value, PROMPTS[0], 12, do_sample=True, temperature=1.5, top_k=50, seed=seed_value)

    results, _, _ = drain(batcher(gpt2), {0: [sampled(7), seq(gpt2, "greedy", PROMPTS[0], 12), sampled(8)]})
    again, _, _ = drain(batcher(gpt2), {0: [sampled(7)]})
    assert results["greedy"][2]["text"] == reference(gpt2, PROMPTS[0], 12)  # greedy beside sampled rows
    assert results[7][2]["text"] == again[7][2]["text"]  # same seed, same text, whatever the companions
    assert results[7][2]["text"] != results[8][2]["text"]


def test_a_stop_string_ends_the_row_and_is_never_streamed(gpt2):
    full = reference(gpt2, PROMPTS[0], 16)
    stop = full.split()[3]
    results, texts, _ = drain(batcher(gpt2), {0: [seq(gpt2, 0, PROMPTS[0], 16, stop=[stop])]})
    output = results[0][2]
    assert output["finish_reason"] == "stop"
    assert output["text"] == full[: full.find(stop)]
    assert texts.get(0, "") == output["text"]


def test_bad_generation_parameters_are_refused(gpt2):
    for parameters in (
        {"temperature": "hot"},
        {"top_p": 2},
        {"top_k": 1.5},
        {"stop": [""]},
        {"seed": -1},
        {"repetition_penalty": 0},
    ):
        with pytest.raises(InvalidInput):
            gpt2.sequence(0, {"text": "Hi"}, {"max_length": 4, **parameters})


def test_each_row_keeps_its_own_repetition_penalty(gpt2):
    # Greedy rows in one batch, one penalised: each gets what generate() gives it alone with its setting...
    results, _, _ = drain(
        batcher(gpt2), {0: [seq(gpt2, 0, PROMPTS[0], 24, repetition_penalty=1.8), seq(gpt2, 1, PROMPTS[1], 24)]}
    )
    assert results[0][2]["text"] == reference(gpt2, PROMPTS[0], 24, repetition_penalty=1.8)
    assert results[1][2]["text"] == reference(gpt2, PROMPTS[1], 24)
    # ...and the penalty reaches only its own row (tiny-gpt2's random weights rarely pick a token twice, so the
    # rule itself is checked on chosen scores): token 5, already in both rows' text, leads by a little.
    rows = [seq(gpt2, 0, "a", 2, repetition_penalty=2.0), seq(gpt2, 1, "a", 2)]
    scheduler = batcher(gpt2)
    scheduler.suppress, scheduler.no_repeat_ngram = torch.tensor([], dtype=torch.long), 0  # only the penalty here
    logits = torch.full((2, gpt2.model.config.vocab_size), -10.0)
    logits[:, 5], logits[:, 6] = 3.0, 2.0
    chosen = scheduler._choose(logits, torch.tensor([[5], [5]]), rows)
    assert chosen.tolist() == [6, 5]  # the penalised row's 3.0 became 1.5; the other row is untouched
