"""insert_hra: multiply a weight by a chain of r Householder reflections: y = W H₁ ⋯ H_r x (HRA)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import boolean, optional_pattern_list, pattern_list, positive_int
from peftc.errors import SpecError
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._site_selection import select_sites
from ._weight_transform import flat_in_features, transform_sites


@dataclass(frozen=True)
class HraConfig:
    """HRA (Yuan et al., 2024) as HF PEFT's HRAConfig; `gram_schmidt` is its apply_GS: orthonormalize the
    r vectors and use I − 2UUᵀ instead of the product of reflections."""

    method = "hra"
    targets: tuple = field(metadata={"check": pattern_list})
    r: int = field(default=8, metadata={"check": positive_int})
    gram_schmidt: bool = field(default=False, metadata={"check": boolean})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})


class HraWeights(nn.Module):
    """hra_u [in·kernel, r]: the reflections' vectors as columns, as HF PEFT's. Initialized as PEFT does: for
    even r, pairs of equal columns (each pair's reflections cancel: the identity); for odd r, Kaiming-uniform."""

    def __init__(self, site: Site, weight: torch.Tensor, config: HraConfig):
        super().__init__()
        dimension = flat_in_features(site, weight)
        self.hra_u = nn.Parameter(torch.empty(dimension, config.r, device=weight.device, dtype=weight.dtype))
        self.gram_schmidt = config.gram_schmidt
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.hra_u.is_meta:
            return
        r = self.hra_u.shape[1]
        if r % 2:
            nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))
            return
        half = torch.empty(self.hra_u.shape[0], r // 2, device=self.hra_u.device, dtype=self.hra_u.dtype)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        self.hra_u.copy_(half.repeat_interleave(2, dim=1))

    def forward(self, weight: torch.Tensor, training: torch.Tensor | None) -> torch.Tensor:
        """weight [out, in] -> weight · H, applied as rank-one updates (no [in, in] matrix)."""
        if self.gram_schmidt:
            basis = self._orthonormal()
            return weight - 2 * (weight @ basis) @ basis.T
        vectors = self.hra_u / self.hra_u.norm(dim=0)
        for i in range(vectors.shape[1]):  # W (I − 2uuᵀ), in PEFT's order
            u = vectors[:, i:i + 1]
            weight = weight - 2 * (weight @ u) @ u.T
        return weight

    def _orthonormal(self) -> torch.Tensor:
        """hra_u's columns orthonormalized in order (Gram-Schmidt, each against the ones before it)."""
        columns = [self.hra_u[:, :1] / self.hra_u[:, :1].norm()]
        for i in range(1, self.hra_u.shape[1]):
            u = self.hra_u[:, i:i + 1]
            for done in columns:
                u = u - (done.T @ u) * done
            columns.append(u / u.norm())
        return torch.cat(columns, dim=1)


def insert_hra(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace every targeted linear or conv op's weight W by W·H, H a product of r Householder reflections."""
    config: HraConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear", "conv"))
    for site in sites:
        dimension = flat_in_features(site, ctx.base_params[site.param])
        if config.gram_schmidt and config.r > dimension:
            raise SpecError(f"adapters[{ctx.entry_index}].r: Gram-Schmidt finds at most {dimension} orthonormal "
                            f"vectors at {site.path!r} (input dimension {dimension}), got r={config.r}")
    return transform_sites(gm, ctx, sites, lambda site, weight: HraWeights(site, weight, config), "insert_hra")
