"""lower_lora_triton: replace each base matmul + LoRA branch by one fused peftc::lora_linear op."""

from __future__ import annotations

import warnings

import peftc.codegen.triton  # noqa: F401  (registers torch.ops.peftc.*)
import torch
from peftc.codegen.triton.dispatch import triton_ready
from torch.fx import GraphModule

from peftc.core.paths import group_paths
from peftc.ir.graph_edit import Inserter, erase_nodes
from peftc.pipeline.runner import PassContext, PassResult

from ._lora_subgraph import LoraMatch, lora_groups, match_lora

aten = torch.ops.aten
FALLBACK_WARNING = ("peftc: backend='triton' found no CUDA device with Triton; the fused LoRA ops run "
                    "their torch implementation (the Triton kernels run once inputs are on CUDA)")


def lower_lora_triton(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Fuse x W^T + s (x A^T) B^T (W float or packed int8/int4/nf4) into one custom op per linear site."""
    sites = {s.path: s for s in ctx.sites}
    result = PassResult(modified=False)
    lowered: dict[str, list[str]] = {}
    kept: list[str] = []
    for group in lora_groups(gm):
        tag = group[0].meta["peftc"]
        match = match_lora(gm, group, sites[tag["site"]], ctx.trainable)
        if isinstance(match, str):
            kept.append(f"{tag['site']} ({match})")
            continue
        op_name = _replace(gm, match)
        backend = "triton" if triton_ready(ctx.base_params[match.site.param].device) else "torch"
        lowered.setdefault(f"{op_name}, backend {backend}", []).append(match.site.path)
        result.modified = True
        result.sites.append(match.site.path)
    if any(key.endswith("backend torch") for key in lowered):
        warnings.warn(FALLBACK_WARNING, stacklevel=2)
    result.notes = _notes(lowered, kept)
    return result


def _replace(gm: GraphModule, match: LoraMatch) -> str:
    tag = {key: match.tag[key] for key in ("method", "site", "slot", "entry")}
    ins = Inserter(gm, match.output, {"pass": "lower_lora_triton", **tag, "role": "output"})
    lora = (match.a, match.b, match.scale, match.x_lora)
    if match.packed is not None:  # quantized_linear + LoRA: dequantize inside the fused matmul
        qdata, *layout = match.packed
        fused = ins.call(torch.ops.peftc.lora_linear_q.default, match.x, qdata, match.bias, *layout, *lora)
    else:
        weight = ins.call(aten.t.default, match.weight) if match.transpose_weight else match.weight
        fused = ins.call(torch.ops.peftc.lora_linear.default, match.x, weight, match.bias, *lora)
    match.output.replace_all_uses_with(fused)
    erase_nodes(gm, match.erase)
    return str(fused.target).replace(".default", "")


def _notes(lowered: dict[str, list[str]], kept: list[str]) -> list[str]:
    notes = [f"lowered to {key}: " + ", ".join(label for label, _ in group_paths(paths))
             for key, paths in lowered.items()]
    if kept:
        notes.append("left as graph ops: " + ", ".join(kept))
    return notes
