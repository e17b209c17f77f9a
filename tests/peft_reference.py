"""Build the `peft` package's model for the same base weights and copy peftc's adapter weights in."""

from __future__ import annotations

import copy
import dataclasses
import re

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


def peft_lora_grads(reference) -> dict[str, torch.Tensor]:
    """PEFT's LoRA gradients under peftc's adapter names ("<path>.lora.A"), as copy_lora_weights maps them."""
    grads = {}
    for name, module in reference.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            path = _strip(name)
            grads[f"{path}.lora.A"] = module.lora_A["default"].weight.grad
            grads[f"{path}.lora.B"] = module.lora_B["default"].weight.grad
    return grads


def _strip(name: str) -> str:
    for prefix in PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def trainable_count(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# -- helpers the method test files share (reparam, orthogonal, spectral) ------------------------------
def entry_sites(cm, index: int) -> list[str]:
    """The site paths spec entry `index` rewrote, from the pass records."""
    return [s for r in cm.records if r.entry_index == index for s in r.sites]


def adapter_module(cm, path: str, slot: str):
    """The adapter module of `slot` at site `path` (a module shared by all sites when `path` is '')."""
    return getattr(cm.graph_module, "peftc").get_submodule(f"{path}.{slot}" if path else slot)


def sharpened(family, classifier_scale: float = 1.0):
    """The family with query/key weights x10 (and the classifier x `classifier_scale`): at init (std 0.02)
    attention is near uniform and BERT's logits are ~0.03, which would hide most of what an adapter does."""

    def build():
        model = family.build()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if re.search(r"(query|key|q_proj|k_proj)\.weight$", name):
                    p.mul_(10)
                elif name.startswith("classifier.") and classifier_scale != 1.0:
                    p.mul_(classifier_scale)
        return model

    return dataclasses.replace(family, build=build)


def inputs_like_capture(family, batch: int, seq: int) -> dict:
    """Family inputs plus the all-ones attention mask peftc's own HF example inputs carry, so calls reuse
    the graph captured at compile time instead of capturing another call signature."""
    inputs = family.inputs(batch, seq)
    if family.hf and "input_ids" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def save_random_peft_folders(build, configs: dict, folder, seed: int, scale: float = 0.5, offset: float = 0.0) -> None:
    """One PEFT folder per named config under `folder`, each on a fresh `build()` with its trainable
    tensors set to offset + scale * N(0, 1) (non-zero, so every adapter changes the output)."""
    from peft import get_peft_model

    g = torch.Generator().manual_seed(seed)
    for name, config in configs.items():
        pm = get_peft_model(build(), config)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.copy_(offset + torch.randn(p.shape, generator=g) * scale)
        pm.save_pretrained(folder / name)
