"""Where adapter parameters live: a module tree mounted at `peftc` on every captured graph.

An adapter for site `model.layers.0.self_attn.q_proj` added by the spec entry named `lora`
lives at `peftc.model.layers.0.self_attn.q_proj.lora`, so its parameters read
`...q_proj.lora.A` / `...q_proj.lora.B` in `adapter_state_dict()`. Graphs captured for other
call signatures mount the same tree, so they share the same parameters.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

ROOT = "peftc"
HALF_DTYPES = (torch.float16, torch.bfloat16)


def adapter_dtype(base_dtype: torch.dtype, policy: str = "float32") -> torch.dtype:
    """The dtype of an adapter tensor beside a base weight of `base_dtype` (the spec's adapter_dtype).

    "float32" (the default, HF PEFT's autocast_adapter_dtype=True): float32 over a float16/bfloat16
    base, so AdamW's small updates are not rounded away; the branch computes in float32 and casts
    its result back (passes/cast_adapter_dtype.py). "base": the base weight's own dtype, but for the
    virtual-token methods (prompt, p-tuning, prefix), float32 under both, as HF PEFT keeps them
    (passes/_per_site.in_virtual_token_dtype).
    Other bases (float32, float64) keep their dtype under either policy.
    """
    return torch.float32 if policy == "float32" and base_dtype in HALF_DTYPES else base_dtype


def module_at(root: nn.Module, path: str, create: bool) -> nn.Module | None:
    current = root
    for part in [p for p in path.split(".") if p]:
        child = current._modules.get(part)
        if child is None:
            if not create:
                return None
            child = nn.Module()
            current.add_module(part, child)
        current = child
    return current


def get_or_create(root: nn.Module, site_path: str, slot: str, factory: Callable[[], nn.Module]) -> tuple[nn.Module, bool]:
    """The adapter module for (site, slot), created by `factory` on first use."""
    parent = module_at(root, site_path, create=True)
    existing = parent._modules.get(slot)
    if existing is not None:
        return existing, False
    module = factory()
    parent.add_module(slot, module)
    return module, True


def target(site_path: str, slot: str, name: str) -> str:
    """get_attr target of an adapter tensor, relative to the graph module."""
    return ".".join(p for p in (ROOT, site_path, slot, name) if p)


def state_name(site_path: str, slot: str, name: str) -> str:
    """The name of an adapter tensor in adapter_state_dict() and in the pass records (no `peftc.` root)."""
    return ".".join(p for p in (site_path, slot, name) if p)


def parameter_counts(site_path: str, slot: str, module) -> dict[str, int]:
    """state_name -> element count for every parameter of an adapter module: what a pass records as added."""
    return {state_name(site_path, slot, name): p.numel() for name, p in module.named_parameters()}


def adapter_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) for every adapter module (those that own tensors directly)."""
    for name, module in root.named_modules():
        if module._parameters or module._buffers:
            yield name, module


def mount(gm: nn.Module, root: nn.Module) -> None:
    if ROOT in gm._modules and gm._modules[ROOT] is not root:
        raise RuntimeError(f"the captured model already has a submodule named {ROOT!r}")
    gm.add_module(ROOT, root)
