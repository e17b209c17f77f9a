"""insert_oft: rotate a weight's input space by a block-diagonal orthogonal matrix: y = W Rᵀ x (OFT)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import (
    boolean,
    non_negative_int,
    optional_pattern_list,
    pattern_list,
    positive_int,
    positive_number,
    probability,
)
from peftc.errors import SpecError
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from . import _rotations as rot
from ._site_selection import select_sites
from ._weight_transform import flat_in_features, transform_sites


@dataclass(frozen=True)
class OftConfig:
    """OFT (Qiu et al., 2023) as HF PEFT's OFTConfig: give `r` (blocks) or `block_size`, not both.

    A size that does not divide a site's input dimension (in_features, times the kernel for a
    conv) moves to the nearest one that does, as PEFT does (the report notes it)."""

    method = "oft"
    targets: tuple = field(metadata={"check": pattern_list})
    r: int = field(default=0, metadata={"check": non_negative_int})
    block_size: int = field(default=32, metadata={"check": non_negative_int})
    module_dropout: float = field(default=0.0, metadata={"check": probability})
    coft: bool = field(default=False, metadata={"check": boolean})
    eps: float = field(default=6e-5, metadata={"check": positive_number})
    block_share: bool = field(default=False, metadata={"check": boolean})
    cayley_neumann: bool = field(default=True, metadata={"check": boolean})
    neumann_terms: int = field(default=5, metadata={"check": positive_int})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})

    def validate(self, path: str) -> None:
        if (self.r == 0) == (self.block_size == 0):
            raise SpecError(f"{path}.r: OFT takes either r ({self.r}) or block_size ({self.block_size}), exactly one "
                            "non-zero, since r × block_size is the input dimension; set the other to 0")


def nearest_divisor(dimension: int, value: int) -> int:
    """HF PEFT's adjustment of an r or block size that does not divide `dimension` (ties go down)."""
    if value >= dimension:
        return dimension
    higher = value
    while higher <= dimension and dimension % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and dimension % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def block_layout(config: OftConfig, dimension: int) -> tuple[int, int]:
    """(blocks, block size) for a site whose rotated dimension is `dimension`."""
    asked = config.r or config.block_size
    given = asked if dimension % asked == 0 else nearest_divisor(dimension, asked)
    return (given, dimension // given) if config.r else (dimension // given, given)


class OftWeights(nn.Module):
    """oft_R [blocks (1 with block_share), b(b−1)/2]: each block's skew-symmetric generator, its strict upper
    triangle row-major, as HF PEFT's oft_R.weight. Zero: the rotation starts as the identity."""

    def __init__(self, site: Site, weight: torch.Tensor, config: OftConfig):
        super().__init__()
        self.blocks, self.block_size = block_layout(config, flat_in_features(site, weight))
        size = self.block_size
        rows = 1 if config.block_share else self.blocks
        self.oft_R = nn.Parameter(torch.zeros(rows, size * (size - 1) // 2, device=weight.device, dtype=weight.dtype))
        self.config = config

    def forward(self, weight: torch.Tensor, training: torch.Tensor | None) -> torch.Tensor:
        """weight [out, blocks·b] -> weight · block-diag(R)ᵀ."""
        return rot.rotate_blocks(weight, self.rotations(training))

    def rotations(self, training: torch.Tensor | None) -> torch.Tensor:
        config, vec = self.config, self.oft_R
        if config.coft:
            # PEFT projects oft_R in place (no_grad) before each use; here the projected value is used
            # with the gradient passed straight through, the stored parameter is left as trained.
            vec = vec + (self._project(vec) - vec).detach()
        skew = rot.skew_from_upper(vec, self.block_size)
        blocks = rot.cayley_neumann(skew, config.neumann_terms) if config.cayley_neumann else rot.cayley(skew)
        if training is not None and config.module_dropout > 0 and blocks.shape[0] > 1:
            dropped = int(config.module_dropout * blocks.shape[0])
            blocks = rot.blocks_to_identity(blocks, rot.random_choice(blocks.shape[0], dropped, vec) * training)
        return blocks.expand(self.blocks, -1, -1) if config.block_share else blocks

    def _project(self, vec: torch.Tensor) -> torch.Tensor:
        """COFT: each generator into the Frobenius ball of radius eps/√(rows) around 0 (PEFT's _project_batch)."""
        radius = self.config.eps / math.sqrt(vec.shape[0])
        skew = rot.skew_from_upper(vec, self.block_size)
        norm = torch.linalg.matrix_norm(skew, keepdim=True)
        inside = norm <= radius
        return rot.upper_of(torch.where(inside, skew, radius * (skew / norm)))


def insert_oft(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace every targeted linear or conv op's weight W by W·block-diag(R)ᵀ, R = Cayley(Q), Q skew."""
    config: OftConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear", "conv"))
    result = transform_sites(gm, ctx, sites, lambda site, weight: OftWeights(site, weight, config), "insert_oft")
    result.notes += _adjusted(ctx, config, sites)
    return result


def _adjusted(ctx: PassContext, config: OftConfig, sites: list[Site]) -> list[str]:
    """A note per site whose r / block_size was moved to a divisor of its dimension (PEFT warns)."""
    notes = []
    asked, field_name = (config.r, "r") if config.r else (config.block_size, "block_size")
    for site in sites:
        dimension = flat_in_features(site, ctx.base_params[site.param])
        blocks, size = block_layout(config, dimension)
        if (blocks if config.r else size) != asked:
            notes.append(f"{site.path}: {field_name} {asked} does not divide {dimension}; using {blocks} blocks "
                         f"of {size} (as HF PEFT adjusts it)")
    return notes
