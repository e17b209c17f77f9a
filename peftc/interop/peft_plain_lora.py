"""save_adapter(dir, format="peft_lora"): a residual-init LoRA (PiSSA, OLoRA, CorDA) as plain LoRA on the
original weights, what PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) writes.

The trained update on the residual base, (W - s·B0 A0) + s·B A, is W + s·(B A - B0 A0) = W + s·[B, -B0] [A; A0]:
a LoRA of rank 2r with alpha doubled (the scale kept), loadable by `PeftModel.from_pretrained` onto the
untouched model with init_lora_weights=True — no base recomputation, no calibration data.
"""

from __future__ import annotations

import torch

from peftc.errors import SpecError


def as_plain_lora(cm, config: dict, tensors: dict, names: dict) -> None:
    """Rewrite `config` and `tensors` (PEFT keys) in place; `names` maps peftc tensor names to PEFT keys."""
    if config.get("peft_type") != "LORA":
        raise SpecError(f"save_adapter(format='peft_lora'): converts LoRA adapters; this one is "
                        f"{config.get('peft_type')}")
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise SpecError("save_adapter(format='peft_lora'): rslora with rank_pattern / alpha_pattern has no "
                        "rank-2r form with the same scales (PEFT refuses it too); save with format='peft'")
    for name, key in names.items():
        owner, _, leaf = name.rpartition(".")
        module = cm.adapter_root.get_submodule(owner)
        if leaf == "A" and hasattr(module, "A0"):
            tensors[key] = torch.cat([tensors[key], module.A0.detach().to(tensors[key].dtype)], dim=0)
        elif leaf == "B" and hasattr(module, "B0"):
            tensors[key] = torch.cat([tensors[key], -module.B0.detach().to(tensors[key].dtype)], dim=1)
    config["init_lora_weights"] = True
    for sub in ("corda_config", "loftq_config", "eva_config"):
        config.pop(sub, None)
    config["r"] *= 2
    config["lora_alpha"] *= 2 ** 0.5 if config.get("use_rslora") else 2
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()}
