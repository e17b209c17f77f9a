"""lower_lora_multi: replace each served linear site's matmul by peftc::lora_multi over stacked adapter banks."""

from __future__ import annotations

import peftc.codegen.triton  # noqa: F401  (registers torch.ops.peftc.*)
import torch
from peftc.passes.add_routing_input import routing_input
from torch.fx import GraphModule, Node

from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, erase_nodes
from peftc.ir.lora_bank import LoraBank, ServingPlan
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

aten = torch.ops.aten
SLOT = "multi"  # banks live at peftc.<site path>.multi.{A_bank, B_bank, scales}


def lower_lora_multi(gm: GraphModule, ctx: PassContext) -> PassResult:
    """At every site some served adapter targets, y = x W^T + b + s[id] B[id] A[id] x, per sequence id."""
    plan: ServingPlan = ctx.serving
    served = [site for site in ctx.sites if site.path in plan.site_paths]
    _check_sites(plan, served)
    sites = [site for site in served if site.path in plan.lora_paths]  # IA3-only sites: lower_scales_multi
    nodes = {n.name: n for n in gm.graph.nodes}
    seq_ids = routing_input(gm)
    if sites and seq_ids is None:
        raise ValueError("lower_lora_multi: the graph has no adapter-ids input; run add_routing_input first")
    result = PassResult(modified=False)
    ranks = set()
    for site in sites:
        bank, created = adapters.get_or_create(
            ctx.adapter_root, site.path, SLOT,
            lambda site=site: LoraBank(site, list(plan.adapters), ctx.base_params[site.param]))
        _replace(gm, nodes[site.node_name], site, seq_ids, bank, plan)
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
        missing = sorted({p for p, part in adapter.sites.items() if part.is_linear} - found)
        if missing:
            raise SpecError(f"adapter {adapter.name!r}: site {missing[0]!r} is not a layer of this model "
                            f"({len(missing)} missing); was it trained on another model?")
    others = sorted({f"{s.path} ({s.kind})" for s in chosen if s.kind != "linear"})
    if others:
        raise SpecError(f"served adapters target {others[0]}; serving takes adapters on linear sites only")


def _replace(gm: GraphModule, base: Node, site: Site, seq_ids: Node, bank: LoraBank, plan: ServingPlan) -> None:
    """base matmul -> lora_multi(x, W [out, in], bias, banks, seq_ids); the same output, so users are unchanged.

    seq_ids is the graph's adapter-ids input (add_routing_input): per call, never state. With
    trained adapters (plan.params) the A and B banks are stacked in the graph from each adapter's
    own parameters, so each adapter's gradient lands on its own tensors."""
    tag = {"pass": "lower_lora_multi", "method": "lora", "site": site.path, "slot": SLOT, "entry": None}
    ins = Inserter(gm, base, tag)
    x = base.args[site.input_index]
    weight, bias, dead = _weight_and_bias(ins, base, site)
    if plan.params is None:
        pair = [ins.get_attr(adapters.target(site.path, SLOT, name)) for name in ("A_bank", "B_bank")]
    else:
        pair = _stacked_banks(ins, site, bank, plan)
    scales = ins.get_attr(adapters.target(site.path, SLOT, "scales"))
    op = torch.ops.peftc.lora_gather.default if plan.gathered else torch.ops.peftc.lora_multi.default
    out = ins.call(op, x, weight, bias, *pair, scales, seq_ids)
    out.meta["peftc"]["role"] = "output"
    if "val" in base.meta:  # the routing op is data-dependent; its output has the matmul's shape
        out.meta["val"] = base.meta["val"]
    base.replace_all_uses_with(out)
    erase_nodes(gm, [base, *[n for n in dead if len(n.users) == 1]])


def _stacked_banks(ins: Inserter, site: Site, bank: LoraBank, plan: ServingPlan) -> list[Node]:
    """[stack(A_0, ..., A_n-1), stack(B_0, ...)]: each adapter's own A [r, in] and B [out, r], zero-padded
    to the bank's rank; an adapter without LoRA at the site reads its (zero, frozen) bank slot."""
    rank = bank.A_bank.shape[1]
    stacks = []
    for name, pad in (("A", lambda r: [0, 0, 0, rank - r]), ("B", lambda r: [0, rank - r])):
        slots = []
        for k, (root, slot, r) in enumerate(zip(plan.params, plan.slots, bank.ranks)):
            if r == 0:
                frozen = ins.get_attr(adapters.target(site.path, SLOT, f"{name}_bank"))
                slots.append(ins.call(aten.select.int, frozen, 0, k))
                continue
            own = ins.get_attr(adapters.target(f"{root}.{site.path}", slot, name))
            slots.append(own if r == rank else ins.call(aten.constant_pad_nd.default, own, pad(r), 0.0))
        stacks.append(ins.call(aten.stack.default, slots, 0))
    return stacks


def _weight_and_bias(ins: Inserter, base: Node, site: Site) -> tuple[Node, Node | None, list[Node]]:
    """(W as [out, in], bias or None, transpose nodes the rewrite makes dead) of a linear site's op."""
    arg = base.args[site.input_index + 1]
    if base.target == aten.linear.default:
        return arg, base.args[2] if len(base.args) > 2 else None, []
    bias = base.args[0] if base.target == aten.addmm.default else None
    if site.layout == "in_out":  # GPT-2 Conv1D: addmm(b, x, W[in, out])
        return ins.call(aten.t.default, arg), bias, []
    return arg.args[0], bias, [arg]  # mm/addmm/matmul against t(W): read W itself
