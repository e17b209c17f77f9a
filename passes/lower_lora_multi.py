"""lower_lora_multi: replace each served linear site's matmul by peftc::lora_multi over stacked adapter banks."""

from __future__ import annotations

import peftc.codegen.triton  # noqa: F401  (registers torch.ops.peftc.*)
import torch
from torch.fx import GraphModule, Node

from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, erase_nodes
from peftc.ir.lora_bank import LoraBank, ServingPlan
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

aten = torch.ops.aten
SLOT = "multi"  # banks live at peftc.<site path>.multi.{A_bank, B_bank, scales}
ROUTING = "routing"  # peftc.routing.seq_ids: the per-sequence adapter ids of the current call


def lower_lora_multi(gm: GraphModule, ctx: PassContext) -> PassResult:
    """At every site some served adapter targets, y = x W^T + b + s[id] B[id] A[id] x, per sequence id."""
    plan: ServingPlan = ctx.serving
    if any(s.path == ROUTING or s.path.startswith(ROUTING + ".") for s in ctx.sites):
        raise SpecError(f"the model has a layer named {ROUTING!r}, which serving uses for its routing buffer")
    wanted = plan.site_paths
    sites = [site for site in ctx.sites if site.path in wanted]
    _check_sites(plan, sites)
    nodes = {n.name: n for n in gm.graph.nodes}
    result = PassResult(modified=False)
    ranks = set()
    for site in sites:
        bank, created = adapters.get_or_create(
            ctx.adapter_root, site.path, SLOT,
            lambda site=site: LoraBank(site, list(plan.adapters), ctx.base_params[site.param]))
        _replace(gm, nodes[site.node], site)
        result.modified = True
        result.sites.append(site.path)
        ranks.add(bank.A_bank.shape[1])
        if created:
            for name, tensor in (("A_bank", bank.A_bank), ("B_bank", bank.B_bank)):
                result.params_added[f"{site.path}.{SLOT}.{name}"] = tensor.numel()
    if sites:
        result.notes.append(f"{len(plan.adapters)} adapters ({', '.join(a.name for a in plan.adapters)}) stacked "
                            f"on {len(sites)} sites, bank ranks {sorted(ranks)}; BGMV for 1 row per sequence, "
                            "SGMV else")
    return result


def _check_sites(plan: ServingPlan, chosen: list[Site]) -> None:
    found = {s.path for s in chosen}
    for adapter in plan.adapters:
        missing = sorted(set(adapter.sites) - found)
        if missing:
            raise SpecError(f"adapter {adapter.name!r}: site {missing[0]!r} is not a layer of this model "
                            f"({len(missing)} missing); was it trained on another model?")
    others = sorted({f"{s.path} ({s.kind})" for s in chosen if s.kind != "linear"})
    if others:
        raise SpecError(f"served adapters target {others[0]}; serving takes LoRA on linear sites only")


def _replace(gm: GraphModule, base: Node, site: Site) -> None:
    """base matmul -> lora_multi(x, W [out, in], bias, banks, seq_ids); the same output, so users are unchanged."""
    tag = {"pass": "lower_lora_multi", "method": "lora", "site": site.path, "slot": SLOT, "entry": None}
    ins = Inserter(gm, base, tag)
    x = base.args[site.input_index]
    weight, bias, dead = _weight_and_bias(ins, base, site)
    bank = [ins.get_attr(adapters.target(site.path, SLOT, name)) for name in ("A_bank", "B_bank", "scales")]
    seq_ids = ins.get_attr(f"{adapters.ROOT}.{ROUTING}.seq_ids")
    out = ins.call(torch.ops.peftc.lora_multi.default, x, weight, bias, *bank, seq_ids)
    out.meta["peftc"]["role"] = "output"
    if "val" in base.meta:  # the routing op is data-dependent; its output has the matmul's shape
        out.meta["val"] = base.meta["val"]
    base.replace_all_uses_with(out)
    erase_nodes(gm, [base, *[n for n in dead if len(n.users) == 1]])


def _weight_and_bias(ins: Inserter, base: Node, site: Site) -> tuple[Node, Node | None, list[Node]]:
    """(W as [out, in], bias or None, transpose nodes the rewrite makes dead) of a linear site's op."""
    arg = base.args[site.input_index + 1]
    if base.target == aten.linear.default:
        return arg, base.args[2] if len(base.args) > 2 else None, []
    bias = base.args[0] if base.target == aten.addmm.default else None
    if site.layout == "in_out":  # GPT-2 Conv1D: addmm(b, x, W[in, out])
        return ins.call(aten.t.default, arg), bias, []
    return arg.args[0], bias, [arg]  # mm/addmm/matmul against t(W): read W itself
