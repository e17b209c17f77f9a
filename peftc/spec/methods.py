"""The method table: every PEFT method peftc knows, in one place.

Adding a method is one file in passes/ (its config dataclass, its pass, its fold) plus one
row here. The table is a constant: spec parsing uses it as an allow-list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from peftc.passes._weight_ops import fold_delta

# orthogonal and sparse high-rank methods (OFT, BOFT, HRA, SHiRA)
from peftc.passes._weight_transform import fold_transform
from peftc.passes.copy_params import CopyConfig, copy_params

# -- spectral / budgeted / encoder methods (issue 16)
from peftc.passes.insert_adalora import AdaloraConfig, insert_adalora
from peftc.passes.insert_adapter import AdapterConfig, insert_adapter
from peftc.passes.insert_boft import BoftConfig, insert_boft
from peftc.passes.insert_dora import DoraConfig, fold_dora, insert_dora
from peftc.passes.insert_fourierft import FourierftConfig, insert_fourierft
from peftc.passes.insert_hra import HraConfig, insert_hra
from peftc.passes.insert_ia3 import Ia3Config, fold_ia3, fold_ia3_bias, insert_ia3
from peftc.passes.insert_loha import LohaConfig, insert_loha
from peftc.passes.insert_lokr import LokrConfig, insert_lokr
from peftc.passes.insert_lora import LoraConfig, fold_lora_bias, insert_lora
from peftc.passes.insert_mask import MaskConfig, fold_mask, insert_mask
from peftc.passes.insert_oft import OftConfig, insert_oft
from peftc.passes.insert_p_tuning import PTuningConfig, insert_p_tuning
from peftc.passes.insert_prefix import PrefixConfig, insert_prefix
from peftc.passes.insert_prompt import PromptConfig, insert_prompt
from peftc.passes.insert_shira import ShiraConfig, fold_shira, insert_shira
from peftc.passes.insert_trainable_tokens import (
    TrainableTokensConfig,
    fold_trainable_tokens,
    insert_trainable_tokens,
)
from peftc.passes.insert_vblora import VbloraConfig, insert_vblora
from peftc.passes.insert_vera import VeraConfig, insert_vera
from peftc.passes.quantize_base import QuantizeConfig
from peftc.passes.tune_layer_norms import LnTuningConfig, tune_layer_norms


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "reparameterized" | "additive" | "selective"
    config: type
    insert: Callable  # the pass: (gm, ctx) -> PassResult, reading ctx.entry
    fold: Callable | None  # (adapter module, site, weight) -> merged weight; None: not mergeable
    summary: str
    fold_bias: Callable | None = None  # (adapter module, site, bias) -> merged bias, for output-scaling methods


METHODS: dict[str, Method] = {
    "lora": Method("lora", "reparameterized", LoraConfig, insert_lora, fold_delta,
                   "W x + s·B(A x) on linear, conv and embedding ops", fold_bias=fold_lora_bias),
    "adapter": Method("adapter", "additive", AdapterConfig, insert_adapter, None,
                      "y + s·up(act(down(h))) on linear ops; h = y (serial) or x (parallel)"),
    "prompt": Method("prompt", "additive", PromptConfig, insert_prompt, None,
                     "N learned virtual tokens prepended at the token embedding output"),
    "prefix": Method("prefix", "additive", PrefixConfig, insert_prefix, None,
                     "N learned keys/values prepended at every scaled_dot_product_attention"),
    "copy": Method("copy", "selective", CopyConfig, copy_params, None,
                   "trainable copies of selected base parameters (HF PEFT's modules_to_save)"),
    "dora": Method("dora", "reparameterized", DoraConfig, insert_dora, fold_dora,
                   "(m/||W + s·BA||)·(W x + s·B A x) on linear ops, the norm detached"),
    "loha": Method("loha", "reparameterized", LohaConfig, insert_loha, fold_delta,
                   "W x + op(x, s·(W1a W1b) ⊙ (W2a W2b)) on linear and conv ops"),
    "lokr": Method("lokr", "reparameterized", LokrConfig, insert_lokr, fold_delta,
                   "W x + op(x, s·kron(W1, W2a W2b)) on linear and conv ops"),
    "vera": Method("vera", "reparameterized", VeraConfig, insert_vera, fold_delta,
                   "W x + λb ⊙ B(λd ⊙ A x), A and B shared, frozen, seeded, on linear ops"),
    "ia3": Method("ia3", "additive", Ia3Config, insert_ia3, fold_ia3,
                  "l ⊙ (W x + b), or W (l ⊙ x) on feedforward sites, on linear ops", fold_bias=fold_ia3_bias),
    "mask": Method("mask", "selective", MaskConfig, insert_mask, fold_mask,
                   "W x + op(x, ΔW), ΔW sparse: a fixed `density` of entries (by magnitude or seeded random) train"),
    # -- orthogonal and sparse high-rank methods --
    "oft": Method("oft", "reparameterized", OftConfig, insert_oft, fold_transform,
                  "W·block-diag(R)ᵀ on linear and conv ops, R = Cayley(skew Q) per block"),
    "boft": Method("boft", "reparameterized", BoftConfig, insert_boft, fold_transform,
                   "s ⊙ (W·Mᵀ) on linear and conv ops, M a butterfly product of orthogonal block-diagonals"),
    "hra": Method("hra", "reparameterized", HraConfig, insert_hra, fold_transform,
                  "W·H₁⋯H_r on linear and conv ops, H_i = I − 2uᵢuᵢᵀ Householder reflections"),
    "shira": Method("shira", "selective", ShiraConfig, insert_shira, fold_shira,
                    "W x + op(x, ΔW) on linear ops, ΔW sparse: r·(out + in) seeded random entries train"),
    # -- spectral / budgeted / encoder methods (issue 16)
    "adalora": Method("adalora", "reparameterized", AdaloraConfig, insert_adalora, fold_delta,
                      "W x + s/r0·P(Λ ⊙ Q x) on linear ops, ranks pruned by importance; orthogonality term on the loss"),
    "fourierft": Method("fourierft", "reparameterized", FourierftConfig, insert_fourierft, fold_delta,
                        "W x + op(x, s·Re(ifft2(S))), S trained at n seeded frequencies, on linear ops"),
    "vblora": Method("vblora", "reparameterized", VbloraConfig, insert_vblora, fold_delta,
                     "W x + B(A x) on linear ops, A and B sub-vectors top-k mixes of one shared vector bank"),
    "p_tuning": Method("p_tuning", "additive", PTuningConfig, insert_p_tuning, None,
                       "N virtual tokens from an MLP/LSTM prompt encoder, prepended at the token embedding output"),
    "ln_tuning": Method("ln_tuning", "selective", LnTuningConfig, tune_layer_norms, None,
                        "trainable copies of the targeted normalization layers (HF PEFT's LN_TUNING)"),
    "trainable_tokens": Method("trainable_tokens", "selective", TrainableTokensConfig, insert_trainable_tokens,
                               fold_trainable_tokens, "rows `indices` of an embedding train (wherever it is read)"),
}

# The quantize section's config class (set by the quantized-base pass), or None.
QUANTIZE_CONFIG: Any = QuantizeConfig
