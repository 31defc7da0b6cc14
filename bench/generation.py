"""Generation benchmark: N concurrent streams through the API beside in-process batched `generate`, one run.

    python -m bench.generation [--streams 1,16,64] [--tokens 32] [--device cpu] [--write]

First the in-process reference on the same cores: transformers' `generate` on tiny-gpt2, left-padded,
at batch 1 and at each N (what the hardware gives with batched decoding and no service around it),
measured before and again after the served runs; the ratios divide by the larger of the two.
Then a worker and an API (as `manage.py up` runs them), warmed up with one run at the largest N, and,
for each N, `--repeat` runs (the median reported) of N clients that each `POST /serve` a generation
of `--tokens` new tokens and read its `GET /jobs/{id}/stream` (SSE), all at once, as a new user
would. Reported per N: tokens/s over the wall time (first submit to last
`done`), time to first chunk (from the client's POST) p50/p99, and the ratios the generation issue
sets as targets:

* N = 64 streams >= 0.5 x in-process batched generate at batch 64 (reach: 0.8); TTFC p99 <= 0.5 s;
* 1 stream >= 0.8 x in-process batch-1 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import yaml

from bench.processes import RedisServer
from bench.report import Report
from bench.run import AUTH, Components, start_system

MODEL = "tiny-gpt2"
PROMPTS = [
    "Once upon a time",
    "The weather today is",
    "In a galaxy far away",
    "Tell me a story about",
    "The best way to cook rice is",
    "My favourite animal is",
    "Yesterday I went to",
    "The answer is",
]


def simulated_rate(batch: int) -> float:
    """A simulated decoder's in-process rate at `batch` rows: what its profile declares (rows x steps per
    second; the simulated step sleeps `step_ms + per_row_ms x rows` and costs no CPU, config/models.yaml)."""
    from config.models import load_models
    from config.settings import Settings

    profile = load_models(Settings.from_env().models_file)[MODEL].simulate
    return 1000 * batch / (profile.step_ms + profile.per_row_ms * batch)


def in_process_generate(batch: int, tokens: int, device: str = "cpu", repeats: int = 3) -> float:
    """Tokens/s of transformers' generate on a left-padded batch (median of `repeats`); a simulated decoder's
    declared rate."""
    if MODEL.startswith("sim"):
        return simulated_rate(batch)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from config.models import load_models
    from config.settings import Settings
    from model_store.paths import resolve_model_path

    settings = Settings.from_env()
    path = resolve_model_path(load_models(settings.models_file)[MODEL], settings)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    torch_device = "cuda" if device.startswith("cuda") else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path).to(torch_device).eval()
    torch.set_num_threads(os.cpu_count() or 1)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    encoded = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(torch_device)
    rates = []
    with torch.inference_mode():
        model.generate(**encoded, max_new_tokens=4)
        for _ in range(repeats):
            begin = time.perf_counter()
            out = model.generate(**encoded, max_new_tokens=tokens, min_new_tokens=tokens)
            if torch_device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - begin
            rates.append((out.shape[1] - encoded["input_ids"].shape[1]) * batch / elapsed)
    return statistics.median(rates)


def one_stream(port: int, prompt: str, tokens: int, start: threading.Event, out: list) -> None:
    conn = HTTPConnection("127.0.0.1", port, timeout=300)
    start.wait()
    begin = time.perf_counter()
    body = json.dumps({"model_id": MODEL, "inputs": {"text": prompt}, "parameters": {"max_length": tokens}})
    try:
        conn.request("POST", "/serve", body, {"Content-Type": "application/json", **AUTH})
        response = conn.getresponse()
        job = json.loads(response.read())
        if response.status != 202:
            out.append({"error": f"{response.status} {job}"})
            return
        conn.request("GET", f"/jobs/{job['job_id']}/stream", headers=AUTH)
        response = conn.getresponse()
        first, event, generated = None, None, 0
        while True:
            line = response.fp.readline()
            if not line:
                break
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "chunk" and first is None:
                    first = time.perf_counter() - begin
                if event in ("done", "error"):
                    finished = json.loads(line[6:])["job"]
                    if finished["status"] != "succeeded":
                        out.append({"error": finished.get("error")})
                        return
                    generated = finished["result"]["output"]["tokens"]
                    break
        out.append({"ttfc": first, "tokens": generated, "end": time.perf_counter()})
    except Exception as exc:  # noqa: BLE001 - reported, not raised: one client's failure is a data point
        out.append({"error": repr(exc)})
    finally:
        conn.close()


def served(port: int, streams: int, tokens: int, components: Components | None = None) -> dict:
    start, out = threading.Event(), []
    cpu_before = components.cpu() if components else {}
    threads = [
        threading.Thread(target=one_stream, args=(port, PROMPTS[i % len(PROMPTS)], tokens, start, out))
        for i in range(streams)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    begin = time.perf_counter()
    start.set()
    for thread in threads:
        thread.join()
    cpu = {name: value - cpu_before[name] for name, value in components.cpu().items()} if components else {}
    good = [r for r in out if "error" not in r]
    errors = [r["error"] for r in out if "error" in r]
    wall = max((r["end"] for r in good), default=begin) - begin
    ttfc = sorted(r["ttfc"] for r in good if r["ttfc"] is not None)
    return {
        "streams": streams,
        "errors": errors,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": sum(r["tokens"] for r in good) / wall if wall > 0 else 0.0,
        "ttfc_p50": statistics.median(ttfc) if ttfc else float("nan"),
        "ttfc_p99": ttfc[min(len(ttfc) - 1, int(round(0.99 * (len(ttfc) - 1))))] if ttfc else float("nan"),
    }


def main() -> None:
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,16,64", help="concurrent stream counts, comma-separated")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--repeat", type=int, default=3, help="runs per N; the median run is reported")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:0 on a GPU host (worker and reference)")
    parser.add_argument(
        "--model", default=MODEL, help="tiny-gpt2, or sim-gpt2-h100 (the simulated H100: the stack's own cost)"
    )
    parser.add_argument(
        "--write", action="store_true", help="put the table into bench/RESULTS.md (replacing the last one)"
    )
    args = parser.parse_args()
    MODEL = args.model
    counts = [int(n) for n in args.streams.split(",")]
    say = Report()

    say(
        f"## Generation ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"device {args.device}, `{MODEL}`, {args.tokens} new tokens per request)"
    )
    say()
    sizes = sorted({1, *counts})
    before = {n: in_process_generate(n, args.tokens, args.device) for n in sizes}
    results = []
    redis = RedisServer().start()
    with tempfile.TemporaryDirectory() as tmp:
        # The largest N runs in one batch: max_batch_size at least N (the KV budget is ample for 32 tokens).
        from config.settings import Settings

        models = yaml.safe_load(Path(Settings.from_env().models_file).read_text())
        models["models"][MODEL]["max_batch_size"] = max(counts + [models["models"][MODEL].get("max_batch_size", 64)])
        models_file = Path(tmp) / "models.yaml"
        models_file.write_text(yaml.safe_dump(models))
        worker, api = start_system(redis, 0, str(models_file), args.device)
        try:
            components = Components(api, worker, redis)
            # Warm-up at the largest N: gunicorn's and Celery's threads, the allocator's arenas and the
            # KV-cache sizes all grow on first use; a server is measured warm.
            served(api.port, max(counts), args.tokens)
            for n in counts:
                runs = sorted(
                    (served(api.port, n, args.tokens, components) for _ in range(args.repeat)),
                    key=lambda r: r["tokens_per_s"],
                )
                results.append(runs[len(runs) // 2])  # the median run
                result = results[-1]
                print(
                    f"  {n} streams: {result['tokens_per_s']:.0f} tokens/s, TTFC p50 {result['ttfc_p50']:.3f} s "
                    f"p99 {result['ttfc_p99']:.3f} s, {len(result['errors'])} errors",
                    flush=True,
                )
        finally:
            api.stop()
            worker.stop()
            redis.stop()
    # The reference again, now that the service is stopped: this machine's speed drifts over minutes, and
    # the larger of the two (the conservative choice) is what the ratios divide by.
    after = {n: in_process_generate(n, args.tokens, args.device) for n in sizes}
    reference = {n: max(before[n], after[n]) for n in sizes}

    say(
        "| | tokens/s | ÷ in-process batched `generate` (same N) | ÷ in-process batch 1 | TTFC p50 / p99 "
        "| wall | errors |"
    )
    say("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for n, rate in sorted(reference.items()):
        say(
            f"| in-process `generate`, batch {n} (before / after the served runs: {before[n]:,.0f} / "
            f"{after[n]:,.0f}) | {rate:,.0f} | | | | | |"
        )
    for r in results:
        n = r["streams"]
        say(
            f"| served, {n} concurrent stream{'s' if n > 1 else ''} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / reference[n]:.2f} | {r['tokens_per_s'] / reference[1]:.2f} | "
            f"{r['ttfc_p50']:.3f} s / {r['ttfc_p99']:.3f} s | {r['wall_s']:.2f} s | {len(r['errors'])} |"
        )
    say()
    say("CPU seconds per component during each run (2 cores = 2 CPU-seconds per second of wall time):")
    say()
    names = list(results[0]["cpu_s"]) if results else []
    say("| streams | " + " | ".join(names) + " | wall |")
    say("| ---: | " + " | ".join("---:" for _ in names) + " | ---: |")
    for r in results:
        say(
            f"| {r['streams']} | " + " | ".join(f"{r['cpu_s'][name]:.2f}" for name in names) + f" | {r['wall_s']:.2f} |"
        )
    say()
    by_n = {r["streams"]: r for r in results}
    if 64 in by_n:
        r = by_n[64]
        say(
            f"Targets: 64 streams ÷ in-process batch 64 = **{r['tokens_per_s'] / reference[64]:.2f}** "
            "(≥ 0.5, reach 0.8); "
            f"TTFC p99 at 64 = **{r['ttfc_p99']:.3f} s** (≤ 0.5 s)"
        )
    if 256 in by_n:
        say(f"256 streams ÷ in-process batch 256 = **{by_n[256]['tokens_per_s'] / reference[256]:.2f}** (GPU target)")
    if 1 in by_n:
        say(f"1 stream ÷ in-process batch 1 = **{by_n[1]['tokens_per_s'] / reference[1]:.2f}** (≥ 0.8)")
    for r in results:
        for error in r["errors"][:3]:
            say(f"error at {r['streams']} streams: {error}")
    if args.write:
        # This run's table replaces the last one between its markers (hand-written analysis stays outside).
        path = Path(__file__).with_name("RESULTS.md")
        start, end = "<!-- generation: numbers -->", "<!-- generation: end of numbers -->"
        text = path.read_text() if path.exists() else ""
        block = f"{start}\n" + "\n".join(say.lines) + f"\n{end}"
        if start in text and end in text:
            text = text.split(start, 1)[0] + block + text.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
