"""insert_lora: add a low-rank update beside each targeted weight op: y = W x + s * B (A dropout(x)).

On a 3-D expert parameter [E, out, in] the update is to the weight, one (A, B) pair per expert,
laid out as HF PEFT's ParamWrapper (A [r·E, in], B [out, r·E]): W_e + s · B_e A_e wherever W is read.
On a grouped conv, B is grouped as PEFT's ([out, r/groups, 1...]), so the update cannot fold into W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import (
    boolean,
    non_negative_int,
    one_of,
    optional_pattern_list,
    pattern_map,
    positive_int,
    positive_number,
    probability,
)
from peftc.core.targets import matches
from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.sites import PARAMETER_KINDS, Site
from peftc.pipeline.runner import PassContext, PassResult

from . import _lora_inits as lora_inits
from ._conflicts import check_one_rewrite_per_weight
from ._per_site import rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._weight_ops import (
    add_output,
    add_to_parameter,
    bias_param,
    conv_geometry,
    flip_layout,
    maybe_dropout,
)

aten = torch.ops.aten


RESIDUAL_INITS = ("pissa", "olora", "corda")  # the base reads W - s·B0 A0 (subtracted in the graph)
CALIBRATED_INITS = ("corda", "eva")  # need the sites' inputs on calibration data (compile(calibration=...))
WEIGHT_INITS = (*RESIDUAL_INITS, "loftq", "eva")  # computed per site, from the weight or the data: linear only
LORA_KINDS = ("linear", "conv", "embedding", *PARAMETER_KINDS)
MAX_ITERATIONS = 1000  # pissa_niter, loftq_iter: each iteration is an SVD of the weight
MAX_EVA_RHO = 1000.0  # PEFT caps rho by the largest weight dimension / r


@dataclass(frozen=True)
class LoraConfig:
    """LoRA (Hu et al., 2021); `rslora` scales by alpha/sqrt(r) (Kalajdzievski, 2023)."""

    method = "lora"
    targets: tuple = field(default=(), metadata={"check": optional_pattern_list})
    r: int = field(default=8, metadata={"check": positive_int})
    alpha: float = field(default=8, metadata={"check": positive_number})
    dropout: float = field(default=0.0, metadata={"check": probability})
    rslora: bool = field(default=False, metadata={"check": boolean})
    # "pissa" / "olora" / "corda": A, B from the weight's SVD / QR / covariance-weighted SVD, and the base
    # weight less s·B0 A0 (PEFT rewrites the weight; peftc subtracts s·B0(A0 x) in the graph, so the user's
    # weights are never touched). "loftq": the base quantized (as spec.quantize, else NF4 / int8 by
    # loftq_bits) and A, B the low-rank correction. "eva": A from the SVD of the sites' inputs, B zero.
    # corda and eva read calibration data: peftc.compile(model, spec, calibration=batches).
    init: str = field(default="default", metadata={"check": one_of("default", "gaussian", *RESIDUAL_INITS,
                                                                    "loftq", "eva")})
    # > 0: PiSSA by randomized SVD with that many subspace iterations (PEFT's "pissa_niter_K")
    pissa_niter: int = field(default=0, metadata={"check": non_negative_int})
    loftq_bits: int = field(default=4, metadata={"check": one_of(4, 8)})
    loftq_iter: int = field(default=1, metadata={"check": positive_int})
    corda_method: str = field(default="ipm", metadata={"check": one_of("ipm", "kpm")})  # largest / smallest pairs
    # EVA's rank budget: each site offers round(r·rho) directions, the sum of r goes to those that explain
    # the most variance (PEFT's eva_config.rho); 1: every site keeps r
    eva_rho: float = field(default=1.0, metadata={"check": positive_number})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})
    gate: bool = field(default=False, metadata={"check": boolean})  # UniPELT: update * sigmoid(w·x + b)
    # Per-site overrides, {target pattern: value}; the first pattern matching a site wins.
    rank_pattern: dict = field(default_factory=dict, metadata={"check": pattern_map(positive_int)})
    alpha_pattern: dict = field(default_factory=dict, metadata={"check": pattern_map(positive_number)})
    # Parameters selected by name (PEFT's target_parameters): "experts.gate_up_proj" matches a
    # parameter FQN ending with those components. MoE experts are reached this way.
    target_parameters: tuple = field(default=(), metadata={"check": optional_pattern_list})
    # PEFT's lora_bias: B has a bias, so the update is s·(B A x + b); merged, s·b joins the op's bias.
    lora_bias: bool = field(default=False, metadata={"check": boolean})

    def validate(self, path: str) -> None:
        if not self.targets and not self.target_parameters:
            raise SpecError(f"{path}.targets: expected a non-empty list of module names, or 'target_parameters' "
                            "(parameter names, e.g. ['experts.gate_up_proj']); both are empty")
        for name, init, default in (("pissa_niter", "pissa", 0), ("loftq_bits", "loftq", 4),
                                    ("loftq_iter", "loftq", 1), ("corda_method", "corda", "ipm"),
                                    ("eva_rho", "eva", 1.0)):
            if getattr(self, name) != default and self.init != init:
                raise SpecError(f"{path}.{name}: applies to init {init!r} only; this entry's init is "
                                f"{self.init!r}. Remove {name} or set init to {init!r}")
        if not 1.0 <= self.eva_rho <= MAX_EVA_RHO:
            raise SpecError(f"{path}.eva_rho: expected a number from 1 to {MAX_EVA_RHO} (each site offers "
                            f"round(r·rho) directions), got {self.eva_rho!r}")
        for name in ("pissa_niter", "loftq_iter"):
            if getattr(self, name) > MAX_ITERATIONS:
                raise SpecError(f"{path}.{name}: each iteration is an SVD of the weight; expected at most "
                                f"{MAX_ITERATIONS}, got {getattr(self, name)}")

    def __hash__(self) -> int:  # the pattern dicts would make the generated hash fail; specs stay hashable
        return hash(tuple(tuple(v.items()) if isinstance(v, dict) else v for v in vars(self).values()))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def r_at(self, path: str) -> int:
        return _first_match(self.rank_pattern, path, self.r)

    def alpha_at(self, path: str) -> float:
        return _first_match(self.alpha_pattern, path, self.alpha)

    def scale_at(self, path: str) -> float:
        """The scale at one site, after rank_pattern / alpha_pattern."""
        r = self.r_at(path)
        return self.alpha_at(path) / (math.sqrt(r) if self.rslora else r)


def fold_lora_bias(module: "LoraWeights", site: Site, bias: torch.Tensor) -> torch.Tensor:
    """lora_bias: the op's bias + s·b (no change without it)."""
    b = getattr(module, "B_bias", None)
    return bias if b is None else bias + (b * module.scale).to(bias.dtype)


