"""Adapter banks: every served adapter's change at one site, stacked so one op serves every row.

What a served adapter does at a linear site, whatever its PEFT method (`SiteAdapter`):
    y = out[id] ⊙ (W (in[id] ⊙ x) + s[id] B[id] A[id] x) + bias[id] ⊙ b
LoRA and VeRA (λb ⊙ B)(λd ⊙ A) give the low-rank pair; DoRA the pair and out = m / ||W + sBA||
(bias unscaled); IA3 a vector on the output (bias scaled too) or, on feedforward sites, the input.

A bank holds every served adapter in one tensor pair: A [n, r, in], B [n, out, r], scales [n].
Ranks differ between adapters (and between sites of one adapter, rank_pattern): each site's bank
has the largest rank served there, smaller adapters zero-padded, which adds nothing to the output
and keeps zero gradients in the padding. A site an adapter does not target gets a zero slot.
The serving layer reads adapters into `ServedAdapter`s (peftc.serving.sources); lower_lora_multi
builds the LoRA banks, lower_scales_multi the scale banks.

A bank keeps its adapters' dtype (`bank_dtype`): float32 adapters over a bfloat16 base (the spec's
adapter_dtype, PEFT's autocast_adapter_dtype) stay float32, and the multi-adapter ops compute the
adapter's part in float32 and round the site's output once, as each adapter's own compiled model does.
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
class SiteBottleneck:
    """A bottleneck adapter at a site: y + scale * (up act(down h + down_bias) + up_bias), h = y or x."""

    down: torch.Tensor  # [k, in_dim]
    down_bias: torch.Tensor  # [k]
    up: torch.Tensor  # [out, k]
    up_bias: torch.Tensor  # [out]
    scale: float
    activation: str  # "relu" | "gelu" | "silu" | "tanh": all 0 at 0, so zero-padding k adds nothing
    placement: str  # "serial" (h = the site's output) | "parallel" (h = its input)


@dataclass(frozen=True)
class SitePrefix:
    """A prefix-tuning adapter at one attention op: keys and values every query of the row sees first."""

    key: torch.Tensor  # [kv_heads, N, head_dim]
    value: torch.Tensor  # [kv_heads, N, head_dim]


@dataclass(frozen=True)
class SiteAdapter:
    """One adapter's change at one linear site (see the module docstring); None: that part is identity."""

    lora: SiteLora | None = None
    input_scale: torch.Tensor | None = None  # [in]: IA3 on a feedforward site
    output_scale: torch.Tensor | None = None  # [out]: IA3, scales the bias too
    magnitude: torch.Tensor | None = None  # [out]: DoRA's m; out = m / ||W + sBA||, the bias unscaled
    bottleneck: SiteBottleneck | None = None  # added after the rest: lower_bottleneck_multi
    # Not linear sites: prompt tuning at the token embedding, prefix tuning at an attention op
    # (peftc.ir.virtual_bank; lower_prompt_multi, lower_prefix_multi).
    prompt: torch.Tensor | None = None  # [N, dim]: virtual token embeddings before the row's tokens
    prefix: SitePrefix | None = None

    @property
    def is_linear(self) -> bool:
        return self.prompt is None and self.prefix is None


@dataclass(frozen=True)
class ServedAdapter:
    """One served adapter: its name, its PEFT method, and what it does at each site path it targets."""

    name: str
    method: str
    sites: dict[str, SiteAdapter]

    def loras(self) -> dict[str, SiteLora]:
        return {path: site.lora for path, site in self.sites.items() if site.lora is not None}


@dataclass(frozen=True)
class ServingPlan:
    """The adapters one served model stacks at its sites, in id order."""

    adapters: tuple[ServedAdapter, ...]
    # Training many adapters at once (train_adapters): adapter k's own tensors live at
    # peftc.<params[k]>.<site>.<slots[k]>.{A, B, l}; None when serving (the banks hold frozen copies).
    params: tuple[str, ...] | None = None
    slots: tuple[str, ...] | None = None
    gathered: bool = False  # export: peftc::lora_gather (gathers, batched matmuls) instead of lora_multi

    @property
    def site_paths(self) -> set[str]:
        """The linear sites some adapter changes (not prompt or prefix sites)."""
        return {path for adapter in self.adapters for path, site in adapter.sites.items() if site.is_linear}

    @property
    def prompt_paths(self) -> set[str]:
        return {path for adapter in self.adapters for path, site in adapter.sites.items() if site.prompt is not None}

    @property
    def prefix_paths(self) -> set[str]:
        return {path for adapter in self.adapters for path, site in adapter.sites.items() if site.prefix is not None}

    @property
    def has_virtual_tokens(self) -> bool:
        """Whether some adapter is prompt or prefix tuning: the served graph then reads explicit
        attention masks and positions (peftc.serving.virtual_inputs)."""
        return bool(self.prompt_paths or self.prefix_paths)

    @property
    def lora_paths(self) -> set[str]:
        return {path for adapter in self.adapters for path in adapter.loras()}

    @property
    def scaled_paths(self) -> set[str]:
        return {path for adapter in self.adapters for path, site in adapter.sites.items()
                if site.magnitude is not None or site.input_scale is not None or site.output_scale is not None}

    @property
    def bottleneck_paths(self) -> set[str]:
        return {path for adapter in self.adapters for path, site in adapter.sites.items() if site.bottleneck}


