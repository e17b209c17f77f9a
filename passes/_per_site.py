"""The loop every per-site method shares: make (or reuse) a site's adapter weights, rewrite its op, record."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

MakeWeights = Callable[[Site, torch.Tensor], nn.Module]  # (site, base weight) -> adapter module
Rewrite = Callable[[GraphModule, Node, Site, PassContext, nn.Module], None]


def rewrite_sites(gm: GraphModule, ctx: PassContext, sites: list[Site], make_weights: MakeWeights,
                  rewrite: Rewrite) -> PassResult:
    """Apply `rewrite` at every site, with the adapter module for (site, ctx.slot); record new parameters.

    Adapter modules are shared by every graph built for the same compile (one per call
    signature), so a module that already exists is reused and not counted again.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    result = PassResult(modified=False)
    for site in sites:
        weight = ctx.base_params[site.param]
        module, created = adapters.get_or_create(
            ctx.adapter_root, site.path, ctx.slot,
            lambda site=site, weight=weight: in_adapter_dtype(ctx, make_weights(site, weight), weight))
        rewrite(gm, nodes[site.node_name], site, ctx, module)
        result.modified = True
        result.sites.append(site.path)
        if created:
            result.params_added.update(adapters.parameter_counts(site.path, ctx.slot, module))
    return result


def in_adapter_dtype(ctx: PassContext, module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """The new adapter module with its float tensors in the spec's adapter dtype for this weight
    (float32 over a half-precision base by default: peftc.ir.adapters.adapter_dtype)."""
    dtype = adapters.adapter_dtype(weight.dtype, getattr(ctx.spec, "adapter_dtype", "float32"))
    return module if dtype == weight.dtype else module.to(dtype=dtype)


def in_virtual_token_dtype(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A virtual-token method's new weights (prompt tuning, p-tuning, prefix tuning): float32 over a half-precision
    base under either adapter_dtype, as HF PEFT keeps them. PEFT builds its prompt encoders in torch's default
    dtype and only moves them to the device (PeftModel._setup_prompt_encoder), and autocast_adapter_dtype=False
    casts tuner layers only (BaseTuner._cast_adapter_dtype, which prompt learning never calls): with peft 0.21.2
    over a bfloat16 LLaMA, prompt, p-tuning and prefix weights are float32 under both, LoRA's bfloat16 under
    False. A drop-in loading those files (from_peft, autocast_adapter_dtype=False: adapter_dtype "base") keeps
    them float32 too: the p-tuning encoder computes in float32 and AdamW's updates are not rounded away, as in
    PEFT; the prompt is cast to the base dtype where it joins the model (in_dtype_of)."""
    dtype = adapters.adapter_dtype(weight.dtype, "float32")
    return module if dtype == weight.dtype else module.to(dtype=dtype)


def in_dtype_of(ins: Inserter, tensor: Node, like: Node) -> Node:
    """`tensor` in `like`'s dtype, for adapters that cast their own values (prompt, p-tuning, prefix): float32
    adapter weights (the spec's adapter_dtype) enter a bfloat16 model rounded once, as PEFT casts its prompts
    and past_key_values to the base dtype. Role "cast_back" tells cast_adapter_dtype this adapter casts itself."""
    dtype = like.meta["val"].dtype
    if tensor.meta["val"].dtype == dtype:
        return tensor
    cast = ins.call(torch.ops.aten._to_copy.default, tensor, dtype=dtype)
    cast.meta["peftc"]["role"] = "cast_back"
    return cast


def site_inserter(gm: GraphModule, node: Node, site: Site, ctx: PassContext, pass_name: str) -> Inserter:
    """An Inserter after `node` whose nodes are tagged with this pass, method, site, slot and entry."""
    tag = {"pass": pass_name, "method": ctx.entry.method, "site": site.path, "slot": ctx.slot,
           "entry": ctx.entry_index}
    return Inserter(gm, node, tag, meta_cache=ctx.meta_cache)
