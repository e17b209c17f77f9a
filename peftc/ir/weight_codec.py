"""Weight quantization math: int8 per output channel, int4 and NF4 per group, double-quantized scales.

Every quantized weight is a list of tensors, always for a [out, in] weight:

    int8   [codes int8 [out, in], scale f32 [out]]           w = code * scale (symmetric, per row)
    int4   [packed uint8 [out, K/2], zero_points uint8 [out, K/g], scales]
                                                             w = (code - zero_point) * scale
    nf4    [packed uint8 [out, K/2], scales]                 w = NF4[code] * absmax

int4 is asymmetric (min/max per group, zero kept exact), ONNX Runtime MatMulNBits' format with
zero points; on normal weights it has about 30% less squared error than symmetric absmax int4
(QLoRA's "Int4" baseline), slightly less than NF4. K is `in` rounded up to a multiple of the
group size g: a ragged last group is zero-padded (as MatMulNBits pads K to its block size).
`scales` is one f32 tensor [out, K/g] or, double-quantized (QLoRA), three tensors: int8 codes of
(scale - mean) in blocks of 256, one f32 scale per block, and the f32 mean. Two 4-bit codes
share a byte, the first (even column) in the low nibble, as in MatMulNBits.
"""

from __future__ import annotations

import functools

import torch

# QLoRA's NormalFloat4 code book (Dettmers et al., 2023, appendix E; bitsandbytes' values):
# quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
FORMATS = ("int8", "int4", "nf4")
SCALE_BLOCK = 256  # double quantization: one f32 scale per 256 int8-coded scales
_TINY = 1e-12  # an all-zero row or group gets this scale, so it dequantizes to exact zeros


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


# -- nibbles ---------------------------------------------------------------------------------
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16) of shape [out, in] -> [out, in/2] bytes, even columns in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: [out, in/2] bytes -> [out, in] uint8 codes."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


@functools.lru_cache(maxsize=8)
def _byte_table(fmt: str, device: torch.device) -> torch.Tensor:
    """[256, 2] f32: the values of a byte's (low, high) codes, as the format reads them."""
    byte = torch.arange(256, device=device)
    values = (torch.stack((byte & 15, byte >> 4), dim=-1)).float()
    return nf4_code(device)[values.long()] if fmt == "nf4" else values


def code_values(packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """[out, in/2] bytes -> [out, in] f32 code values (nibbles for int4, the code book's for nf4).

    One table row per byte (an embedding lookup): 2-3x faster on CPU than unpacking the
    nibbles and then indexing the code book, which matters because training dequantizes twice
    per step (forward and backward).
    """
    table = _byte_table(fmt, packed.device)
    return torch.nn.functional.embedding(packed.long(), table).flatten(-2)


# -- scales ----------------------------------------------------------------------------------
def double_quantize(scales: torch.Tensor) -> list[torch.Tensor]:
    """QLoRA's double quantization: int8 codes of (scales - mean), one f32 scale per 256 of them."""
    flat = scales.flatten().float()
    mean = flat.mean()
    centered = flat - mean
    padded = torch.nn.functional.pad(centered, (0, -flat.numel() % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
    block_scale = padded.abs().amax(dim=1).clamp_min(_TINY) / 127
    codes = (padded / block_scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return [codes.flatten(), block_scale, mean]


def double_dequantize(codes: torch.Tensor, block_scale: torch.Tensor, mean: torch.Tensor, count: int) -> torch.Tensor:
    values = codes.view(-1, SCALE_BLOCK).float() * block_scale[:, None]
    return values.flatten()[:count] + mean


def group_scales(tensors: list[torch.Tensor], out_features: int, groups: int) -> torch.Tensor:
    """The f32 scales from the tail of a quantized list: one tensor, or three if double-quantized."""
    if len(tensors) == 1:
        return tensors[0].float()
    return double_dequantize(*tensors, out_features * groups).view(out_features, groups)


# -- quantize / dequantize -------------------------------------------------------------------
@torch.no_grad()
def quantize(weight: torch.Tensor, fmt: str, group_size: int, double_quant: bool = False) -> list[torch.Tensor]:
    """Quantize a [out, in] weight; see the module docstring for what each format returns."""
    w = weight.detach().float().contiguous()
    if fmt == "int8":
        scale = w.abs().amax(dim=1).clamp_min(_TINY) / 127
        return [(w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale]
    out_features = w.shape[0]
    w = torch.nn.functional.pad(w, (0, -w.shape[1] % group_size))  # a ragged last group: zero-padded
    in_features = w.shape[1]
    groups = w.view(out_features, in_features // group_size, group_size)
    zero_points = []
    if fmt == "int4":
        low = groups.amin(dim=-1).clamp_max(0)  # the range always holds 0, so zero (and padding) is exact
        high = groups.amax(dim=-1).clamp_min(0)
        scales = ((high - low) / 15).clamp_min(_TINY)
        zero = (-low / scales).round().clamp(0, 15)
        codes = (groups / scales[..., None] + zero[..., None]).round().clamp(0, 15)
        zero_points = [zero.to(torch.uint8)]
    elif fmt == "nf4":
        scales = groups.abs().amax(dim=-1).clamp_min(_TINY)
        code = nf4_code(w.device)
        codes = torch.bucketize(groups / scales[..., None], (code[1:] + code[:-1]) / 2)
    else:
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {list(FORMATS)}")
    packed = pack_nibbles(codes.to(torch.uint8).view(out_features, in_features))
    return [packed, *zero_points, *(double_quantize(scales) if double_quant else [scales])]


def dequantize(tensors: list[torch.Tensor], fmt: str, out_features: int, in_features: int, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] weight a quantized list stands for, in `dtype`."""
    if fmt == "int8":
        return (tensors[0].float() * tensors[1].float()[:, None]).to(dtype)
    groups = -(-in_features // group_size)
    values = code_values(tensors[0], fmt).view(out_features, groups, group_size)
    if fmt == "int4":
        values = values - tensors[1].float()[..., None]
        scales = group_scales(tensors[2:], out_features, groups)
    else:
        scales = group_scales(tensors[1:], out_features, groups)
    return (values * scales[..., None]).view(out_features, groups * group_size)[:, :in_features].to(dtype)


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
