"""Packed base-weight formats the dequant + LoRA kernels read, with torch reference (de)quantizers.

All formats describe a linear weight W of logical shape [N, K] (out_features x in_features,
nn.Linear's layout); scales run along K, so each output row dequantizes independently.

- ``int8``: ``qweight`` int8 [N, K]; ``scales`` float [N] (one per output channel);
  W[n, k] = qweight[n, k] * scales[n]. Symmetric, no zero point.
- ``int4``: ``qweight`` uint8 [N, ceil(K / 2)], two values per byte, the LOW nibble holds the
  even k (k = 2j in the low 4 bits of byte j, k = 2j + 1 in the high 4 bits); each nibble q is
  unsigned 0..15 with an implicit zero point of 8; ``scales`` float [N, ceil(K / group_size)];
  W[n, k] = (q - 8) * scales[n, k // group_size].
- ``nf4``: ``qweight`` packed exactly as int4; each nibble indexes the 16-value NormalFloat-4
  codebook ``NF4_CODE`` (QLoRA, Dettmers et al. 2023); ``scales`` are per-block absmax,
  float [N, ceil(K / group_size)] (blocks run along K inside one row; for K a multiple of the
  block this equals bitsandbytes' flat blocks of the row-major weight);
  W[n, k] = NF4_CODE[q] * scales[n, k // group_size].

A quantized weight is the tuple (format, qweight, scales, group_size, in_features); int8 ignores
group_size. The quantized-base pass is expected to hand over these tensors; `to_packed` below is
the reference producer used by the tests.
"""

from __future__ import annotations

import torch

FORMATS = ("int8", "int4", "nf4")
QUANT_CODE = {"int8": 1, "int4": 2, "nf4": 3}  # the kernels' QUANT constexpr (0: a float weight)

NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantized weight format: expected one of {list(FORMATS)}, got {fmt!r}")


def unpack_nibbles(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """[N, ceil(K/2)] uint8 -> [N, K] int64 nibbles, low nibble first."""
    q = qweight.to(torch.int64)
    both = torch.stack((q & 0xF, (q >> 4) & 0xF), dim=-1)
    return both.flatten(-2)[..., :in_features]


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """[N, K] ints in 0..15 -> [N, ceil(K/2)] uint8, low nibble first (an odd K is zero-padded)."""
    if values.shape[-1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    v = values.to(torch.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).contiguous()


def _group_expand(scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    return scales.repeat_interleave(group_size, dim=-1)[..., :in_features]


def dequantize(fmt: str, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantizer: W [N, K] in `dtype`."""
    check_format(fmt)
    s = scales.float()
    if fmt == "int8":
        w = qweight.float() * s[:, None]
    else:
        q = unpack_nibbles(qweight, in_features)
        values = (q - 8).float() if fmt == "int4" else nf4_code(q.device)[q]
        w = values * _group_expand(s, in_features, group_size)
    return w.to(dtype)


def to_packed(fmt: str, weight: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float [N, K] weight to (qweight, scales) in the layout above (round to nearest)."""
    check_format(fmt)
    w = weight.detach().float()
    n, k = w.shape
    if fmt == "int8":
        scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(w, (0, groups * group_size - k)).view(n, groups, group_size)
    absmax = padded.abs().amax(dim=-1).clamp_min(1e-12)
    if fmt == "int4":
        scales = absmax / 7
        q = torch.round(padded / scales[..., None]).clamp(-8, 7) + 8
    else:
        scales = absmax
        normed = padded / absmax[..., None]
        q = (normed[..., None] - nf4_code(w.device)).abs().argmin(dim=-1)
    return pack_nibbles(q.view(n, -1)[:, :k].long()), scales