def bank_dtype(weight: torch.Tensor, tensors: list[torch.Tensor | None]) -> torch.dtype:
    """The dtype a bank of `tensors` (the served adapters' own, None where one has none) holds beside the
    base `weight`: the widest of them, so float32 adapters over a half-precision base are not rounded."""
    dtype = weight.dtype
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


class LoraBank(nn.Module):
    """Every served adapter's LoRA at one site, stacked: A_bank [n, r, in], B_bank [n, out, r], scales [n].

    The banks are parameters, frozen: serving does not train; `requires_grad_()` them to train
    through the multi-adapter ops (padding and empty slots keep zero gradients).
    """

    def __init__(self, site: Site, adapters: list[ServedAdapter], weight: torch.Tensor):
        super().__init__()
        loras = [adapter.loras().get(site.path) for adapter in adapters]
        rank = max(lora.a.shape[0] for lora in loras if lora is not None)
        dtype = bank_dtype(weight, [t for lora in loras if lora is not None for t in (lora.a, lora.b)])
        factory = dict(dtype=dtype, device=weight.device)
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


class ScaleBank(nn.Module):
    """Per-row vectors of every served adapter at one site, one row per adapter plus a last row of
    ones for the base (id -1 indexes it): `input` [n+1, in], `output` [n+1, out], `bias` [n+1, out].
    A part no served adapter has at the site is None. DoRA's output factor m / ||W + sBA|| is
    computed here once from the frozen weight (it has no gradient in DoRA either)."""

    def __init__(self, site: Site, adapters: list[ServedAdapter], weight: torch.Tensor, weight_out_in: torch.Tensor):
        super().__init__()
        parts = [adapter.sites.get(site.path, SiteAdapter()) for adapter in adapters]
        vectors = [t for p in parts for t in (p.input_scale, p.output_scale, p.magnitude)]
        factory = dict(dtype=bank_dtype(weight, vectors), device=weight.device)
        outputs = [p.output_scale if p.magnitude is None else _dora_factor(p, weight_out_in) for p in parts]
        self.register_buffer("input", self._bank([p.input_scale for p in parts], site.in_features, factory))
        self.register_buffer("output", self._bank(outputs, site.out_features, factory))
        self.register_buffer("bias", self._bank([p.output_scale for p in parts], site.out_features, factory))
        self.methods = [a.method for a in adapters]

    @staticmethod
    def _bank(vectors: list, size: int, factory: dict) -> torch.Tensor | None:
        if all(v is None for v in vectors):
            return None
        bank = torch.ones(len(vectors) + 1, size, **factory)
        for i, v in enumerate(vectors):
            if v is not None:
                bank[i] = v.reshape(-1)
        return bank


def _dora_factor(part: SiteAdapter, weight_out_in: torch.Tensor) -> torch.Tensor:
    """m / ||W + sBA||, in the adapter's dtype (W cast up, as the compiled DoRA computes it)."""
    lora = part.lora
    full = weight_out_in.to(lora.a.dtype) + lora.scale * (lora.b @ lora.a)
    return part.magnitude.reshape(-1) / torch.linalg.vector_norm(full, dim=1)


class BottleneckBank(nn.Module):
    """The bottleneck adapters of one (placement, activation) group at a site, stacked:
    down [n, k, in_dim], down_bias [n, k], up [n, out, k], up_bias [n, out], scales [n]; k is the
    group's largest bottleneck (smaller ones zero-padded), adapters outside the group get scale 0."""

    def __init__(self, site: Site, adapters: list[ServedAdapter], placement: str, activation: str,
                 weight: torch.Tensor):
        super().__init__()
        parts = [adapter.sites.get(site.path, SiteAdapter()).bottleneck for adapter in adapters]
        mine = [p if p is not None and (p.placement, p.activation) == (placement, activation) else None
                for p in parts]
        k = max(p.down.shape[0] for p in mine if p is not None)
        in_dim = next(p.down.shape[1] for p in mine if p is not None)
        dtype = bank_dtype(weight, [p.down for p in mine if p is not None])
        factory = dict(dtype=dtype, device=weight.device)
        n = len(adapters)
        down, down_bias = torch.zeros(n, k, in_dim, **factory), torch.zeros(n, k, **factory)
        up, up_bias = torch.zeros(n, site.out_features, k, **factory), torch.zeros(n, site.out_features, **factory)
        scales = torch.zeros(n, **factory)
        for i, p in enumerate(mine):
            if p is not None:
                r = p.down.shape[0]
                down[i, :r], down_bias[i, :r], up[i, :, :r] = p.down, p.down_bias, p.up
                up_bias[i], scales[i] = p.up_bias, p.scale
        for name, tensor in (("down", down), ("down_bias", down_bias), ("up", up), ("up_bias", up_bias),
                             ("scales", scales)):
            self.register_buffer(name, tensor)
        self.placement, self.activation = placement, activation
