"""merge_adapters: fold each mergeable adapter into its base weight and delete its nodes."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.ir import adapters
from peftc.ir.graph_edit import PROVENANCE_KEY, erase_nodes, provenance
from peftc.pipeline.runner import PassContext, PassResult

from . import _merge_quantized
from ._weight_ops import bias_param
from .copy_params import ParamCopies


def merge_adapters(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace W by fold(W) for every adapter whose method can fold, and erase that adapter's nodes.

    Merged weights are new tensors set on this graph module only: the base weights, shared
    with the user's model and the compiled model, are never written. The first graph merged
    leaves them in `ctx.merge.weights`, so graphs for other call signatures reuse one copy.
    """
    precomputed = ctx.merge.weights
    merged: dict[str, torch.Tensor] = {}
    kept: list[str] = []
    sites = {s.path: s for s in ctx.sites}
    result = PassResult(modified=False)
    for group in _adapter_groups(gm):
        tag = provenance(group[0])
        method = ctx.methods[tag["method"]]
        if isinstance(_adapter_module(gm, tag), ParamCopies):  # copy, ln_tuning: the copy is the weight
            _fold_copies(gm, group, ctx, merged, fresh=precomputed is None)
            result.modified = True
            result.sites.append(tag["site"])
            continue
        if method.fold is None or not _foldable(gm, tag):
            kept.append(f"{tag['method']} at {tag['site']}")
            continue
        site = sites[tag["site"]]
        _refuse_shared_weight(gm, site)
        if precomputed is None:
            module = getattr(gm, adapters.ROOT).get_submodule(f"{tag['site']}.{tag['slot']}")
            base = merged.get(site.param)
            if base is None:
                base = (_merge_quantized.base_weight(ctx, site) if _merge_quantized.is_quantized(ctx, site.param)
                        else gm.get_parameter(site.param))
            with torch.no_grad():
                merged[site.param] = method.fold(module, site, base).detach()
                if method.fold_bias is not None:
                    _fold_bias(gm, site, method, module, merged)
        # One output per op reading the weight: a layer called twice has two.
        for output in [n for n in group if provenance(n).get("role") == "output"]:
            output.replace_all_uses_with(output.args[0])
        erase_nodes(gm, group)
        result.modified = True
        result.sites.append(site.path)
    final = merged if precomputed is None else precomputed
    final, quantized_notes = _merge_quantized.settle(gm, ctx, final)  # no-op without a quantized base
    for name, value in final.items():
        _set_parameter(gm, name, value)
    ctx.merge.weights = final
    _drop_adapter_tree_if_unused(gm)
    result.notes = [f"kept as graph ops (not mergeable): {k}" for k in kept] + quantized_notes
    result.modified = result.modified or bool(quantized_notes)
    return result


def _adapter_module(gm: GraphModule, tag: dict) -> nn.Module:
    path = f"{tag['site']}.{tag['slot']}" if tag["site"] else tag["slot"]
    return getattr(gm, adapters.ROOT).get_submodule(path)


def _foldable(gm: GraphModule, tag: dict) -> bool:
    """False for an adapter whose update depends on the input (a gated LoRA), though its method folds."""
    return getattr(_adapter_module(gm, tag), "foldable", True)


def _fold_copies(gm: GraphModule, group: list[Node], ctx: PassContext, merged: dict, fresh: bool) -> None:
    """Point each read of a trained copy (copy_params: `peftc.<owner>.<slot>.<leaf>`) back at the base
    parameter `<owner>.<leaf>`, which takes the copy's value: HF PEFT's modules_to_save merge."""
    owner = provenance(group[0])["site"]
    for node in group:
        base = ".".join(filter(None, (owner, str(node.target).rpartition(".")[2])))
        twins = [n for n, p in ctx.base_params.items() if n != base and p is ctx.base_params[base]]
        if twins:
            raise NotImplementedError(
                f"cannot merge the trained copy of {base!r}: it is tied to {twins} (tied weights), and "
                "writing it would change those too; untie the weights before compiling, or keep the compiled model")
        if fresh:
            merged[base] = gm.get_parameter(str(node.target)).detach().clone()
        node.target = base
        node.meta.pop(PROVENANCE_KEY, None)  # a base parameter read now, no adapter node


def _fold_bias(gm: GraphModule, site, method, module, merged: dict) -> None:
    """Output-scaling methods (IA3) rescale the op's bias as well as its weight; LoRA's lora_bias adds to it.
    A fold that returns the bias itself (LoRA without lora_bias) changes nothing, so nothing is set."""
    name = bias_param(gm, site)
    if name is not None:
        bias = merged.get(name, gm.get_parameter(name))
        folded = method.fold_bias(module, site, bias)
        if folded is not bias:
            merged[name] = folded.detach()


def _adapter_groups(gm: GraphModule) -> list[list[Node]]:
    """Inserted nodes grouped by (entry, site, slot), in the order the entries were applied."""
    groups: dict[tuple, list[Node]] = {}
    for node in gm.graph.nodes:
        tag = provenance(node)
        if tag is not None and tag.get("slot") is not None:
            groups.setdefault((tag["entry"], tag["site"], tag["slot"]), []).append(node)
    return [groups[key] for key in sorted(groups, key=lambda k: k[0])]


def _refuse_shared_weight(gm: GraphModule, site) -> None:
    """A weight read by ops of another module too (tied embeddings) cannot be folded in place."""
    readers = {
        user.meta.get("nn_module_stack", {}) and list(user.meta["nn_module_stack"].values())[-1][0]
        for node in gm.graph.nodes if node.op == "get_attr" and node.target == site.param
        for user in node.users
    }
    if len(readers) > 1:
        raise NotImplementedError(
            f"cannot merge into {site.param!r}: it is shared by {sorted(map(str, readers))} (tied weights); "
            "untie the weights before compiling, or keep the adapter unmerged")


def _set_parameter(gm: GraphModule, name: str, value: torch.Tensor) -> None:
    """Register a merged tensor at `name` on `gm` alone (its module tree is gm's own copy)."""
    owner_path, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _drop_adapter_tree_if_unused(gm: GraphModule) -> None:
    prefix = adapters.ROOT + "."
    if not any(n.op == "get_attr" and str(n.target).startswith(prefix) for n in gm.graph.nodes):
        gm._modules.pop(adapters.ROOT, None)
