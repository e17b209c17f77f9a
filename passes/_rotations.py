"""Orthogonal blocks and how they act on a weight, in plain torch (traced into graphs by _traced).

Shared by OFT and BOFT. Nothing here creates a tensor from Python data or names a device:
identities and masks are derived from the inputs, so the traced graph follows `.to(device)`.
"""

from __future__ import annotations

import torch


def identities(count: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """[count, size, size] identity matrices with `like`'s dtype and device."""
    return torch.diag_embed(like.new_ones(count, size))


def skew_from_upper(vec: torch.Tensor, size: int) -> torch.Tensor:
    """[n, size, size] skew-symmetric matrices whose strict upper triangles are vec's rows (row-major,
    as torch.triu_indices orders them; HF PEFT's OFT layout)."""
    upper = vec.new_ones(size, size).triu(1) > 0
    matrix = vec.new_zeros(vec.shape[0], size, size).masked_scatter(upper, vec)
    return matrix - matrix.transpose(1, 2)


def upper_of(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of skew_from_upper: each matrix's strict upper triangle, row-major."""
    size = matrix.shape[-1]
    upper = matrix.new_ones(size, size).triu(1) > 0
    return matrix.masked_select(upper).view(matrix.shape[0], -1)


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """(I − Q)(I + Q)⁻¹ per block: orthogonal for skew-symmetric Q (HF PEFT's exact Cayley)."""
    eye = identities(skew.shape[0], skew.shape[-1], skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """HF PEFT's truncated Neumann series for the Cayley transform, term for term:
    I + 2Q + 2Q² + ... + 2Q^(terms−2) + Q^(terms−1) (terms > 2; with at least Q³ last), I + 2Q (2), I (1)."""
    out = identities(skew.shape[0], skew.shape[-1], skew)
    if terms < 2:
        return out
    out = out + 2 * skew
    if terms == 2:
        return out
    power = skew @ skew
    out = out + 2 * power
    for _ in range(3, terms - 1):
        power = power @ skew
        out = out + 2 * power
    return out + power @ skew


def rotate_blocks(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """weight [out, n·b] · block-diag(blocks)ᵀ, blocks [n, b, b]: the weight that sees each input block x_i
    (a row) as x_i·R_i, as HF PEFT's OFT rotates its input."""
    count, size = blocks.shape[0], blocks.shape[-1]
    split = weight.reshape(weight.shape[0], count, size)
    return torch.einsum("onk,nck->onc", split, blocks).reshape(weight.shape)


def blocks_to_identity(blocks: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """blocks [..., b, b] with those where `chosen` (blocks' leading shape, 0/1) is 1 replaced by I."""
    size = blocks.shape[-1]
    eye = torch.diag_embed(blocks.new_ones(*blocks.shape[:-2], size))
    chosen = chosen[..., None, None]
    return blocks * (1 - chosen) + eye * chosen


def random_choice(count: int, chosen: int, like: torch.Tensor) -> torch.Tensor:
    """A [count] 0/1 vector with exactly `chosen` ones at uniformly random places."""
    order = torch.rand_like(like.new_empty(count)).argsort()
    return (order < chosen).to(like.dtype)
