"""The adapters a served model takes: each read (a CompiledModel, a peftc checkpoint or a PEFT
directory) into what it does per site, peftc.ir.lora_bank's `ServedAdapter`.

LoRA folders are read directly (no capture). Other methods (DoRA, VeRA, IA3, bottleneck adapters,
prompt and prefix tuning) are read from the
modules of their compiled model: a folder is first compiled on the same base
(interop.load_adapter_dir), so peftc's own passes define what each tensor means. Those compiles
share one capture store, so the base is exported once for all of them (not once per folder).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.capture.captured import CapturedGraphs
from peftc.compiler.compilation import sliding_windows
from peftc.errors import CheckpointError, SpecError
from peftc.interop.from_peft import (
    CONFIG_FILE,
    load_adapter_dir,
    read_peft_weights,
    resolve_all_linear,
)
from peftc.interop.peft_config import as_config_dict, spec_dict_from_peft
from peftc.interop.peft_keys import PREFIX, normalize
from peftc.ir.lora_bank import ServedAdapter, SiteAdapter, SiteBottleneck, SiteLora, SitePrefix
from peftc.passes.insert_adapter import AdapterWeights
from peftc.passes.insert_dora import DoraWeights
from peftc.passes.insert_ia3 import Ia3Weights
from peftc.passes.insert_prefix import PrefixWeights
from peftc.passes.insert_prompt import PromptWeights
from peftc.passes.insert_vera import VeraWeights
from peftc.passes.lower_prefix_multi import SLIDING_PREFIX_REFUSED
from peftc.runtime.checkpoint import SPEC_FILE, is_trainer_folder, read_adapter, trainer_folder_message
from peftc.runtime.compiled import CompiledModel
from peftc.spec.parse import Spec

SERVED_METHODS = ("lora", "dora", "vera", "ia3", "adapter", "prompt", "prefix")
PER_SITE_MODULES = (DoraWeights, VeraWeights, Ia3Weights, AdapterWeights, PromptWeights, PrefixWeights)


def load_adapter(name: str, source: Any, model: nn.Module, example: tuple[tuple, dict],
                 captured: CapturedGraphs | None = None) -> ServedAdapter:
    """Read one adapter: a CompiledModel, a peftc checkpoint folder, or a PEFT adapter folder.

    `example` is the (args, kwargs) a folder of a non-LoRA method is compiled with; `captured` the capture
    store those compiles share (`CapturedGraphs(across_views=True)`: one export for all folders' compiles)."""
    if isinstance(source, CompiledModel):
        return compiled_adapter(name, source)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"adapter {name!r}: expected a CompiledModel or an adapter directory, "
                        f"got {type(source).__name__}")
    path = Path(source)
    if (path / SPEC_FILE).is_file():
        spec, tensors = read_adapter(path)
        if _only_one(name, spec).method == "lora":
            return lora_adapter(name, spec, tensors)
    elif (path / CONFIG_FILE).is_file():
        config = resolve_all_linear(as_config_dict(path), model)
        spec = Spec.from_dict(spec_dict_from_peft(config))
        if _only_one(name, spec).method == "lora":
            return _peft_adapter(name, path, model)
    elif is_trainer_folder(path):
        raise CheckpointError(f"adapter {name!r}: {trainer_folder_message(path)}")
    else:
        raise CheckpointError(f"adapter {name!r}: {str(path)!r} is neither a peftc checkpoint ({SPEC_FILE}) nor a "
                              f"PEFT adapter directory ({CONFIG_FILE}); save one with cm.save_adapter(dir)")
    refuse_before_compiling(name, spec, model)
    args, kwargs = example
    return compiled_adapter(name, load_adapter_dir(model, path, captured=captured, example_inputs=args,
                                                   example_kwargs=kwargs))


def refuse_before_compiling(name: str, spec: Spec, model: nn.Module) -> None:
    """The served plan's refusals a folder's method meets on this model, before its compile's seconds are spent
    (the pass, passes/lower_prefix_multi.py, refuses the same for compiled sources)."""
    if _only_one(name, spec).method == "prefix" and sliding_windows(model):
        raise SpecError(f"adapter {name!r}: {SLIDING_PREFIX_REFUSED}")


