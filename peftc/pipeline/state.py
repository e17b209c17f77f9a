"""What passes hand to later passes and to the graphs built after them: typed, never a dict of keys.

A Compilation builds one graph per call signature and plan. Some results must be shared by
all of them so they read the same tensors: the packed base weights of quantize_base
(`SharedState`, one per Compilation) and, for one `merged()` model, the folded weights its
first graph computed (`MergeState`, one per merged plan). Options are validated once, where
the user passes them (`MergeOptions.of`), never again inside a pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class SharedState:
    """Per Compilation: what one graph's passes leave for every other graph of the same compile."""

    quantized: nn.Module | None = None  # quantize_base's QuantizedWeight tree, mounted on every graph
    # LoRA's init "loftq": param FQN -> (A, B), the correction of the LoftQ base quantize_base packed
    # (passes/_lora_inits.py); insert_lora starts from them
    loftq: dict[str, Any] = field(default_factory=dict)
    # LoRA's inits "corda" / "eva": the sites' input statistics on calibration data (peftc.ir.calibration),
    # gathered before the first build; None when the compile was given no calibration data
    calibration: Any = None
    # Per decoder layer, in order: the sliding window it attends within, or None (full attention); empty for
    # models with no sliding layers. Prefix tuning hides its keys from queries past the window, as PEFT's
    # KV-cache prefix is (passes/insert_prefix.py).
    attention_windows: tuple = ()


@dataclass(frozen=True)
class MergeOptions:
    """merged(...)'s options on a quantized base (see passes/_merge_quantized.py)."""

    dtype: torch.dtype | None = None  # store dequantized W + ΔW in this dtype (default: the weight's)
    requantize: bool = False  # pack W + ΔW again and report how much of ΔW survived
    base_state_dict: dict[str, torch.Tensor] | None = None  # fold into the original W, not the dequantized one

    @classmethod
    def of(cls, *, dtype: torch.dtype | None = None, requantize: bool = False,
           base_state_dict: dict | None = None, quantized_base: bool) -> "MergeOptions":
        """Validated options; on a float base every option is an error (there is nothing to dequantize)."""
        given = [name for name, value in (("dtype", dtype), ("requantize", requantize),
                                          ("base_state_dict", base_state_dict)) if value not in (None, False)]
        if given and not quantized_base:
            raise ValueError(f"merged({', '.join(given)}=...) applies to a quantized base; "
                             "this model's spec has no 'quantize' section")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"merged(dtype=...): expected a floating torch.dtype, got {dtype!r}")
        if not isinstance(requantize, bool):
            raise ValueError(f"merged(requantize=...): expected True or False, got {requantize!r}")
        if base_state_dict is not None and not isinstance(base_state_dict, dict):
            raise ValueError("merged(base_state_dict=...): expected the compiled model's original "
                             f"state_dict() (a dict), got {type(base_state_dict).__name__}")
        return cls(dtype, requantize, base_state_dict)


@dataclass(eq=False)
class MergeState:
    """Per merged plan: the folded weights, computed by its first graph and reused by the others."""

    options: MergeOptions = field(default_factory=MergeOptions)
    weights: dict[str, torch.Tensor] | None = None  # param FQN -> merged tensor
    requantized: dict[str, nn.Module] = field(default_factory=dict)  # param FQN -> new QuantizedWeight
    requantization: dict[str, Any] | None = None  # survival report (requantize=True)
