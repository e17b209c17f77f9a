"""tune_layer_norms: LN tuning (Zhao et al., 2023) as HF PEFT's LN_TUNING: trainable copies of the
targeted normalization modules' parameters, read wherever the graph read the originals.

It is copy_params on the selected modules; a method of its own so the spec says what it means and
PEFT checkpoints name the tensors `<module>.ln_tuning_layers.<param>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

from peftc.pipeline.runner import PassContext, PassResult

from .copy_params import CopyConfig, copy_params


@dataclass(frozen=True)
class LnTuningConfig(CopyConfig):
    """`targets`: the normalization modules (e.g. ["input_layernorm", "post_attention_layernorm"])."""

    method = "ln_tuning"


def tune_layer_norms(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Read trainable copies of the targeted modules' parameters (all of them, or `params`)."""
    return copy_params(gm, ctx)