def compiled_adapter(name: str, cm: CompiledModel) -> ServedAdapter:
    """What a one-entry compiled adapter does per site, read from its adapter modules."""
    entry = _only_one(name, cm.spec)
    if entry.method == "lora":
        return lora_adapter(name, cm.spec, cm.adapter_state_dict())
    slot = cm.spec.entry_names()[0]
    sites = {}
    for path, module in cm.adapter_root.named_modules():
        site_path = path[: -len(slot) - 1] if path.endswith("." + slot) else None
        if site_path is not None and isinstance(module, PER_SITE_MODULES):
            sites[site_path] = _site_adapter(module, entry)
    if not sites:
        raise CheckpointError(f"adapter {name!r} has no {entry.method} tensors at any site")
    return ServedAdapter(name, entry.method, sites)


@torch.no_grad()
def _site_adapter(module: nn.Module, entry) -> SiteAdapter:
    if isinstance(module, PromptWeights):
        return SiteAdapter(prompt=module.embedding.detach().clone())
    if isinstance(module, PrefixWeights):
        return SiteAdapter(prefix=SitePrefix(module.key.detach().clone(), module.value.detach().clone()))
    if isinstance(module, AdapterWeights):
        copies = [t.detach().clone() for t in (module.down, module.down_bias, module.up, module.up_bias)]
        return SiteAdapter(bottleneck=SiteBottleneck(*copies, float(entry.scale), entry.activation, entry.placement))
    if isinstance(module, DoraWeights):
        return SiteAdapter(lora=SiteLora(module.A.detach().clone(), module.B.detach().clone(), float(module.scale)),
                           magnitude=module.magnitude.detach().clone())
    if isinstance(module, VeraWeights):  # (λb ⊙ B[:out]) (λd ⊙ A[:, :in]): a LoRA pair of rank r, scale 1
        a = module.lambda_d[:, None] * module.projections.A[:, : module.in_features]
        b = module.lambda_b[:, None] * module.projections.B[: module.out_features, :]
        return SiteAdapter(lora=SiteLora(a.clone(), b.clone(), 1.0))
    if module.feedforward:
        return SiteAdapter(input_scale=module.l.detach().clone())
    return SiteAdapter(output_scale=module.l.detach().clone())


def lora_adapter(name: str, spec: Spec, tensors: dict[str, torch.Tensor]) -> ServedAdapter:
    """The per-site LoRA of a one-entry LoRA spec and its adapter_state_dict()-named tensors."""
    entry = _only_one(name, spec)
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
        sites[path] = SiteAdapter(lora=SiteLora(pair["A"], pair["B"], float(entry.scale_at(path))))
    if not sites:
        raise CheckpointError(f"adapter {name!r} has no LoRA tensors")
    return ServedAdapter(name, "lora", sites)


BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")  # LoRA inits whose base is not the model's W


def _only_one(name: str, spec: Spec):
    methods = [entry.method for entry in spec.adapters]
    if len(methods) != 1 or methods[0] not in SERVED_METHODS:
        raise SpecError(f"adapter {name!r}: spec adapters are {methods}; serving takes one entry of "
                        f"{list(SERVED_METHODS)} (merge other methods with cm.merged(), or serve them as separate "
                        "models)")
    entry = spec.adapters[0]
    if spec.trainable or spec.quantize is not None:
        field = "trainable" if spec.trainable else "quantize"
        raise SpecError(f"adapter {name!r}: spec.{field} is set; served adapters share one unchanged float "
                        f"base, so remove '{field}' from the adapter's spec")
    if getattr(entry, "init", "default") in BASE_CHANGING_INITS:
        raise SpecError(f"adapter {name!r}: adapters[0].init is {entry.init!r}, which changes the base weight; "
                        "served adapters share one unchanged base, so save it as plain LoRA first "
                        "(cm.save_adapter(dir, format='peft_lora'); LoftQ's quantized base has no such form)")
    if getattr(entry, "gate", False):
        raise SpecError(f"adapter {name!r}: adapters[0].gate is true; a gated update depends on the input "
                        "and has no bank form. Serve ungated adapters")
    return entry


def _peft_adapter(name: str, path: Path, model: nn.Module) -> ServedAdapter:
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