def _first_match(patterns: dict, path: str, default):
    return next((value for pattern, value in patterns.items() if matches(pattern, path)), default)


class LoraWeights(nn.Module):
    """A (r x in[, kernel]) and B (out x r[, 1...]), laid out as HF PEFT's lora_A / lora_B weights."""

    def __init__(self, site: Site, weight: torch.Tensor, config: LoraConfig,
                 start: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        r = config.r_at(site.path)
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.groups = site.in_features // weight.shape[1] if site.kind == "conv" else 1
        self.experts = site.experts
        if site.kind == "conv":
            kernel = tuple(weight.shape[2:])
            a_shape = (r, site.in_features, *kernel)
            b_shape = (site.out_features, r // self.groups, *([1] * len(kernel)))
            if self.groups > 1:  # B is a grouped conv (as PEFT's): its update is not a weight of W's shape
                self.foldable = False
        elif site.kind == "experts":
            a_shape, b_shape = (r * site.experts, site.in_features), (site.out_features, r * site.experts)
        else:
            a_shape, b_shape = (r, site.in_features), (site.out_features, r)
        self.A = nn.Parameter(torch.empty(a_shape, **factory))
        self.B = nn.Parameter(torch.empty(b_shape, **factory))
        if config.lora_bias:
            self.B_bias = nn.Parameter(torch.zeros(site.out_features, **factory))
        self.scale = config.scale_at(site.path)
        self.kind = site.kind
        if config.gate:  # input-dependent, so a gated update cannot be folded into W
            self.gate = nn.Parameter(torch.zeros(1, site.in_features, **factory))
            self.gate_bias = nn.Parameter(torch.zeros(1, **factory))
            self.foldable = False
        self.reset_parameters(config.init)
        if start is not None:  # a weight- or data-dependent init (passes/_lora_inits.py)
            self._start_from(*start, residual=config.init in RESIDUAL_INITS)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if self.A.is_meta:
            return
        if self.kind == "embedding":  # as HF PEFT: A zero, B normal, so the update starts at zero
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)
        elif init == "gaussian":
            nn.init.normal_(self.A, std=1 / self.A.shape[0])
            nn.init.zeros_(self.B)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.zeros_(self.B)

    @torch.no_grad()
    def _start_from(self, a0: torch.Tensor, b0: torch.Tensor, residual: bool) -> None:
        """A, B = A0, B0. With `residual`, buffers keep B0 A0, which the graph subtracts from the base op:
        the residual weight W - s·B0 A0 that PEFT writes into the model, which peftc never does."""
        self.A.copy_(a0)
        self.B.copy_(b0)
        if residual:
            self.register_buffer("A0", a0.to(self.A.dtype).clone(), persistent=False)  # recomputed at compile
            self.register_buffer("B0", b0.to(self.B.dtype).clone(), persistent=False)
            self.not_in_peft = ("A0", "B0")  # PEFT recomputes them from the base weight, as peftc does

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_e [E, out, r], A_e [E, r, in]): PEFT's ParamWrapper reads A's rows expert-major and B's
        columns rank-major."""
        e = self.experts
        a = self.A.reshape(e, -1, self.A.shape[-1])
        b = self.B.reshape(self.B.shape[0], -1, e).permute(2, 0, 1)
        return b, a

    def delta_weight(self) -> torch.Tensor:
        """s * B A, in the base weight's [(E,) out, in, ...] layout."""
        if self.kind == "experts":
            b, a = self.expert_factors()
            return torch.bmm(b, a) * self.scale
        if self.kind == "conv":
            a = self.A.flatten(1)
            b = self.B.flatten(1)
            return (b @ a).view(self.B.shape[0], *self.A.shape[1:]) * self.scale
        if self.kind == "embedding":
            return (self.B @ self.A).T * self.scale  # [num_embeddings, dim]
        if hasattr(self, "A0"):  # the residual base: W - s·B0 A0
            return (self.B @ self.A - self.B0 @ self.A0) * self.scale
        return (self.B @ self.A) * self.scale


