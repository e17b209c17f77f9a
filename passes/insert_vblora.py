"""insert_vblora: add a low-rank update whose sub-vectors mix the top-k vectors of one shared bank."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.core.fields import (
    boolean,
    optional_pattern_list,
    pattern_list,
    positive_int,
    positive_number,
    probability,
)
from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import in_adapter_dtype, rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._weight_ops import add_output, maybe_dropout

aten = torch.ops.aten


@dataclass(frozen=True)
class VbloraConfig:
    """VB-LoRA (Li et al., 2024) as HF PEFT's VB-LoRA: A (r x in) and B (out x r) are built from
    `vector_length` sub-vectors, each a softmax-weighted mix of the top `topk` of `num_vectors` bank vectors."""

    method = "vblora"
    targets: tuple = field(metadata={"check": pattern_list})
    r: int = field(default=4, metadata={"check": positive_int})
    num_vectors: int = field(default=256, metadata={"check": positive_int})
    vector_length: int = field(default=256, metadata={"check": positive_int})
    topk: int = field(default=2, metadata={"check": positive_int})
    dropout: float = field(default=0.0, metadata={"check": probability})
    init_vector_bank_bound: float = field(default=0.02, metadata={"check": positive_number})
    init_logits_std: float = field(default=0.1, metadata={"check": positive_number})
    save_only_topk_weights: bool = field(default=False, metadata={"check": boolean})  # PEFT checkpoints only
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})


class VectorBank(nn.Module):
    """The [num_vectors, vector_length] bank every site of one entry mixes from (HF PEFT's vblora_vector_bank)."""

    def __init__(self, config: VbloraConfig, like: torch.Tensor):
        super().__init__()
        self.vector_bank = nn.Parameter(torch.zeros(config.num_vectors, config.vector_length, device=like.device,
                                                    dtype=like.dtype))
        if not self.vector_bank.is_meta:
            with torch.no_grad():
                self.vector_bank.uniform_(-config.init_vector_bank_bound, config.init_vector_bank_bound)


class VbloraWeights(nn.Module):
    """logits_A [r, in/L, num_vectors] and logits_B [out/L, r, num_vectors], as HF PEFT's vblora_logits_A/_B."""

    def __init__(self, site: Site, weight: torch.Tensor, config: VbloraConfig, bank: VectorBank):
        super().__init__()
        factory = dict(device=weight.device, dtype=weight.dtype)
        length = config.vector_length
        self.logits_A = nn.Parameter(torch.zeros(config.r, site.in_features // length, config.num_vectors, **factory))
        self.logits_B = nn.Parameter(torch.zeros(site.out_features // length, config.r, config.num_vectors, **factory))
        object.__setattr__(self, "bank", bank)  # shared, owned by the entry's slot
        self.topk = config.topk
        if not self.logits_A.is_meta:
            with torch.no_grad():
                self.logits_A.normal_(0, config.init_logits_std)
                self.logits_B.normal_(0, config.init_logits_std)

    def _mix(self, logits: torch.Tensor) -> torch.Tensor:
        top, index = logits.topk(self.topk, dim=-1)
        return (top.softmax(-1).unsqueeze(-1) * self.bank.vector_bank[index]).sum(-2)

    def delta_weight(self) -> torch.Tensor:
        """B A, shaped [out, in]."""
        a = self._mix(self.logits_A).reshape(self.logits_A.shape[0], -1)
        b = self._mix(self.logits_B).transpose(1, 2).reshape(-1, self.logits_B.shape[1])
        return b @ a


def insert_vblora(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add B(A dropout(x)) to every targeted linear op, A and B mixed from the entry's shared vector bank."""
    config: VbloraConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear",))
    check_one_rewrite_per_weight(gm, ctx, sites)
    _check_sizes(ctx, config, sites)
    weight = ctx.base_params[sites[0].param]
    bank, created = adapters.get_or_create(ctx.adapter_root, "", ctx.slot,
                                           lambda: in_adapter_dtype(ctx, VectorBank(config, weight), weight))
    result = rewrite_sites(gm, ctx, sites, lambda site, weight: VbloraWeights(site, weight, config, bank),
                           lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, config))
    if created:
        result.params_added[adapters.state_name("", ctx.slot, "vector_bank")] = bank.vector_bank.numel()
    return result


def _check_sizes(ctx: PassContext, config: VbloraConfig, sites: list[Site]) -> None:
    field_path = f"adapters[{ctx.entry_index}]"
    if config.topk > config.num_vectors:
        raise SpecError(f"{field_path}.topk: {config.topk} exceeds num_vectors={config.num_vectors}")
    for site in sites:
        if site.in_features % config.vector_length or site.out_features % config.vector_length:
            raise SpecError(f"{field_path}.vector_length: {config.vector_length} must divide the in and out sizes "
                            f"of {site.path!r} ({site.in_features}, {site.out_features}); pick a common divisor")


def _mixed(ins: Inserter, logits: Node, bank: Node, topk: int) -> Node:
    """Σ_k softmax(top-k logits)_k · bank[index_k], over the last (bank) axis of `logits`."""
    top = ins.call(aten.topk.default, logits, topk, -1)
    values, index = (ins.call(operator.getitem, top, i) for i in (0, 1))
    weights = ins.call(aten.unsqueeze.default, ins.call(aten._softmax.default, values, -1, False), -1)
    vectors = ins.call(aten.index.Tensor, bank, [index])
    return ins.call(aten.sum.dim_IntList, ins.call(aten.mul.Tensor, weights, vectors), [-2])


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, config: VbloraConfig) -> None:
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, "insert_vblora")
    bank = ins.get_attr(adapters.target("", ctx.slot, "vector_bank"))
    logits_a = ins.get_attr(adapters.target(site.path, ctx.slot, "logits_A"))
    logits_b = ins.get_attr(adapters.target(site.path, ctx.slot, "logits_B"))
    a = ins.call(aten.view.default, _mixed(ins, logits_a, bank, config.topk), [config.r, site.in_features])
    b = ins.call(aten.transpose.int, _mixed(ins, logits_b, bank, config.topk), 1, 2)
    b = ins.call(aten.reshape.default, b, [site.out_features, config.r])
    x = maybe_dropout(ins, node.args[site.input_index], config.dropout)
    delta = ins.call(aten.linear.default, ins.call(aten.linear.default, x, a), b)
    add_output(ins, node, delta, users)
