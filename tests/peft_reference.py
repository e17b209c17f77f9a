"""Build the `peft` package's model for the same base weights and copy peftc's adapter weights in."""

from __future__ import annotations

import copy

import torch

PEFT_PREFIXES = ("base_model.model.",)


def peft_lora(model, cm, targets, r, alpha, dropout=0.0, rslora=False):
    """A PeftModel with LoRA on `targets`, holding exactly the adapter weights of `cm`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        use_rslora=rslora, init_lora_weights=True)
    reference = get_peft_model(copy.deepcopy(model), config)
    copy_lora_weights(cm, reference)
    return reference


@torch.no_grad()
def copy_lora_weights(cm, reference) -> int:
    ours = cm.adapter_state_dict()
    copied = 0
    for name, module in reference.named_modules():
        a = getattr(module, "lora_A", None)
        if a is None or "default" not in a:
            continue
        path = _strip(name)
        module.lora_A["default"].weight.copy_(ours[f"{path}.lora.A"])
        module.lora_B["default"].weight.copy_(ours[f"{path}.lora.B"])
        copied += 1
    for name, module in reference.named_modules():
        a = getattr(module, "lora_embedding_A", None)
        if a is not None and "default" in a:
            path = _strip(name)
            module.lora_embedding_A["default"].copy_(ours[f"{path}.lora.A"])
            module.lora_embedding_B["default"].copy_(ours[f"{path}.lora.B"])
            copied += 1
    assert copied > 0, "no LoRA module found in the peft model"
    return copied


def _strip(name: str) -> str:
    for prefix in PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def trainable_count(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