def insert_lora(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add s * B(A(dropout(x))) to the output of every targeted linear, conv or embedding op."""
    config: LoraConfig = ctx.entry
    kinds = ("linear",) if config.gate else LORA_KINDS
    sites = select_sites(ctx, config, kinds=kinds)
    _check_sites(ctx, config, sites)
    check_one_rewrite_per_weight(gm, ctx, sites)
    return rewrite_sites(gm, ctx, sites,
                         lambda site, weight: LoraWeights(site, weight, config, initial_factors(ctx, site, weight)),
                         lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, config, module))


def _check_sites(ctx: PassContext, config: LoraConfig, sites: list[Site]) -> None:
    field = f"adapters[{ctx.entry_index}]"
    for site in sites:
        if config.init in WEIGHT_INITS and site.kind != "linear":
            raise SpecError(f"{field}.init: {config.init!r} is computed from a linear weight; {site.path!r} is "
                            f"a {site.kind} site (PEFT supports it on linear layers only)")
        if config.lora_bias and site.kind not in ("linear", "conv"):
            raise SpecError(f"{field}.lora_bias: a LoRA bias needs a linear or conv op (as PEFT); {site.path!r} "
                            f"is a {site.kind} site")
        if site.kind == "experts" and config.dropout:
            raise SpecError(f"{field}.dropout: LoRA on the expert parameter {site.param!r} updates the weight, "
                            "which has no input to drop (PEFT refuses it too); set dropout to 0")
        groups = _conv_groups_of(ctx, site)
        if config.r_at(site.path) % groups:
            raise SpecError(f"{field}.r: {config.r_at(site.path)} is not divisible by the {groups} groups of the "
                            f"conv at {site.path!r}; LoRA's B is grouped as the conv is (as PEFT), so pick a "
                            "multiple of the groups (rank_pattern can set it for that site)")


def initial_factors(ctx: PassContext, site: Site, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A0, B0) of a weight- or data-dependent init at one linear site, None for a random init."""
    config: LoraConfig = ctx.entry
    w, r, scale = flip_layout(weight, site), config.r_at(site.path), config.scale_at(site.path)
    if config.init == "pissa":
        return lora_inits.pissa_factors(w, r, scale, config.pissa_niter)
    if config.init == "olora":
        return lora_inits.olora_factors(w, r)
    if config.init == "loftq":  # quantize_base, which ran first, decomposed the weight it packed
        return ctx.shared.loftq[site.param]
    if config.init in CALIBRATED_INITS:
        inputs = calibrated_inputs(ctx, site)
        if config.init == "corda":
            return lora_inits.corda_factors(w, inputs.covariance(site.path), r, scale, config.corda_method)
        if inputs.rows_seen(site.path) < r:
            raise SpecError(f"adapters[{ctx.entry_index}].init: EVA needs at least r={r} input rows at "
                            f"{site.path!r}; the calibration data gave {inputs.rows_seen(site.path)}")
        return lora_inits.eva_factors(inputs.components(site.path, r), w.shape[0])
    return None


def calibrated_inputs(ctx: PassContext, site: Site):
    """The calibration statistics of `site` (peftc.ir.calibration), or a SpecError saying how to get them."""
    field = f"adapters[{ctx.entry_index}].init"
    inputs = ctx.shared.calibration
    if inputs is None:
        raise SpecError(f"{field}: {ctx.entry.init!r} starts from the inputs each site sees on calibration data; "
                        "pass some: peftc.compile(model, spec, calibration=batches) (an iterable of model "
                        "inputs, or a function that calls the model it is given)")
    if not inputs.seen(site.path):
        raise SpecError(f"{field}: the calibration data never reached {site.path!r} (its op did not run); "
                        "give batches that run every targeted module, or exclude it")
    return inputs


def _conv_groups_of(ctx: PassContext, site: Site) -> int:
    """A conv site's groups (its weight holds in_features / groups input channels); 1 for other kinds."""
    return site.in_features // ctx.base_params[site.param].shape[1] if site.kind == "conv" else 1


def _rewrite_parameter(gm: GraphModule, site: Site, ctx: PassContext, config: LoraConfig) -> None:
    """W + s · B A where the parameter is read: per expert (bmm(B_e, A_e), see LoraWeights.expert_factors),
    or before a weight is split into rows (nn.MultiheadAttention's in_proj_weight; there is no input
    to drop there, so dropout does not apply, as in PEFT, which merges that update into the weight)."""
    e, scale = site.experts, config.scale_at(site.path)

    def build_delta(ins):
        a = ins.get_attr(adapters.target(site.path, ctx.slot, "A"))
        b = ins.get_attr(adapters.target(site.path, ctx.slot, "B"))
        if not e:
            return ins.call(aten.mm.default, b, a), {"alpha": scale}
        a = ins.call(aten.view.default, a, [e, -1, site.in_features])
        b = ins.call(aten.permute.default, ins.call(aten.view.default, b, [site.out_features, -1, e]), [2, 0, 1])
        delta = ins.call(aten.bmm.default, b, a)  # [E, out, in]
        if site.layout == "in_out":
            delta = ins.call(aten.transpose.int, delta, 1, 2)
        return delta, {"alpha": scale}

    add_to_parameter(gm, site, lambda anchor: site_inserter(gm, anchor, site, ctx, "insert_lora"), build_delta)


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, config: LoraConfig,
                  module: LoraWeights) -> None:
    if site.kind in PARAMETER_KINDS:
        return _rewrite_parameter(gm, site, ctx, config)
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, "insert_lora")
    a = ins.get_attr(adapters.target(site.path, ctx.slot, "A"))
    b = ins.get_attr(adapters.target(site.path, ctx.slot, "B"))
    b_bias = ins.get_attr(adapters.target(site.path, ctx.slot, "B_bias")) if config.lora_bias else None
    if config.lora_bias and bias_param(gm, site) is None:  # merged, s·b needs a bias to join
        module.foldable = False
    x = node.args[site.input_index]
    if site.kind == "embedding":
        delta = ins.call(aten.matmul.default, ins.call(aten.embedding.default, ins.call(aten.t.default, a), x),
                         ins.call(aten.t.default, b))
    else:
        x = maybe_dropout(ins, x, config.dropout)
        if site.kind == "conv":
            stride, padding, dilation = conv_geometry(node)
            groups = _conv_groups_of(ctx, site)
            hidden = ins.call(aten.convolution.default, x, a, None, stride, padding, dilation, False, [0], 1)
            ones = [1] * len(stride)
            delta = ins.call(aten.convolution.default, hidden, b, b_bias, ones, [0] * len(stride), ones, False,
                             [0] * len(stride), groups)
        else:
            delta = ins.call(aten.linear.default, ins.call(aten.linear.default, x, a), b,
                             *([b_bias] if b_bias is not None else []))
            if config.init in RESIDUAL_INITS:  # the base op reads W - s·B0 A0: subtract B0(A0 x) before scaling
                a0, b0 = (ins.get_attr(adapters.target(site.path, ctx.slot, n)) for n in ("A0", "B0"))
                x_base = node.args[site.input_index]
                start = ins.call(aten.linear.default, ins.call(aten.linear.default, x_base, a0), b0)
                delta = ins.call(aten.sub.Tensor, delta, start)
    if config.gate:
        w, bias = (ins.get_attr(adapters.target(site.path, ctx.slot, n)) for n in ("gate", "gate_bias"))
        gate = ins.call(aten.linear.default, node.args[site.input_index], w, bias)
        delta = ins.call(aten.mul.Tensor, delta, ins.call(aten.sigmoid.default, gate))
    # add(y, delta, alpha=s) scales and adds in one pass over the output, where
    # HF PEFT's y + delta * s makes two; the numbers agree to float rounding.
    add_output(ins, node, delta, users, alpha=config.scale_at(site.path))
