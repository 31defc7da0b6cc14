"""PyTorch tensor models saved with torch.export (`model.pt2` + `signature.json`)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from model_store.paths import resolve_model_path
from workers.runtimes.base import (
    InvalidInput,
    Runtime,
    ensure_torch_threads,
    torch_module_bytes,
    torch_parameter_count,
)
from workers.runtimes.tensors import check_shape, decode_tensor, encode_tensor


class TorchExportTensor(Runtime):
    module: torch.nn.Module | None = None  # the exported program's module: set by load(), dropped by close()

    def loaded(self) -> torch.nn.Module:
        if self.module is None:
            raise RuntimeError(f"model {self.spec.id!r} is not loaded")
        return self.module

    def load(self) -> None:
        path = resolve_model_path(self.spec, self.settings)
        program_file, signature_file = path / "model.pt2", path / "signature.json"
        for required in (program_file, signature_file):
            if not required.exists():
                raise RuntimeError(f"model {self.spec.id!r}: {required} is missing")
        self.signature = json.loads(signature_file.read_text())
        try:
            program = torch.export.load(str(program_file))
        except Exception as exc:
            raise RuntimeError(f"model {self.spec.id!r}: {program_file} is not a torch.export program: {exc}") from None
        self.module = program.module().to(self.torch_device, self.torch_dtype())

    def run_batch(self, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        ensure_torch_threads(self.settings)
        decoded = [self._decode(item) for item in inputs]
        sizes = [a[0].shape[0] for a in decoded]
        args = [
            self._to_model(torch.from_numpy(np.concatenate([d[i] for d in decoded])))
            for i in range(len(self.signature["inputs"]))
        ]
        try:
            with torch.inference_mode():
                outputs = self.loaded()(*args)
        except AssertionError as exc:
            # torch.export's input guards (e.g. "Guard failed: features.size()[0] <= 65536", the traced range of a
            # dynamic dimension): the request's fault, not the model's. A batch of several jobs is then retried
            # one by one by the batcher, so only a job too large on its own fails, with invalid_input.
            raise InvalidInput(
                f"the model refuses these inputs: {str(exc).splitlines()[0] if str(exc) else exc!r}"
            ) from None
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        arrays = [
            o.detach().float().cpu().numpy() if o.is_floating_point() else o.detach().cpu().numpy() for o in outputs
        ]
        names = [o["name"] for o in self.signature["outputs"]]
        results, start = [], 0
        for size in sizes:
            results.append({n: encode_tensor(a[start : start + size]) for n, a in zip(names, arrays)})
            start += size
        return results

    def _to_model(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            tensor = tensor.to(self.torch_dtype())
        return tensor.to(self.torch_device)

    def _decode(self, item: Any) -> list[np.ndarray]:
        if not isinstance(item, dict):
            raise InvalidInput("inputs must be an object of named tensors")
        expected = [i["name"] for i in self.signature["inputs"]]
        missing, unknown = set(expected) - set(item), set(item) - set(expected)
        if missing or unknown:
            raise InvalidInput(
                f"inputs must name exactly {expected}; missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        arrays = []
        for meta in self.signature["inputs"]:
            array = decode_tensor(meta["name"], item[meta["name"]], meta["datatype"])
            check_shape(meta["name"], array, meta["shape"])
            if array.shape[0] == 0:
                raise InvalidInput(f"inputs.{meta['name']} has an empty batch dimension")
            arrays.append(array)
        return arrays

    def memory_bytes(self) -> int:
        return torch_module_bytes(self.loaded())

    def describe(self) -> dict[str, Any]:
        return {"parameter_count": torch_parameter_count(self.loaded()), **self.signature}

    def close(self) -> None:
        self.module = None
