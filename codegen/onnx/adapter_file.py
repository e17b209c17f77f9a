"""export_adapter: one LoRA adapter in ONNX Runtime's adapter format (onnxruntime.AdapterFormat).

The file maps graph-input names (`peftc.<site>.<slot>.A` / `.B`) to tensors. B is stored
pre-multiplied by the LoRA scale (alpha/r, or alpha/sqrt(r) with rslora), because a model
exported with merge=False has no scale in its graph: any rank and alpha fit the same model.
Load it with `onnxruntime.LoraAdapter.Load(path)` and activate it per run with
`RunOptions.add_active_adapter(adapter)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from peftc.errors import ExportError
from peftc.ir import adapters
from peftc.runtime.checkpoint import read_adapter

from peftc.core.files import atomic_file

ADAPTER_VERSION = 1
MODEL_VERSION = 1


def export_adapter(cm_or_adapter_dir, path) -> Path:
    """Write the LoRA weights of a CompiledModel, or of a folder saved by save_adapter, to `path`."""
    spec, tensors = _source(cm_or_adapter_dir)
    parameters = lora_parameters(spec, tensors)
    path = Path(path)
    with atomic_file(path, ExportError) as tmp:
        _write(parameters, tmp)
    return path


def _source(cm_or_adapter_dir):
    if isinstance(cm_or_adapter_dir, (str, Path)):
        return read_adapter(cm_or_adapter_dir)
    if hasattr(cm_or_adapter_dir, "adapter_state_dict") and hasattr(cm_or_adapter_dir, "spec"):
        return cm_or_adapter_dir.spec, cm_or_adapter_dir.adapter_state_dict()
    raise ExportError(f"export_adapter: expected a CompiledModel or an adapter folder, got "
                      f"{type(cm_or_adapter_dir).__name__}")


def lora_parameters(spec, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Graph-input name -> array, with B scaled; other methods cannot be swapped at run time."""
    slots = dict(zip(spec.entry_names(), spec.adapters))
    others = sorted({e.method for e in spec.adapters if e.method != "lora"})
    if others:
        raise ExportError(f"export_adapter: only LoRA adapters can be swapped in ONNX Runtime; the spec also has "
                          f"{others}. Export those merged instead: export_onnx(cm, path, merge=True)")
    parameters = {}
    for key, tensor in tensors.items():
        site_slot, _, factor = key.rpartition(".")
        slot = site_slot.rpartition(".")[2]
        if slot not in slots or factor not in ("A", "B"):
            raise ExportError(f"export_adapter: {key!r} is not a LoRA factor (trainable base parameters cannot "
                              "be swapped at run time); export this model with merge=True")
        array = tensor.detach().to("cpu", torch.float32)
        if factor == "B":
            array = array * _scale(slots[slot], site_slot.rpartition(".")[0])
        parameters[f"{adapters.ROOT}.{key}"] = array.contiguous().numpy()
    return parameters


def _scale(entry, site_path: str) -> float:
    """The LoRA scale at one site (rank_pattern / alpha_pattern aware)."""
    return entry.scale_at(site_path) if hasattr(entry, "scale_at") else entry.scale


def _write(parameters: dict[str, np.ndarray], path: Path) -> None:
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(ADAPTER_VERSION)
    adapter.set_model_version(MODEL_VERSION)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in parameters.items()})
    adapter.export_adapter(str(path))
