"""lower_bottleneck_multi: add each row's bottleneck adapter (serial or parallel) at served sites."""

from __future__ import annotations

import peftc.codegen.triton  # noqa: F401  (registers torch.ops.peftc.*)
import torch
from peftc.passes.add_routing_input import routing_input
from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, redirect_users
from peftc.ir.lora_bank import BottleneckBank, ServingPlan
from peftc.pipeline.runner import PassContext, PassResult

from ._site_output import current_output

aten = torch.ops.aten
BOTTLENECK_ROWS = torch.ops.peftc.bottleneck_rows.default
REPLACING_OPS = (torch.ops.peftc.lora_multi.default, torch.ops.peftc.lora_gather.default)


def lower_bottleneck_multi(gm: GraphModule, ctx: PassContext) -> PassResult:
    """y + s[id] (up[id] act(down[id] h + db[id]) + ub[id]), h = y (serial) or x (parallel), per sequence id."""
    plan: ServingPlan = ctx.serving
    sites = [site for site in ctx.sites if site.path in plan.bottleneck_paths]
    result = PassResult(modified=False)
    if not sites:
        return result
    if plan.params is not None:
        raise SpecError("training many adapters at once takes LoRA and IA3 adapters, not bottleneck adapters; "
                        "train them with peftc.compile")
    seq_ids = routing_input(gm)
    replaced = {n.meta["peftc"]["site"]: n for n in gm.graph.nodes if n.target in REPLACING_OPS and "peftc" in n.meta}
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in sites:
        op = replaced.get(site.path) or nodes[site.node_name]
        x = op.args[0] if op.target in REPLACING_OPS else op.args[site.input_index]
        for placement, activation in _groups(plan, site.path):
            slot = f"bottleneck_{placement}_{activation}"
            make = lambda site=site, p=placement, a=activation: BottleneckBank(  # noqa: E731
                site, list(plan.adapters), p, a, ctx.base_params[site.param])
            bank, created = adapters.get_or_create(ctx.adapter_root, site.path, slot, make)
            y = current_output(op)
            users = list(y.users)
            ins = Inserter(gm, y, {"pass": "lower_bottleneck_multi", "method": "serving", "site": site.path,
                                   "slot": slot, "entry": None})
            tensors = [ins.get_attr(adapters.target(site.path, slot, name))
                       for name in ("down", "down_bias", "up", "up_bias", "scales")]
            delta = ins.call(BOTTLENECK_ROWS, y if placement == "serial" else x, *tensors, seq_ids, activation)
            out = ins.call(aten.add.Tensor, y, delta)
            if bank.down.dtype != y.meta["val"].dtype:  # float32 banks over a half base: y + delta rounded once
                out = ins.call(aten._to_copy.default, out, dtype=y.meta["val"].dtype)
            out.meta["peftc"]["role"] = "output"
            redirect_users(users, y, out)
            if created:
                for name, tensor in bank.named_buffers():
                    result.params_added[f"{site.path}.{slot}.{name}"] = tensor.numel()
        result.modified = True
        result.sites.append(site.path)
    result.notes.append(f"per-row bottleneck adapters on {len(sites)} sites")
    return result


def _groups(plan: ServingPlan, path: str) -> list[tuple[str, str]]:
    """The (placement, activation) pairs served at `path`, in adapter order: one bank and op each."""
    seen = []
    for adapter in plan.adapters:
        part = adapter.sites.get(path)
        if part is not None and part.bottleneck is not None:
            key = (part.bottleneck.placement, part.bottleneck.activation)
            if key not in seen:
                seen.append(key)
    return seen
