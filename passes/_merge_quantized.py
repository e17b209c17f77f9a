"""merge_adapters on a quantized base: merged weights in full precision, or requantized with a survival report.

Requantizing W_q + ΔW erases small adapters: at ‖ΔW‖/‖W‖ ≈ 1% almost no NF4 code moves. So by
default every quantized site comes back in full precision (dequantized W, plus ΔW where an
adapter folds), stored in `dtype` (default: the user's weight dtype). `requantize=True` packs
W_q + ΔW again and records how much of the adapters' effect survived; with `base_state_dict`
the original full-precision W replaces the dequantized one in both cases.

Options come from `ctx.merge.options`, validated where the user gave them (`CompiledModel.merged`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.errors import SpecError
from peftc.ir import quantized, weight_codec
from peftc.ir.graph_edit import provenance
from peftc.ir.sites import Site

aten = torch.ops.aten
def is_quantized(ctx, param: str) -> bool:
    root = ctx.shared.quantized
    return root is not None and quantized.weight_module(root, param) is not None


def base_weight(ctx, site: Site) -> torch.Tensor:
    """The base weight an adapter folds into, in the site's layout: the original W if given, else W_q dequantized."""
    source = ctx.merge.options.base_state_dict
    if source is not None:
        if site.param not in source:
            raise SpecError(f"merged(base_state_dict=...): no tensor named {site.param!r}; pass the "
                            "state_dict() of the model that was compiled")
        return source[site.param].detach().float()
    weight = quantized.weight_module(ctx.shared.quantized, site.param).dequantize(torch.float32)
    return weight.T if site.layout == "in_out" else weight


def settle(gm: GraphModule, ctx, merged: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Finish every quantized site of `gm`; return the full-precision weights still to set, and notes."""
    if ctx.shared.quantized is None:
        return merged, []
    opts = ctx.merge.options
    root = _own_root(gm, ctx.shared.quantized)
    sites = {s.param: s for s in ctx.sites if is_quantized(ctx, s.param)}
    if opts.requantize:
        notes = _requantize(gm, ctx, root, {p: w for p, w in merged.items() if p in sites}, sites)
        return {p: w for p, w in merged.items() if p not in sites}, notes
    out = dict(merged)
    for param, site in sites.items():
        weight = out.get(param)
        if weight is None:
            weight = base_weight(ctx, site)
        dtype = opts.dtype or ctx.base_params[param].dtype
        out[param] = weight.to(dtype)
        _set_weight(gm, param, out[param])
        _unquantize_nodes(gm, site, out[param])
        _remove_leaf(root, param)
    if not quantized.quantized_weights(root):
        gm._modules.pop(quantized.ROOT, None)
    return out, [f"dequantized {len(sites)} quantized base weights to full precision"] if sites else []


def _own_root(gm: GraphModule, shared: nn.Module) -> nn.Module:
    """A fresh tree for this merged graph with the same leaves: the compiled model's tree is never edited."""
    root = nn.Module()
    for param, module in quantized.quantized_weights(shared).items():
        quantized.put_weight(root, param, module)
    gm.add_module(quantized.ROOT, root)
    return root


def _set_weight(gm: GraphModule, param: str, weight: torch.Tensor) -> None:
    owner_path, _, leaf = param.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner._parameters[leaf] = nn.Parameter(weight, requires_grad=False)


def _remove_leaf(root: nn.Module, param: str) -> None:
    parent_path, _, leaf = param.rpartition(".")
    root.get_submodule(parent_path)._modules.pop(leaf)


def _quantized_nodes(gm: GraphModule, site: Site) -> list[Node]:
    return [n for n in gm.graph.nodes if n.target == quantized.OP and (provenance(n) or {}).get("site") == site.path]


def _unquantize_nodes(gm: GraphModule, site: Site, weight: torch.Tensor) -> None:
    """quantized_linear(x, qdata, bias, ...) -> linear(x, W[.t()], bias), W a plain parameter again."""
    for node in _quantized_nodes(gm, site):
        x, qdata, bias = node.args[0], node.args[1], node.args[2]
        x_dtype = x.meta["val"].dtype if "val" in x.meta else weight.dtype
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(site.param)
            if site.layout == "in_out":
                w = gm.graph.call_function(aten.t.default, (w,))
            if weight.dtype != x_dtype:  # merged(dtype=...) stores narrower; compute in the activations' dtype
                w = gm.graph.call_function(aten._to_copy.default, (w,), {"dtype": x_dtype})
            new = gm.graph.call_function(aten.linear.default, (x, w, bias))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for reader in qdata:
            if not reader.users:
                gm.graph.erase_node(reader)


def _requantize(gm, ctx, root, merged: dict[str, torch.Tensor], sites: dict[str, Site]) -> list[str]:
    """Pack W + ΔW again; record, per weight, the share of ΔW's effect the new codes keep."""
    config = ctx.spec.quantize
    cache = ctx.merge.requantized
    if ctx.merge.requantization is None:
        ctx.merge.requantization = {"sites": {}}
    report = ctx.merge.requantization
    for param in [p for p in sites if p in merged or p in cache]:  # cached: made for another call signature
        site, weight = sites[param], merged.get(param)
        old = quantized.weight_module(root, param)
        if param not in cache:
            new = quantized.QuantizedWeight.from_weight(weight.T if site.layout == "in_out" else weight, config)
            cache[param] = new
            report["sites"][param] = _survival(ctx, site, old, new, weight)
        _remove_leaf(root, param)
        quantized.put_weight(root, param, cache[param])
    if not report["sites"]:
        return []
    delta_sq = sum(s["delta_norm"] ** 2 for s in report["sites"].values())
    lost_sq = sum((s["lost"] * s["delta_norm"]) ** 2 for s in report["sites"].values())
    report["lost"] = math.sqrt(lost_sq / delta_sq) if delta_sq else 0.0
    report["kept"] = 1.0 - report["lost"]
    report["from"] = "base_state_dict" if ctx.merge.options.base_state_dict is not None else "dequantized base"
    return [f"requantized {len(report['sites'])} weights (from the {report['from']}): the adapters' output "
            f"change is {100 * report['kept']:.1f}% kept, {100 * report['lost']:.1f}% lost (relative error "
            "against the unmerged model, unit-variance inputs)"]


def _survival(ctx, site: Site, old, new, merged_weight: torch.Tensor) -> dict:
    """lost = ‖Wq' − (Wq + ΔW)‖ / ‖ΔW‖: 0 when the new codes carry ΔW exactly, 1 when they erase it."""
    base = base_weight(ctx, site)
    delta = merged_weight.float() - base
    delta = delta.T if site.layout == "in_out" else delta
    target = old.dequantize() + delta
    delta_norm = float(delta.norm())
    lost = float((new.dequantize() - target).norm()) / delta_norm if delta_norm else 0.0
    return {"delta_norm": delta_norm, "lost": lost, "kept": 1.0 - lost,
            "codes_changed": _codes_changed(old, new)}


def _codes_changed(old, new) -> float:
    """The fraction of weight codes that differ between two packings of one weight."""
    a, b = old.tensors()[0], new.tensors()[0]
    if old.fmt != "int8":
        a, b = weight_codec.unpack_nibbles(a), weight_codec.unpack_nibbles(b)
    return float((a != b).float().mean())
