"""insert_boft: rotate a weight's input space by a butterfly product of block-diagonal orthogonal
matrices and scale its outputs: y = s ⊙ (W Mᵀ x) + b (BOFT)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import (
    non_negative_int,
    optional_pattern_list,
    pattern_list,
    positive_int,
    probability,
)
from peftc.errors import SpecError
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from . import _rotations as rot
from ._site_selection import select_sites
from ._weight_transform import flat_in_features, transform_sites


@dataclass(frozen=True)
class BoftConfig:
    """BOFT (Liu et al., 2024) as HF PEFT's BOFTConfig: `block_size` or `block_num` (exactly one non-zero),
    `n_butterfly_factor` factors (1: one block-diagonal rotation, OFT with a scale), `dropout`: the
    share of one random factor's blocks set to the identity in training."""

    method = "boft"
    targets: tuple = field(metadata={"check": pattern_list})
    block_size: int = field(default=4, metadata={"check": non_negative_int})
    block_num: int = field(default=0, metadata={"check": non_negative_int})
    n_butterfly_factor: int = field(default=1, metadata={"check": positive_int})
    dropout: float = field(default=0.0, metadata={"check": probability})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})

    def validate(self, path: str) -> None:
        if (self.block_size == 0) == (self.block_num == 0):
            raise SpecError(f"{path}.block_size: BOFT takes either block_size ({self.block_size}) or block_num "
                            f"({self.block_num}), exactly one non-zero, since their product is the input "
                            "dimension; set the other to 0")


def block_layout(config: BoftConfig, dimension: int, field_path: str, site: str) -> tuple[int, int]:
    """(block_num, block_size) for a site, with HF PEFT's checks as SpecErrors naming the field."""
    extra = config.n_butterfly_factor - 1  # butterfly factors beyond the first, as in the paper
    where = f"at {site!r} (input dimension {dimension})"
    if config.block_size == 0:
        num = config.block_num
        if dimension % num:
            raise SpecError(f"{field_path}.block_num: {num} does not divide the input dimension {where}")
        if extra and (extra > int(math.log2(num)) or num % 2 ** extra):
            raise SpecError(f"{field_path}.n_butterfly_factor: {config.n_butterfly_factor} factors need block_num "
                            f"({num}) to be a multiple of 2^{extra} {where}")
        size = dimension // num
    else:
        size = config.block_size
        if dimension % size:
            raise SpecError(f"{field_path}.block_size: {size} does not divide the input dimension {where}")
        if extra and dimension % (size * 2 ** extra):
            raise SpecError(f"{field_path}.n_butterfly_factor: {config.n_butterfly_factor} factors need the input "
                            f"dimension to be a multiple of block_size·2^{extra} = {size * 2 ** extra} {where}")
        num = dimension // size
    if extra and (num % 2 or size % 2):
        name = "block_num" if num % 2 else "block_size"
        raise SpecError(f"{field_path}.{name}: butterfly factors need an even block_num and block_size, got "
                        f"{num} blocks of {size} {where}")
    return num, size


class BoftWeights(nn.Module):
    """boft_R [factors, blocks, b, b] (each block's generator, made skew as ½(A − Aᵀ)) and boft_s, the output
    scale ([out, 1] on linear ops, [1, out] on convs), named and shaped as HF PEFT's. R = 0, s = 1: identity."""

    def __init__(self, site: Site, weight: torch.Tensor, config: BoftConfig, field_path: str):
        super().__init__()
        factory = dict(device=weight.device, dtype=weight.dtype)
        num, size = block_layout(config, flat_in_features(site, weight), field_path, site.path)
        self.boft_R = nn.Parameter(torch.zeros(config.n_butterfly_factor, num, size, size, **factory))
        scale_shape = (1, site.out_features) if site.kind == "conv" else (site.out_features, 1)
        self.boft_s = nn.Parameter(torch.ones(scale_shape, **factory))
        self.dropout = config.dropout

    def forward(self, weight: torch.Tensor, training: torch.Tensor | None) -> torch.Tensor:
        """weight [out, in] -> (weight · Mᵀ) · s, M = M_last ⋯ M_0, M_f = P_f block-diag(R_f) P_fᵀ."""
        factors, num, size, _ = self.boft_R.shape
        generators = self.boft_R.reshape(factors * num, size, size)
        blocks = rot.cayley(0.5 * (generators - generators.transpose(1, 2))).view(factors, num, size, size)
        if training is not None and self.dropout > 0:
            factor = rot.random_choice(factors, 1, blocks)  # one random factor, as PEFT
            chosen = factor[:, None] * rot.random_choice(num, int(self.dropout * num), blocks)
            blocks = rot.blocks_to_identity(blocks, chosen * training)
        for factor in range(factors):  # W Mᵀ = W M_0ᵀ M_1ᵀ ⋯, M_fᵀ = P_f B_fᵀ P_fᵀ
            weight = self._butterfly(weight, factor, inverse=True)  # W P_f
            weight = rot.rotate_blocks(weight, blocks[factor])  # · B_fᵀ
            weight = self._butterfly(weight, factor, inverse=False)  # · P_fᵀ
        return weight * self.boft_s.reshape(-1, 1)

    def _butterfly(self, weight: torch.Tensor, factor: int, inverse: bool) -> torch.Tensor:
        """weight's columns in HF PEFT's block butterfly order for `factor` (weight · P_fᵀ), or its inverse.

        Within chunks of block_size·2^factor columns, sub-blocks of block_size/2 columns go evens first,
        then odds: a reshape and a transpose. With one factor P is the identity."""
        factors, _, size, _ = self.boft_R.shape
        if factors == 1:
            return weight
        out, dimension = weight.shape
        half, sub = 2 ** factor, size // 2
        chunks = dimension // (size * 2 ** factor)
        split = (out, chunks, 2, half, sub) if inverse else (out, chunks, half, 2, sub)
        return weight.reshape(split).transpose(2, 3).reshape(out, dimension)


def insert_boft(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace every targeted linear or conv op's weight W by s ⊙ (W Mᵀ), M a butterfly of orthogonal blocks."""
    config: BoftConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear", "conv"))
    field_path = f"adapters[{ctx.entry_index}]"
    for site in sites:  # refuse a bad layout before any site is rewritten
        block_layout(config, flat_in_features(site, ctx.base_params[site.param]), field_path, site.path)
    return transform_sites(gm, ctx, sites, lambda site, weight: BoftWeights(site, weight, config, field_path),
                           "insert_boft")
