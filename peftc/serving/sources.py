"""The adapters a served model takes: each read (a CompiledModel, a peftc checkpoint or a PEFT
directory) into per-site (A, B, scale) triples, peftc.ir.lora_bank's `LoraAdapter`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.errors import CheckpointError, SpecError
from peftc.interop.from_peft import CONFIG_FILE, read_peft_weights, resolve_all_linear
from peftc.interop.peft_config import as_config_dict, spec_dict_from_peft
from peftc.interop.peft_keys import PREFIX, normalize
from peftc.ir.lora_bank import LoraAdapter, SiteLora
from peftc.runtime.checkpoint import SPEC_FILE, read_adapter
from peftc.runtime.compiled import CompiledModel
from peftc.spec.parse import Spec


def load_adapter(name: str, source: Any, model: nn.Module) -> LoraAdapter:
    """Read one adapter: a CompiledModel, a peftc checkpoint folder, or a PEFT adapter folder."""
    if isinstance(source, CompiledModel):
        return lora_adapter(name, source.spec, source.adapter_state_dict())
    if not isinstance(source, (str, Path)):
        raise TypeError(f"adapter {name!r}: expected a CompiledModel or an adapter directory, "
                        f"got {type(source).__name__}")
    path = Path(source)
    if (path / SPEC_FILE).is_file():
        spec, tensors = read_adapter(path)
        return lora_adapter(name, spec, tensors)
    if (path / CONFIG_FILE).is_file():
        return _peft_adapter(name, path, model)
    raise CheckpointError(f"adapter {name!r}: {str(path)!r} is neither a peftc checkpoint ({SPEC_FILE}) nor a "
                          f"PEFT adapter directory ({CONFIG_FILE}); save one with cm.save_adapter(dir)")


def lora_adapter(name: str, spec: Spec, tensors: dict[str, torch.Tensor]) -> LoraAdapter:
    """The per-site LoRA of a one-entry LoRA spec and its adapter_state_dict()-named tensors."""
    entry = _only_lora(name, spec)
    slot = spec.entry_names()[0]
    pattern = re.compile(rf"(.+)\.{re.escape(slot)}\.(A|B)$")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise SpecError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B; serving takes adapters "
                            "that are LoRA alone (no trained base parameters or copies)")
        found.setdefault(match.group(1), {})[match.group(2)] = value.detach()
    sites = {}
    for path, pair in found.items():
        if set(pair) != {"A", "B"} or pair["A"].dim() != 2 or pair["B"].dim() != 2:
            raise SpecError(f"adapter {name!r}: site {path!r} has no 2-D A and B pair (a conv or incomplete "
                            "LoRA); serving takes LoRA on linear layers only")
        sites[path] = SiteLora(pair["A"], pair["B"], float(entry.scale_at(path)))
    if not sites:
        raise CheckpointError(f"adapter {name!r} has no LoRA tensors")
    return LoraAdapter(name, sites)


def _only_lora(name: str, spec: Spec):
    methods = [entry.method for entry in spec.adapters]
    if methods != ["lora"]:
        raise SpecError(f"adapter {name!r}: spec adapters are {methods}; serving takes one 'lora' entry "
                        "(merge other methods with cm.merged(), or serve them as separate models)")
    entry = spec.adapters[0]
    if spec.trainable or spec.quantize is not None:
        field = "trainable" if spec.trainable else "quantize"
        raise SpecError(f"adapter {name!r}: spec.{field} is set; served adapters share one unchanged float "
                        f"base, so remove '{field}' from the adapter's spec")
    if entry.gate:
        raise SpecError(f"adapter {name!r}: adapters[0].gate is true; a gated LoRA update depends on the input "
                        "and has no bank form. Serve ungated LoRA adapters")
    return entry


def _peft_adapter(name: str, path: Path, model: nn.Module) -> LoraAdapter:
    config = resolve_all_linear(as_config_dict(path), model)
    if config.get("modules_to_save") or (config.get("bias") or "none") != "none":
        raise SpecError(f"adapter {name!r}: the PEFT config sets modules_to_save or bias; served adapters share "
                        "one unchanged base, so only LoRA A/B weights can be served")
    spec = Spec.from_dict(spec_dict_from_peft(config))
    tensors = {}
    for key, value in read_peft_weights(path, allow_pickle=False).items():
        match = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", normalize(key))
        if match is None or not match.group(1).startswith(PREFIX):
            raise SpecError(f"adapter {name!r}: PEFT tensor {key!r} is not a LoRA A/B weight of a linear layer; "
                            "serving takes LoRA on linear layers only")
        tensors[f"{match.group(1)[len(PREFIX):]}.lora.{match.group(2)}"] = value
    return lora_adapter(name, spec, tensors)
