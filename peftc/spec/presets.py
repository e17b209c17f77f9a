"""Hybrid presets: spec dicts that combine methods (He et al. 2022's MAM adapter; Mao et al. 2022's UniPELT).

Each returns a plain spec dict, so it can be edited, saved with `Spec.from_dict(...).save(path)`,
or passed straight to `peftc.compile`.
"""

from __future__ import annotations

from typing import Sequence


def mam_adapter(ffn_targets: Sequence[str], *, num_tokens: int = 30, bottleneck: int = 64,
                scale: float = 4.0, activation: str = "relu") -> dict:
    """MAM adapter: prefix tuning at every attention op + a parallel adapter beside the FFN projections."""
    return {"adapters": [
        {"method": "prefix", "num_tokens": num_tokens},
        {"method": "adapter", "targets": list(ffn_targets), "placement": "parallel",
         "bottleneck": bottleneck, "scale": scale, "activation": activation},
    ]}


def unipelt(lora_targets: Sequence[str], adapter_targets: Sequence[str], *, r: int = 8, alpha: float = 16,
            num_tokens: int = 10, bottleneck: int = 48, activation: str = "relu") -> dict:
    """UniPELT: gated LoRA on `lora_targets` + gated prefix + gated serial adapter on `adapter_targets`.

    Each gate is a learned sigmoid of the sub-module's input, so the model learns which method to use.
    """
    return {"adapters": [
        {"method": "lora", "targets": list(lora_targets), "r": r, "alpha": alpha, "gate": True},
        {"method": "prefix", "num_tokens": num_tokens, "gate": True},
        {"method": "adapter", "targets": list(adapter_targets), "placement": "serial",
         "bottleneck": bottleneck, "activation": activation, "gate": True},
    ]}
