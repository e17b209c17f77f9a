"""A quantized base in the graph: packed weights as buffers, and the `peftc::quantized_linear` op.

The packed buffers of the weight `model.layers.0.mlp.up_proj.weight` live in a module tree
mounted at `quantized` on each graph module: `quantized.model.layers.0.mlp.up_proj.weight.codes`
and `.scales` (or `.scale_codes`, `.scale_scale`, `.scale_mean` when double-quantized). The
user's model is never touched; graphs for other call signatures share the same buffers.

`peftc::quantized_linear(x, qdata, bias, format, out, in, group, compute_dtype)` is one node per
site: it dequantizes on the fly and, in backward, dequantizes again instead of saving the
full-precision weight, so training never holds more than one layer's weight in full precision
(the reason QLoRA fits in memory).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from peftc.ir import adapters, weight_codec

ROOT = "quantized"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SCALE_NAMES = ("scales",)
_DOUBLE_SCALE_NAMES = ("scale_codes", "scale_scale", "scale_mean")


class QuantizedWeight(nn.Module):
    """The packed form of one [out, in] base weight, as buffers (never parameters: they do not train)."""

    def __init__(self, tensors: list[torch.Tensor], fmt: str, out_features: int, in_features: int,
                 group_size: int):
        super().__init__()
        self.fmt, self.out_features, self.in_features, self.group_size = fmt, out_features, in_features, group_size
        zero_points = ("zero_points",) if fmt == "int4" else ()
        scale_count = len(tensors) - 1 - len(zero_points)
        names = ("codes",) + zero_points + (_SCALE_NAMES if scale_count == 1 else _DOUBLE_SCALE_NAMES)
        for name, tensor in zip(names, tensors):
            self.register_buffer(name, tensor)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, config) -> "QuantizedWeight":
        """Quantize a [out, in] weight as `config` (a QuantizeConfig) says."""
        fmt = config.format_name
        tensors = weight_codec.quantize(weight, fmt, config.group_size, config.double_quant)
        return cls(tensors, fmt, weight.shape[0], weight.shape[1], config.group_size)

    def tensors(self) -> list[torch.Tensor]:
        return list(self._buffers.values())

    def names(self) -> list[str]:
        return list(self._buffers)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return weight_codec.dequantize(self.tensors(), self.fmt, self.out_features, self.in_features, self.group_size,
                                dtype)

    def nbytes(self) -> int:
        return weight_codec.nbytes(self.tensors())

    def extra_repr(self) -> str:
        return f"{self.fmt}, {self.out_features}x{self.in_features}, group={self.group_size}"


def weight_module(root: nn.Module, param: str) -> QuantizedWeight | None:
    module = adapters.module_at(root, param, create=False)
    return module if isinstance(module, QuantizedWeight) else None


def put_weight(root: nn.Module, param: str, module: QuantizedWeight) -> None:
    parent_path, _, leaf = param.rpartition(".")
    adapters.module_at(root, parent_path, create=True).add_module(leaf, module)


def quantized_weights(root: nn.Module) -> dict[str, QuantizedWeight]:
    """Base weight FQN -> its QuantizedWeight, for every weight under `root`."""
    return {name: m for name, m in root.named_modules() if isinstance(m, QuantizedWeight)}


def summary(gm: nn.Module) -> dict | None:
    """Totals for report(): how many base weights are packed, and their bytes against fp32."""
    root = gm._modules.get(ROOT)
    weights = quantized_weights(root) if root is not None else {}
    if not weights:
        return None
    params = sum(m.out_features * m.in_features for m in weights.values())
    packed = sum(m.nbytes() for m in weights.values())
    return {"formats": sorted({m.fmt for m in weights.values()}), "weights": len(weights), "params": params,
            "bytes": packed, "fp32_bytes": 4 * params, "ratio_vs_fp32": packed / (4 * params)}


# -- the op ----------------------------------------------------------------------------------
@torch.library.custom_op("peftc::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, qdata: list[torch.Tensor], bias: torch.Tensor | None, fmt: str,
                     out_features: int, in_features: int, group_size: int,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """linear(x, dequantize(qdata), bias), computed in `compute_dtype`, returned in x's dtype."""
    return linear(x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype)


def linear(x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype) -> torch.Tensor:
    """The op's math, callable from other ops (the fused dequant + LoRA op's torch path)."""
    weight = weight_codec.dequantize(qdata, fmt, out_features, in_features, group_size, compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    return torch.nn.functional.linear(x.to(compute_dtype), weight, b).to(x.dtype)


def linear_grad_x(grad, qdata, fmt, out_features, in_features, group_size, compute_dtype, x_dtype) -> torch.Tensor:
    """d linear / dx: the weight dequantized again (never saved in full precision)."""
    weight = weight_codec.dequantize(qdata, fmt, out_features, in_features, group_size, compute_dtype)
    return (grad.to(compute_dtype) @ weight).to(x_dtype)


@quantized_linear.register_fake
def _(x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype = inputs
    ctx.save_for_backward(*qdata)  # the packed buffers themselves: no extra memory
    ctx.args = (fmt, out_features, in_features, group_size, compute_dtype)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    fmt, out_features, in_features, group_size, compute_dtype = ctx.args
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = linear_grad_x(grad, list(ctx.saved_tensors), *ctx.args, ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_bias = grad.reshape(-1, out_features).sum(0).to(ctx.bias_dtype)
    return grad_x, [None] * len(ctx.saved_tensors), grad_bias, None, None, None, None, None


quantized_linear.register_autograd(_backward, setup_context=_setup_context)
OP = torch.ops.peftc.quantized_linear.default


# -- the model the compiled model recaptures from ---------------------------------------------
def without_quantized_weights(model: nn.Module, params: list[str]) -> nn.Module:
    """A structural copy of `model` whose weights named in `params` are zero-storage placeholders.

    Every other parameter and buffer is shared, not copied. A CompiledModel keeps this copy
    (to capture graphs for new call signatures) instead of the user's model, so once the user
    drops their model the full-precision weights are freed: only the packed ones remain.
    Capture needs only shapes; quantize_base reuses the packed buffers it made the first time.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    memo: dict[int, torch.Tensor] = {id(t): t for t in list(named.values()) + list(model.buffers())}
    for name in params:
        weight = named[name]
        memo[id(weight)] = nn.Parameter(torch.zeros((), dtype=weight.dtype, device=weight.device)
                                        .expand(weight.shape), requires_grad=False)
    return copy.deepcopy(model, memo)
