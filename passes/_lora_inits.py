"""The LoRA inits computed from the base weight (and for CorDA from calibration data): the starting
A0 [r, in] and B0 [out, r], in float32, for an [out, in] weight.

Each follows the maths of the method's paper as HF PEFT implements it, so that the same base
(and the same calibration data) gives PEFT's A and B:

- PiSSA: the r principal singular pairs, sqrt(S/s) on each side; with `niter` > 0, torch's
  randomized `svd_lowrank` (PEFT's "pissa_niter_K") instead of the full SVD.
- OLoRA: the first r columns of Q and rows of R of W's QR decomposition.
- CorDA: the SVD of W C (C the covariance of the site's inputs, damped until it inverts well),
  the right vectors mapped back by C^-1; "ipm" keeps the r largest pairs, "kpm" the r smallest.
- EVA: A the r leading principal directions of the site's inputs on calibration data, B zero.
- LoftQ: alternate quantizing and a rank-r SVD of what quantization lost; the base becomes the
  quantized weight and A, B the low-rank correction (not divided by s, as PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftc.ir import weight_codec

CORDA_START_DAMP = 0.01  # the ridge added to C, as a fraction of its mean diagonal, doubled until C inverts
CORDA_INVERSE_ERROR = 0.05  # ||C C^-1 - I|| below this is a good enough inverse


def pissa_factors(weight: torch.Tensor, r: int, scale: float, niter: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().float()
    if niter:
        u, sv, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.T
    else:
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.diag(torch.sqrt(sv[:r] / scale))
    return root @ vh[:r], u[:, :r] @ root


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, rr = torch.linalg.qr(weight.detach().float())
    return rr[:r], q[:, :r]


def corda_factors(weight: torch.Tensor, covariance: torch.Tensor, r: int, scale: float,
                  method: str) -> tuple[torch.Tensor, torch.Tensor]:
    w, cov = weight.detach().float(), covariance.float()
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp = CORDA_START_DAMP
    while True:
        damped = cov + eye * (cov.diagonal().mean() * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < CORDA_INVERSE_ERROR:
            break
        damp *= 2
    u, sv, vh = torch.linalg.svd(w @ damped, full_matrices=False)
    v = (vh @ inverse).T
    keep = slice(0, r) if method == "ipm" else slice(sv.shape[0] - r, sv.shape[0])
    root = torch.sqrt(sv[keep] / scale)
    return v[:, keep].T * root[:, None], u[:, keep] * root


@dataclass(frozen=True)
class Codec:
    """How LoftQ quantizes: a weight_codec format and its group size (and double-quantized scales)."""

    fmt: str
    group_size: int
    double_quant: bool = False

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        packed = weight_codec.quantize(weight, self.fmt, self.group_size, self.double_quant)
        return weight_codec.dequantize(packed, self.fmt, weight.shape[0], weight.shape[1], self.group_size)


@dataclass(frozen=True)
class LoftqInit:
    """One weight's LoftQ start: quantizing `quantized_from` gives the base; B @ A corrects it."""

    quantized_from: torch.Tensor  # [out, in] f32: the last tensor LoftQ quantized
    base: torch.Tensor  # [out, in] f32: its round trip through the codec, the new base weight
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]


def loftq_factors(weight: torch.Tensor, r: int, codec: Codec, iterations: int) -> LoftqInit:
    """LoftQ (Li et al., 2023), algorithm 1: Q = quant(W - B A), then B A = the rank-r SVD of W - Q."""
    w = weight.detach().float()
    target = w
    for step in range(iterations):
        base = codec.round_trip(target)
        u, sv, vh = torch.linalg.svd(w - base, full_matrices=False)
        root = torch.sqrt(sv[:r])
        b, a = u[:, :r] * root, vh[:r] * root[:, None]
        if step + 1 < iterations:
            target = w - b @ a
    return LoftqInit(target, base, a, b)


def eva_factors(components: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA: A = the leading principal directions of the site's inputs, B = 0 (the model starts unchanged)."""
    return components, torch.zeros(out_features, components.shape[0], dtype=components.dtype)
