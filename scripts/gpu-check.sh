#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: run the GPU tests and a small CPU vs GPU throughput comparison.
# Assumes the CUDA build of torch and onnxruntime-gpu are installed (requirements/worker-gpu.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('GPU:', torch.cuda.get_device_name(0))"
"$PY" manage.py models bootstrap >/dev/null
"$PY" -m pytest -q -m gpu tests/gpu
"$PY" - <<'PYEOF'
import time
from bench.corpus import corpus
from config.models import load_models
from config.settings import Settings
from workers.runtimes import create_runtime

texts = corpus(2048)
settings = Settings.from_env()
spec = load_models(settings.models_file)["minilm"]
for device in ("cpu", "cuda:0"):
    runtime = create_runtime(spec, settings, device)
    runtime.load()
    for size in (1, 32, 128):
        items = texts[: 256 if size == 1 else 2048]
        runtime.run_batch([{"text": t} for t in items[:size]], {})
        started = time.perf_counter()
        for i in range(0, len(items), size):
            runtime.run_batch([{"text": t} for t in items[i:i + size]], {})
        print(f"{device:7s} batch {size:4d}: {len(items) / (time.perf_counter() - started):8.1f} sentences/s")
PYEOF
