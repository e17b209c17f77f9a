"""LoRA banks: every served adapter's LoRA at one site, stacked into one tensor pair.

A bank holds every served adapter in one tensor pair: A [n, r, in], B [n, out, r], scales [n].
Ranks differ between adapters (and between sites of one adapter, rank_pattern): each site's bank
has the largest rank served there, smaller adapters zero-padded, which adds nothing to the output
and keeps zero gradients in the padding. A site an adapter does not target gets a zero slot.
The serving layer reads adapters into `LoraAdapter`s (peftc.serving.sources); lower_lora_multi
builds the banks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftc.errors import CheckpointError
from peftc.ir.sites import Site


@dataclass(frozen=True)
class SiteLora:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass(frozen=True)
class LoraAdapter:
    """One served adapter: its name and its LoRA at each site path it targets."""

    name: str
    sites: dict[str, SiteLora]


@dataclass(frozen=True)
class ServingPlan:
    """The adapters one served model stacks at its sites, in id order."""

    adapters: tuple[LoraAdapter, ...]

    @property
    def site_paths(self) -> set[str]:
        return {path for adapter in self.adapters for path in adapter.sites}


class LoraBank(nn.Module):
    """Every served adapter's LoRA at one site, stacked: A_bank [n, r, in], B_bank [n, out, r], scales [n].

    The banks are parameters, frozen: serving does not train; `requires_grad_()` them to train
    through the multi-adapter ops (padding and empty slots keep zero gradients).
    """

    def __init__(self, site: Site, adapters: list[LoraAdapter], weight: torch.Tensor):
        super().__init__()
        loras = [adapter.sites.get(site.path) for adapter in adapters]
        rank = max(lora.a.shape[0] for lora in loras if lora is not None)
        factory = dict(dtype=weight.dtype, device=weight.device)
        a_bank = torch.zeros(len(adapters), rank, site.in_features, **factory)
        b_bank = torch.zeros(len(adapters), site.out_features, rank, **factory)
        scales = torch.zeros(len(adapters), **factory)
        for i, (adapter, lora) in enumerate(zip(adapters, loras)):
            if lora is None:
                continue
            _check_shapes(adapter.name, site, lora)
            r = lora.a.shape[0]
            a_bank[i, :r] = lora.a
            b_bank[i, :, :r] = lora.b
            scales[i] = lora.scale
        self.A_bank = nn.Parameter(a_bank, requires_grad=False)
        self.B_bank = nn.Parameter(b_bank, requires_grad=False)
        self.register_buffer("scales", scales)
        self.ranks = [0 if lora is None else lora.a.shape[0] for lora in loras]


def _check_shapes(name: str, site: Site, lora: SiteLora) -> None:
    r = lora.a.shape[0]
    want_a, want_b = (r, site.in_features), (site.out_features, r)
    if tuple(lora.a.shape) != want_a or tuple(lora.b.shape) != want_b:
        raise CheckpointError(f"adapter {name!r}, site {site.path!r}: A {tuple(lora.a.shape)} and B "
                              f"{tuple(lora.b.shape)} do not fit the layer (want {want_a} and {want_b}); "
                              "was the adapter trained on another model?")
