"""The method table: every PEFT method peftc knows, in one place.

Adding a method is one file in passes/ (its config dataclass, its pass, its fold) plus one
row here. The table is a constant: spec parsing uses it as an allow-list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from peftc.passes.copy_params import CopyConfig, copy_params
from peftc.passes.insert_adapter import AdapterConfig, insert_adapter
from peftc.passes.insert_lora import LoraConfig, LoraWeights, insert_lora
from peftc.passes.insert_prefix import PrefixConfig, insert_prefix
from peftc.passes.insert_prompt import PromptConfig, insert_prompt


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "reparameterized" | "additive" | "selective"
    config: type
    insert: Callable  # the pass: (gm, ctx) -> PassResult, reading ctx.entry
    fold: Callable | None  # (adapter module, site, weight) -> merged weight; None: not mergeable
    summary: str


def fold_lora(module: LoraWeights, site, weight):
    delta = module.delta_weight().to(weight.dtype)
    return weight + (delta.T if site.layout == "in_out" else delta)


METHODS: dict[str, Method] = {
    "lora": Method("lora", "reparameterized", LoraConfig, insert_lora, fold_lora,
                   "W x + s·B(A x) on linear, conv and embedding ops"),
    "adapter": Method("adapter", "additive", AdapterConfig, insert_adapter, None,
                      "y + s·up(act(down(h))) on linear ops; h = y (serial) or x (parallel)"),
    "prompt": Method("prompt", "additive", PromptConfig, insert_prompt, None,
                     "N learned virtual tokens prepended at the token embedding output"),
    "prefix": Method("prefix", "additive", PrefixConfig, insert_prefix, None,
                     "N learned keys/values prepended at every scaled_dot_product_attention"),
    "copy": Method("copy", "selective", CopyConfig, copy_params, None,
                   "trainable copies of selected base parameters (HF PEFT's modules_to_save)"),
}

# The quantize section's config class (set by the quantized-base pass), or None.
QUANTIZE_CONFIG: Any = None
