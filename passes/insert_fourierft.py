"""insert_fourierft: add a sparse-spectrum update: y = W x + op(x, s·Re(ifft2(S))), S zero but at n seeded entries."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import (
    finite_number,
    non_negative_int,
    one_of,
    optional_pattern_list,
    pattern_list,
    positive_int,
)
from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._weight_ops import add_delta_op

aten = torch.ops.aten


@dataclass(frozen=True)
class FourierftConfig:
    """FourierFT (Gao et al., 2024) as HF PEFT's FourierFT: `n_frequency` trained spectral coefficients at
    entries drawn from `random_loc_seed`; `init` "random" (PEFT's default) or "zeros" (init_weights=True)."""

    method = "fourierft"
    targets: tuple = field(metadata={"check": pattern_list})
    n_frequency: int = field(default=1000, metadata={"check": positive_int})
    scaling: float = field(default=150.0, metadata={"check": finite_number})
    random_loc_seed: int = field(default=777, metadata={"check": non_negative_int})
    init: str = field(default="random", metadata={"check": one_of("random", "zeros")})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})


def spectral_indices(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """[2, n] (row, column) of the trained entries: the first n of a seeded permutation of the
    out x in grid, as HF PEFT draws them (same seed, same entries)."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return torch.stack([flat // in_features, flat % in_features])


class FourierftWeights(nn.Module):
    """spectrum [n] (HF PEFT's fourierft_spectrum); `indices` is regenerated from the seed, never saved."""

    def __init__(self, site: Site, weight: torch.Tensor, config: FourierftConfig):
        super().__init__()
        self.out_features, self.in_features = site.out_features, site.in_features
        self.spectrum = nn.Parameter(torch.zeros(config.n_frequency, device=weight.device, dtype=weight.dtype))
        indices = spectral_indices(self.out_features, self.in_features, config.n_frequency, config.random_loc_seed)
        self.register_buffer("indices", indices.to(weight.device), persistent=False)
        self.scaling = config.scaling
        if config.init == "random" and not self.spectrum.is_meta:
            with torch.no_grad():
                self.spectrum.normal_()

    def delta_weight(self) -> torch.Tensor:
        """s·Re(ifft2(S)) in float32 (the FFT has no half-precision CPU kernel), shaped [out, in]."""
        dense = self.spectrum.new_zeros((self.out_features, self.in_features), dtype=torch.float32)
        dense[self.indices[0], self.indices[1]] = self.spectrum.float()
        return (torch.fft.ifft2(dense).real * self.scaling).to(self.spectrum.dtype)


def insert_fourierft(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add op(x, s·Re(ifft2(S))) to the output of every targeted linear op."""
    config: FourierftConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear",))
    check_one_rewrite_per_weight(gm, ctx, sites)
    for site in sites:
        if config.n_frequency > site.out_features * site.in_features:
            raise SpecError(f"adapters[{ctx.entry_index}].n_frequency: {config.n_frequency} exceeds the "
                            f"{site.out_features}x{site.in_features} entries of {site.path!r}; lower it")
    return rewrite_sites(gm, ctx, sites, lambda site, weight: FourierftWeights(site, weight, config),
                         lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, config))


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, config: FourierftConfig) -> None:
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, "insert_fourierft")
    spectrum = ins.get_attr(adapters.target(site.path, ctx.slot, "spectrum"))
    indices = ins.get_attr(adapters.target(site.path, ctx.slot, "indices"))
    rows, cols = (ins.call(aten.select.int, indices, 0, i) for i in (0, 1))
    dtype = ctx.base_params[site.param].dtype
    if dtype != torch.float32:
        spectrum = ins.call(aten._to_copy.default, spectrum, dtype=torch.float32)
    dense = ins.call(aten.new_zeros.default, spectrum, [site.out_features, site.in_features])
    dense = ins.call(aten.index_put.default, dense, [rows, cols], spectrum)
    delta = ins.call(aten.mul.Tensor, ins.call(aten.real.default, ins.call(aten.fft_ifft2.default, dense)),
                     config.scaling)
    if dtype != torch.float32:
        delta = ins.call(aten._to_copy.default, delta, dtype=dtype)
    add_delta_op(ins, node, site, node.args[site.input_index], delta, users)
