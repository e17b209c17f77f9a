"""Which kernel a custom op runs: Triton where it can (CUDA and an importable triton), torch elsewhere."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def triton_ready(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run for tensors on `device` (CUDA and an importable triton)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def on_cuda(op, triton_impl: Callable, torch_impl: Callable) -> Callable:
    """Register `op`'s CUDA kernel: `triton_impl` where Triton can run, `torch_impl` otherwise
    (no triton installed, or a CUDA build on a machine without a GPU). Returns the dispatcher."""

    def dispatch(*args):
        device = next(a.device for a in args if isinstance(a, Tensor))
        return (triton_impl if triton_ready(device) else torch_impl)(*args)

    op.register_kernel("cuda")(dispatch)
    return dispatch
