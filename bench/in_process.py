"""The in-process limit a benchmark compares serving with: a model's runtime loaded in this process, batches run
straight through it (no queue, no HTTP), and the same for a stream of generated text. bench/run.py prints these
beside the end-to-end numbers.

A top-level tool like the CLI (docs/ARCHITECTURE.md, "Layers"): it imports workers/ to load the runtime."""

from __future__ import annotations

import os
import statistics
import threading
import time


def load_runtime(model_id: str):
    from config.models import load_models
    from config.settings import Settings
    from workers.runtimes import create_runtime

    settings = Settings.from_env()
    runtime = create_runtime(load_models(settings.models_file)[model_id], settings, "cpu")
    runtime.load()
    return runtime


def in_process_throughput(runtime, texts: list[str], batch_size: int, sort: bool = False) -> float:
    items = sorted(texts, key=len) if sort else list(texts)
    runtime.run_batch([{"text": t} for t in items[:batch_size]], {})  # warm-up
    started = time.perf_counter()
    for i in range(0, len(items), batch_size):
        runtime.run_batch([{"text": t} for t in items[i : i + batch_size]], {})
    return len(items) / (time.perf_counter() - started)


def single_forward_ms(runtime, texts: list[str]) -> float:
    times = []
    for text in texts:
        started = time.perf_counter()
        runtime.run({"text": text}, {})
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def thread_effect(runtime, texts: list[str]) -> dict[str, float]:
    """Batch-1 forward passes on the main thread, on a fresh thread as is, and on a fresh thread set up."""
    import torch

    def raw(n_threads: int | None) -> float:
        if n_threads:
            torch.set_num_threads(n_threads)
        started = time.perf_counter()
        for text in texts:
            batch = runtime.tokenizer([text], return_tensors="pt", truncation=True, max_length=256)
            with torch.inference_mode():
                runtime.model(**batch)
        return len(texts) / (time.perf_counter() - started)

    out = {"main thread": raw(os.cpu_count())}
    for label, n_threads in (("new thread, default", None), ("new thread, set_num_threads", os.cpu_count())):
        result = {}
        thread = threading.Thread(target=lambda result=result, n=n_threads: result.setdefault("v", raw(n)))
        thread.start()
        thread.join()
        out[label] = result["v"]
    return out


def in_process_stream(tokens: int, runs: int = 5) -> tuple[float, float]:
    runtime = load_runtime("tiny-gpt2")
    ttfc, rates = [], []
    for _ in range(runs + 1):
        stamps: list[float] = []
        started = time.perf_counter()
        runtime.generate_all(
            [{"text": "Tell me a story"}],
            {"max_length": tokens},
            on_text=lambda _index, _piece, stamps=stamps: stamps.append(time.perf_counter()),
        )
        ttfc.append((stamps[0] - started) * 1000)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(ttfc[1:]), statistics.median(rates[1:])
