"""lower_scales_multi: apply each row's elementwise adapter vectors (IA3, DoRA's magnitude) at served sites."""

from __future__ import annotations

import peftc.codegen.triton  # noqa: F401  (registers torch.ops.peftc.*)
import torch
from peftc.passes.add_routing_input import routing_input
from torch.fx import GraphModule, Node

from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, redirect_users
from peftc.ir.lora_bank import ScaleBank, ServingPlan
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._weight_ops import flip_layout

aten = torch.ops.aten
SLOT = "scales"  # banks live at peftc.<site path>.scales.{input, output, bias}
MULTI_OPS = (torch.ops.peftc.lora_multi.default, torch.ops.peftc.lora_gather.default)
SCALE_ROWS = torch.ops.peftc.scale_rows.default


def lower_scales_multi(gm: GraphModule, ctx: PassContext) -> PassResult:
    """y = out[id] ⊙ (W (in[id] ⊙ x) + low-rank) + bias[id] ⊙ b at every site a served adapter scales."""
    plan: ServingPlan = ctx.serving
    sites = [site for site in ctx.sites if site.path in plan.scaled_paths]
    if plan.params is not None and any(a.method == "dora" for a in plan.adapters):
        raise SpecError("training many adapters at once takes LoRA and IA3 adapters, not DoRA "
                        "(its magnitude factor would need the weight norm in the graph); train DoRA with peftc.compile")
    result = PassResult(modified=False)
    if not sites:
        return result
    seq_ids = routing_input(gm)
    ops = {n.meta["peftc"]["site"]: n for n in gm.graph.nodes
           if n.target in MULTI_OPS and "peftc" in n.meta}
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in sites:
        weight = ctx.base_params[site.param]
        bank, created = adapters.get_or_create(ctx.adapter_root, site.path, SLOT, lambda site=site, weight=weight: (
            ScaleBank(site, list(plan.adapters), weight, flip_layout(weight, site).detach())))
        _rewrite(gm, ops.get(site.path) or nodes[site.node_name], site, bank, seq_ids, plan)
        result.modified = True
        result.sites.append(site.path)
        if created:
            for name, tensor in bank.named_buffers():
                result.params_added[f"{site.path}.{SLOT}.{name}"] = tensor.numel()
    methods = sorted({a.method for a in plan.adapters for path in a.sites if path in plan.scaled_paths})
    result.notes.append(f"per-row vectors of {', '.join(methods)} on {len(sites)} sites")
    return result


def _bank(ins: Inserter, site: Site, part: str, plan: ServingPlan) -> Node:
    """The [n+1, F] vectors of one part ("input", "output", "bias"): the frozen bank when serving;
    when training, stacked in the graph from each IA3 adapter's own `l` (its bank row otherwise)."""
    frozen = ins.get_attr(adapters.target(site.path, SLOT, part))
    if plan.params is None:
        return frozen
    rows = []
    for k, (adapter, root, slot) in enumerate(zip(plan.adapters, plan.params, plan.slots)):
        mine = adapter.sites.get(site.path)
        vector = None if mine is None else mine.input_scale if part == "input" else mine.output_scale
        rows.append(ins.get_attr(adapters.target(f"{root}.{site.path}", slot, "l")) if vector is not None
                    else ins.call(aten.select.int, frozen, 0, k))
    rows.append(ins.call(aten.select.int, frozen, 0, len(plan.adapters)))  # the base's row of ones
    return ins.call(aten.stack.default, rows, 0)


def _rewrite(gm: GraphModule, op: Node, site: Site, bank: ScaleBank, seq_ids: Node, plan: ServingPlan) -> None:
    """Scale op's input and output rows; with a lora_multi op, scale_rows also reads its bias to put
    back what scaling the output did to it (DoRA leaves the bias unscaled, IA3 scales it: the bias
    bank says which). The bias stays inside the op, so rows whose factors are one (LoRA, the base)
    keep the op's output exactly, and IA3 rows scale it as their own model does, rounded once."""
    tag = {"pass": "lower_scales_multi", "method": "serving", "site": site.path, "slot": SLOT, "entry": None}
    if bank.input is not None:
        ins = Inserter(gm, op.prev, tag)
        ins.module_stack = op.meta.get("nn_module_stack")
        x = op.args[site.input_index] if op.target not in MULTI_OPS else op.args[0]
        scaled = ins.call(SCALE_ROWS, x, _bank(ins, site, "input", plan), seq_ids, None, None)
        op.update_arg(site.input_index if op.target not in MULTI_OPS else 0, scaled)
    if bank.output is None:
        return
    users = list(op.users)
    ins = Inserter(gm, op, tag)
    bias = bias_bank = None
    if op.target in MULTI_OPS and op.args[2] is not None:
        bias = op.args[2]
        bias_bank = _bank(ins, site, "bias", plan) if bank.bias is not None else None
    out = ins.call(SCALE_ROWS, op, _bank(ins, site, "output", plan), seq_ids, bias, bias_bank)
    out.meta["peftc"]["role"] = "output"
    if "val" in op.meta:
        out.meta["val"] = op.meta["val"]
    redirect_users(users, op, out)
