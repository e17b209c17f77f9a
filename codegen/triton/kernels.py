"""The fused LoRA matmul kernel and its launchers (forward, backward, dequant variants).

One strided kernel computes

    out[M, P] = alpha * X[M, Q] @ op(W)[Q, P]  +  scale * H[M, R] @ op(B)[R, P]  (+ bias[P])

where op(W) reads the base weight W[N, K] either as W^T (forward: P = N, Q = K) or as W
(dx: P = K, Q = N), dequantizing int8 / int4 / nf4 in the tile loader (peftc.ir.weight_codec's
layouts, as the quantize_base pass stores them). H is
either computed inside the K loop from the same X tiles (H = X @ A^T, one launch: the
activations are read once) or read precomputed (a separate shrink launch, then the expand is
fused into the base matmul's epilogue). Every other matmul of the backward (the shrinks
dy @ B, x @ A^T and the adapter gradients u^T x, dy^T h) is the same kernel with other strides,
so the forward, the backward and every dtype share one code path.

Under TRITON_INTERPRET=1 (CPU tests) the launchers use one fixed block config; on a GPU the
kernel is autotuned. Every load and store is masked, since the interpreter does not catch
out-of-bounds accesses.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from peftc.ir import weight_codec

QUANT_CODE = {"int8": 1, "int4": 2, "nf4": 3}  # the kernel's QUANT constexpr (0: a float weight)


@triton.jit
def _load_weight(w_ptr, s_ptr, z_ptr, code_ptr, n, k, mask, stride_wn, stride_wk, stride_sn, stride_sg, group,
                 QUANT: tl.constexpr):
    """W[n, k] for broadcastable index tensors n, k (any tile orientation): a float weight in its own
    dtype (no round trip through fp32), a packed one (peftc.ir.weight_codec's layouts) dequantized to float32.
    Zero points share the scales' [N, groups] strides."""
    if QUANT == 0:
        w = tl.load(w_ptr + n * stride_wn + k * stride_wk, mask=mask, other=0.0)
    elif QUANT == 1:
        q = tl.load(w_ptr + n * stride_wn + k * stride_wk, mask=mask, other=0).to(tl.float32)
        w = q * tl.load(s_ptr + n * stride_sn, mask=mask, other=0.0).to(tl.float32)
    else:
        byte = tl.load(w_ptr + n * stride_wn + (k // 2) * stride_wk, mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((k % 2) * 4)) & 0xF
        group_offset = n * stride_sn + (k // group) * stride_sg
        s = tl.load(s_ptr + group_offset, mask=mask, other=0.0).to(tl.float32)
        if QUANT == 2:
            zero = tl.load(z_ptr + group_offset, mask=mask, other=0).to(tl.int32)
            w = (nibble - zero).to(tl.float32) * s
        else:
            w = tl.load(code_ptr + nibble, mask=mask, other=0.0).to(tl.float32) * s
    return w


@triton.jit
def lora_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, a_ptr, h_ptr, b_ptr, bias_ptr, out_ptr,
    M, P, Q, R,
    stride_xm, stride_xq, stride_wn, stride_wk, stride_sn, stride_sg,
    stride_ar, stride_aq, stride_hm, stride_hr, stride_bp, stride_br, stride_om, stride_op, stride_os,
    alpha, scale, group, q_chunk,
    QUANT: tl.constexpr, TRANS_W: tl.constexpr, LORA: tl.constexpr, SHRINK_IN_LOOP: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    # split-Q: program (.., .., s) reduces Q range [s * q_chunk, (s + 1) * q_chunk) into out slice s
    q_lo = tl.program_id(2) * q_chunk
    q_hi = tl.minimum(Q, q_lo + q_chunk)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_p = offs_p < P
    mask_r = offs_r < R
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for q0 in range(q_lo, q_hi, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < q_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_q[None, :] * stride_xq,
                    mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        w_mask = mask_q[:, None] & mask_p[None, :]
        if TRANS_W:  # tile[q, p] = W[n = q, k = p]
            w = _load_weight(w_ptr, s_ptr, z_ptr, code_ptr, offs_q[:, None], offs_p[None, :], w_mask,
                             stride_wn, stride_wk, stride_sn, stride_sg, group, QUANT)
        else:  # tile[q, p] = W[n = p, k = q]
            w = _load_weight(w_ptr, s_ptr, z_ptr, code_ptr, offs_p[None, :], offs_q[:, None], w_mask,
                             stride_wn, stride_wk, stride_sn, stride_sg, group, QUANT)
        acc = tl.dot(x, w.to(dot_dtype), acc, input_precision=PRECISION)
        if LORA and SHRINK_IN_LOOP:
            a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_q[:, None] * stride_aq,
                        mask=mask_q[:, None] & mask_r[None, :], other=0.0)
            h = tl.dot(x, a.to(dot_dtype), h, input_precision=PRECISION)
    acc = acc * alpha
    if LORA:
        if not SHRINK_IN_LOOP:
            h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_p[None, :] * stride_bp + offs_r[:, None] * stride_br,
                    mask=mask_r[:, None] & mask_p[None, :], other=0.0)
        # H is rounded to the activation dtype, as the unfused x @ A^T would be.
        acc += scale * tl.dot(h.to(dot_dtype), b.to(dot_dtype), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tl.program_id(2) * stride_os + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_p[None, :])


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _gpu_configs() -> list:
    shapes = [(128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
              (16, 128, 128, 4, 4), (16, 64, 256, 3, 4), (32, 128, 128, 4, 4), (128, 256, 64, 3, 8)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_P": p, "BLOCK_Q": q}, num_stages=s, num_warps=w)
            for m, p, q, s, w in shapes]


INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32}


@functools.lru_cache(maxsize=1)
def _autotuned_kernel():
    keys = ["M", "P", "Q", "R", "QUANT", "TRANS_W", "LORA", "SHRINK_IN_LOOP"]
    return triton.autotune(_gpu_configs(), key=keys)(lora_matmul_kernel)


def _kernel_and_blocks() -> tuple:
    """A fixed config under the interpreter (autotune needs a GPU); autotuned otherwise."""
    if interpreting():
        return lora_matmul_kernel, dict(INTERPRETER_BLOCKS)
    return _autotuned_kernel(), {}


class Weight:
    """A base weight W[N, K] for the kernel: a float tensor, or a packed one in peftc.ir.weight_codec's layout.

    Packed: `tensor` holds the codes (int8 [N, K], or two 4-bit codes per byte [N, K_padded / 2]),
    `scales` f32 ([N] for int8, [N, groups] otherwise), `zero_points` uint8 [N, groups] for int4.
    """

    def __init__(self, tensor: torch.Tensor, fmt: str | None = None, scales: torch.Tensor | None = None,
                 group_size: int = 0, in_features: int | None = None, zero_points: torch.Tensor | None = None):
        self.tensor, self.fmt, self.scales, self.group_size = tensor, fmt, scales, group_size
        self.zero_points = zero_points
        self.out_features = tensor.shape[0]
        self.in_features = tensor.shape[1] if in_features is None else in_features

    @classmethod
    def packed(cls, qdata: list[torch.Tensor], fmt: str, out_features: int, in_features: int,
               group_size: int) -> "Weight":
        """From a quantized tensor list as peftc.ir.weight_codec.quantize returns it (and quantize_base stores it).
        Double-quantized scales are expanded first: [N, groups] floats, a small tensor next to W."""
        if fmt not in QUANT_CODE:
            raise ValueError(f"quantized weight format: expected one of {list(QUANT_CODE)}, got {fmt!r}")
        if fmt == "int8":
            return cls(qdata[0], fmt, qdata[1].float())
        groups = -(-in_features // group_size)
        zero_points, scale_data = (qdata[1], qdata[2:]) if fmt == "int4" else (None, qdata[1:])
        scales = weight_codec.group_scales(list(scale_data), out_features, groups).contiguous()
        return cls(qdata[0], fmt, scales, group_size, in_features, zero_points)

    def kernel_args(self) -> dict:
        t = self.tensor
        if self.fmt is None:
            return dict(w_ptr=t, s_ptr=t, z_ptr=t, code_ptr=t, stride_wn=t.stride(0), stride_wk=t.stride(1),
                        stride_sn=0, stride_sg=0, group=1, QUANT=0)
        s = self.scales
        if self.zero_points is not None and self.zero_points.stride() != s.stride():
            raise ValueError("int4 zero points and scales must share a layout ([N, groups], same strides)")
        code = weight_codec.nf4_code(t.device) if self.fmt == "nf4" else s
        stride_sg = s.stride(1) if s.dim() == 2 else 0
        return dict(w_ptr=t, s_ptr=s, z_ptr=self.zero_points if self.zero_points is not None else s, code_ptr=code,
                    stride_wn=t.stride(0), stride_wk=t.stride(1), stride_sn=s.stride(0), stride_sg=stride_sg,
                    group=max(1, self.group_size), QUANT=QUANT_CODE[self.fmt])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp16/bf16 ignore it; fp32 stays exact


def launch(x2: torch.Tensor, weight: Weight, out: torch.Tensor, *, trans_w: bool = False, alpha: float = 1.0,
           a: torch.Tensor | None = None, h: torch.Tensor | None = None, b: torch.Tensor | None = None,
           scale: float = 0.0, bias: torch.Tensor | None = None, split: int = 1) -> torch.Tensor:
    """out[M, P] = alpha * x2 @ op(W) + scale * H @ b_view^T (+ bias), H = x2 @ a_view^T or given.

    `a` is read as A[r, q] (A.stride(0) along r), `b` as B[p, r]; pass transposed views for
    the backward's other orientations. `split` > 1 cuts the reduction over Q into that many
    programs writing fp32 partials, summed after (the adapter gradients reduce over all tokens
    into a small [r, K] / [N, r] output, which alone would leave most of a GPU idle). Returns `out`.
    """
    m, q = x2.shape
    if split > 1:
        if b is not None or bias is not None:
            raise ValueError("launch: split > 1 is for plain matmuls (no LoRA term, no bias)")
        partial = out.new_empty(split, *out.shape, dtype=torch.float32)
        return out.copy_(_launch(x2, weight, partial, trans_w, alpha, None, None, None, 0.0, None, split).sum(0))
    return _launch(x2, weight, out, trans_w, alpha, a, h, b, scale, bias, 1)


def _launch(x2, weight, out, trans_w, alpha, a, h, b, scale, bias, split):
    m, q = x2.shape
    p = out.shape[-1]
    q_chunk = triton.cdiv(q, split)
    lora = b is not None
    rank = b.shape[1] if lora else 1
    dummy = x2
    a_t, h_t, b_t = (a if a is not None else dummy), (h if h is not None else dummy), (b if lora else dummy)
    kernel, blocks = _kernel_and_blocks()
    block_r = max(16, triton.next_power_of_2(rank))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(p, meta["BLOCK_P"]), split)  # noqa: E731
    kernel[grid](
        x_ptr=x2, a_ptr=a_t, h_ptr=h_t, b_ptr=b_t, bias_ptr=bias if bias is not None else dummy, out_ptr=out,
        M=m, P=p, Q=q, R=rank, stride_xm=x2.stride(0), stride_xq=x2.stride(1),
        stride_ar=a_t.stride(0), stride_aq=a_t.stride(1) if a_t.dim() > 1 else 0,
        stride_hm=h_t.stride(0), stride_hr=h_t.stride(1) if h_t.dim() > 1 else 0,
        stride_bp=b_t.stride(0), stride_br=b_t.stride(1) if b_t.dim() > 1 else 0,
        stride_om=out.stride(-2), stride_op=out.stride(-1), stride_os=out.stride(0) if split > 1 else 0,
        alpha=alpha, scale=scale, q_chunk=q_chunk,
        TRANS_W=trans_w, LORA=lora, SHRINK_IN_LOOP=lora and h is None, HAS_BIAS=bias is not None,
        PRECISION=_precision(x2.dtype), BLOCK_R=block_r, **weight.kernel_args(), **blocks)
    return out
