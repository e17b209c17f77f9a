"""Benchmark the Triton LoRA kernels against torch: the base matmul alone and unfused LoRA.

GPU mode (default when CUDA is available):
    python benchmarks/kernels.py [--dtype fp16|bf16] [--quick] [--check]
  LLaMA-7B projections (K x N = 4096x4096, 4096x11008, 11008x4096), tokens 1..8192, r 8..64:
  time (triton.testing.do_bench, median) and TFLOP/s of the base matmul, unfused LoRA (3 torch
  matmuls + add) and the fused kernel (auto, one-launch, shrink-then-fused-expand); the fused
  backward vs torch autograd; nf4/int4 dequant + LoRA vs torch dequant + matmul; 16 distinct
  adapters in one BGMV decode batch vs one adapter. Goals (issue 6): fused <= 1.08x base at
  r=16, >= 1024 tokens; BGMV with 16 adapters <= 1.25x one adapter. --check first compares every
  kernel with the torch reference on the GPU, bf16 included.

CPU smoke mode (--smoke, or no CUDA): TRITON_INTERPRET=1, tiny shapes, each kernel once against
the reference. Interpreter times say nothing about GPU speed; the mode keeps the script correct.

Compile-only mode (--compile-only, no GPU needed): compiles each kernel variant ahead of time for
sm_90 (H100/H200) through the real Triton pipeline down to PTX/cubin, catching what the
interpreter does not check (types, layouts, shared memory), and prints shared memory and spills.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU interpreter smoke run (tiny shapes)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--quick", action="store_true", help="GPU: fewer token counts and ranks")
    p.add_argument("--check", action="store_true", help="GPU: check every kernel against torch first")
    p.add_argument("--compile-only", action="store_true", help="compile every kernel variant for sm_90, no GPU")
    return p.parse_args()


def main() -> None:
    args = parse()
    import torch  # noqa: F401  (after argparse: --help stays fast)

    smoke = args.smoke or not torch.cuda.is_available()
    if args.compile_only:
        compile_only()
    elif smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
        run_smoke()
    else:
        run_gpu(args)


# -- shared -------------------------------------------------------------------------------------

def make(m, k, n, r, dtype, device, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g, device=device) * std).to(dtype)  # noqa: E731
    return rnd(m, k), rnd(n, k, std=k ** -0.5), rnd(r, k, std=k ** -0.5), rnd(n, r, std=r ** -0.5)


def flops(m, k, n, r=0) -> float:
    return 2.0 * m * k * n + 2.0 * m * r * (k + n)


def cases(smoke: bool):
    """(name, run, reference) triples for every kernel at one small shape (used by --smoke and --check)."""
    import torch
    from peftc.codegen.triton import fused, multi_ops, reference
    from peftc.codegen.triton.kernels import Weight

    from peftc.ir import weight_codec

    def build(dtype, device):
        m, k, n, r = (13, 40, 24, 8) if smoke else (100, 256, 320, 16)
        x, w, a, b = make(m, k, n, r, dtype, device)
        dy = torch.randn(m, n, device=device).to(dtype)
        f32 = lambda *t: [v.float() for v in t]  # noqa: E731
        qdata = weight_codec.quantize(w.float(), "nf4", 16)
        dense = weight_codec.dequantize(qdata, "nf4", n, k, 16)
        q4 = weight_codec.quantize(w.float(), "int4", 16, double_quant=True)  # zero points, double-quantized scales
        banks = (torch.randn(4, r, k, device=device) * k ** -0.5).to(dtype), \
            (torch.randn(4, n, r, device=device) * r ** -0.5).to(dtype)
        scales = torch.tensor([0.5, 1.0, 1.5, 2.0], device=device)
        idx = torch.tensor([i % 5 - 1 for i in range(m)], device=device)
        starts, adapters = torch.tensor([0, m // 3, m], device=device), torch.tensor([2, -1], device=device)
        return [
            ("fused forward (one launch)", lambda: fused.lora_linear_forward(x, Weight(w), None, a, b, 2.0,
                                                                              shrink_first=False),
             lambda: reference.lora_linear(*f32(x, w), None, *f32(a, b), 2.0)),
            ("fused forward (shrink + fused expand)", lambda: fused.lora_linear_forward(
                x, Weight(w), None, a, b, 2.0, shrink_first=True),
             lambda: reference.lora_linear(*f32(x, w), None, *f32(a, b), 2.0)),
            ("fused backward dx,dA,dB", lambda: torch.cat([t.flatten() for t in fused.lora_linear_backward(
                dy, x, Weight(w), a, b, 2.0) if t is not None]),
             lambda: torch.cat([t.flatten() for t in reference.lora_linear_backward(
                 *f32(dy, x, w, a, b), 2.0) if t is not None])),
            ("nf4 dequant + LoRA forward", lambda: fused.lora_linear_forward(
                x, Weight.packed(qdata, "nf4", n, k, 16), None, a, b, 2.0),
             lambda: reference.lora_linear(x.float(), dense, None, *f32(a, b), 2.0)),
            ("int4 dequant + LoRA forward", lambda: fused.lora_linear_forward(
                x, Weight.packed(q4, "int4", n, k, 16), None, a, b, 2.0),
             lambda: reference.lora_linear(x.float(), weight_codec.dequantize(q4, "int4", n, k, 16), None, *f32(a, b), 2.0)),
            ("BGMV (4 adapters, -1 rows)", lambda: multi_ops.lora_bgmv_triton(x, w, None, *banks, scales, idx),
             lambda: reference.lora_bgmv(*f32(x, w), None, *f32(*banks), scales, idx)),
            ("SGMV (2 segments)", lambda: multi_ops.lora_sgmv_triton(x, w, None, *banks, scales, starts, adapters),
             lambda: reference.lora_sgmv(*f32(x, w), None, *f32(*banks), scales, starts, adapters)),
            ("BGMV backward dx,dA,dB", lambda: _flat(multi_ops.lora_bgmv_backward_triton(dy, x, w, *banks, scales, idx)),
             lambda: _flat(reference.lora_bgmv_backward(*f32(dy, x, w), *f32(*banks), scales, idx))),
            ("SGMV backward dx,dA,dB", lambda: _flat(multi_ops.lora_sgmv_backward_triton(
                dy, x, w, *banks, scales, starts, adapters)),
             lambda: _flat(reference.lora_sgmv_backward(*f32(dy, x, w), *f32(*banks), scales, starts, adapters))),
        ]
    return build


def _flat(tensors):
    import torch

    return torch.cat([t.flatten() for t in tensors])


def run_smoke() -> None:
    import torch
    import triton

    rows = []
    for dtype in (torch.float32, torch.float16):
        for name, run, ref in cases(smoke=True)(dtype, "cpu"):
            times = []
            for _ in range(3):
                start = time.perf_counter()
                out = run()
                times.append(time.perf_counter() - start)
            want = ref()
            err = ((out.float() - want).abs().max() / want.abs().max()).item()
            rows.append((name, str(dtype).replace("torch.", ""), f"{err:.2e}", f"{1000 * statistics.median(times):.0f}"))
    print(f"CPU smoke (TRITON_INTERPRET=1, triton {triton.__version__}, torch {torch.__version__}); "
          "shape M,K,N,r = 13,40,24,8; times are the interpreter's, not a GPU's\n")
    print("| kernel | dtype | max abs err / max abs ref | interpreter ms |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


# -- ahead-of-time compilation for a GPU target (no GPU needed) --------------------------------

MATMUL_FLAGS = ("QUANT", "TRANS_W", "LORA", "SHRINK_IN_LOOP", "HAS_BIAS", "PRECISION")
MATMUL_VARIANTS = [  # (dtype, QUANT, TRANS_W, LORA, SHRINK_IN_LOOP, HAS_BIAS, what)
    ("fp16", 0, 0, 1, 1, 1, "forward, one launch"),
    ("bf16", 0, 0, 1, 0, 0, "forward, expand fused after shrink"),
    ("fp32", 0, 1, 1, 0, 0, "dx = dy W + s u A"),
    ("fp16", 0, 0, 0, 0, 0, "shrink / dA / dB"),
    ("fp16", 1, 1, 1, 0, 0, "int8 dx"),
    ("bf16", 2, 0, 1, 1, 1, "int4 forward"),
    ("fp16", 3, 0, 1, 1, 1, "nf4 forward"),
    ("fp16", 3, 1, 0, 0, 0, "nf4 dx"),
]


def _signature(fn, pointer_types: dict, consts: dict, default_ptr: str) -> dict:
    out = {}
    for name in fn.arg_names:
        if name in consts:
            out[name] = "constexpr"
        elif name.endswith("_ptr"):
            out[name] = pointer_types.get(name, default_ptr)
        else:
            out[name] = "fp32" if name in ("alpha", "scale") else "i32"
    return out


def compile_only() -> None:
    import triton
    from peftc.codegen.triton import kernels, multi
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)

    def build(fn, consts, pointer_types, dtype, warps, stages=3):
        src = ASTSource(fn=fn, signature=_signature(fn, pointer_types, consts, "*" + dtype), constexprs=consts)
        k = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
        return k.metadata.shared

    print("| kernel | variant | dtype | blocks | shared bytes |")
    print("|---|---|---|---|---|")
    for dt, quant, trans, lora, shrink, bias, what in MATMUL_VARIANTS:
        consts = dict(zip(MATMUL_FLAGS, (quant, bool(trans), bool(lora), bool(shrink), bool(bias),
                                         "ieee" if dt == "fp32" else "tf32")),
                      BLOCK_M=128, BLOCK_P=128, BLOCK_Q=64, BLOCK_R=64)
        w_type = {0: "*" + dt, 1: "*i8", 2: "*u8", 3: "*u8"}[quant]
        shared = build(kernels.lora_matmul_kernel, consts,
                          {"w_ptr": w_type, "s_ptr": "*fp32", "z_ptr": "*u8", "code_ptr": "*fp32"}, dt, 8)
        print(f"| lora_matmul_kernel | {what} | {dt} | 128x128x64, r<=64 | {shared} |", flush=True)
    for fn, consts in ((multi.bgmv_shrink_kernel, dict(BLOCK_K=64, BLOCK_R=64)),
                       (multi.bgmv_expand_kernel, dict(BLOCK_N=64, BLOCK_R=64)),
                       (multi.sgmv_shrink_kernel, dict(BLOCK_M=16, BLOCK_K=32, BLOCK_R=64)),
                       (multi.sgmv_expand_kernel, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=64))):
        ints = {n: "*i32" for n in ("idx_ptr", "starts_ptr", "adapters_ptr")}
        shared = build(fn, consts, {**ints, "s_ptr": "*fp32"}, "fp16", 4)
        print(f"| {fn.__name__} | multi-adapter | fp16 | {consts} | {shared} |", flush=True)


# -- GPU ----------------------------------------------------------------------------------------

def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100) * 1e-3  # seconds (median)


def run_gpu(args) -> None:
    import torch
    import torch.nn.functional as F
    from peftc.codegen.triton import fused, multi_ops, reference
    from peftc.codegen.triton.kernels import Weight

    from peftc.ir import weight_codec

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    dev = "cuda"
    print(f"GPU: {torch.cuda.get_device_name()}  dtype {args.dtype}  torch {torch.__version__}")
    if args.check:
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for name, run, ref in cases(smoke=False)(dt, dev):
                out, want = run().float(), ref()
                err = ((out - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
                print(f"check {str(dt):15s} {name:40s} rel err {err:.2e} {'ok' if err < 2e-2 else 'FAIL'}")
    tokens = [1, 16, 1024, 8192] if args.quick else [1, 16, 128, 1024, 2048, 4096, 8192]
    ranks = [16] if args.quick else [8, 16, 32, 64]
    print("\n| K x N | tokens | r | base ms | unfused ms | fused ms | one-launch ms | shrink-first ms | "
          "fused/base | fused TFLOP/s | bwd torch ms | bwd fused ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
        for m in tokens:
            for r in ranks:
                x, w, a, b = make(m, k, n, r, dtype, dev)
                weight = Weight(w)
                t_base = bench(lambda: F.linear(x, w))
                t_unfused = bench(lambda: F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0)
                t_fused = bench(lambda: fused.lora_linear_forward(x, weight, None, a, b, 2.0))
                t_one = bench(lambda: fused.lora_linear_forward(x, weight, None, a, b, 2.0, shrink_first=False))
                t_two = bench(lambda: fused.lora_linear_forward(x, weight, None, a, b, 2.0, shrink_first=True))
                dy = torch.randn(m, n, device=dev, dtype=dtype)
                xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, b))
                yg = F.linear(xg, w) + F.linear(F.linear(xg, ag), bg) * 2.0
                t_bwd_torch = bench(lambda: torch.autograd.grad(yg, (xg, ag, bg), dy, retain_graph=True))
                t_bwd = bench(lambda: fused.lora_linear_backward(dy, x, weight, a, b, 2.0))
                print(f"| {k}x{n} | {m} | {r} | {1e3 * t_base:.3f} | {1e3 * t_unfused:.3f} | {1e3 * t_fused:.3f} | "
                      f"{1e3 * t_one:.3f} | {1e3 * t_two:.3f} | {t_fused / t_base:.3f} | "
                      f"{flops(m, k, n, r) / t_fused / 1e12:.1f} | {1e3 * t_bwd_torch:.3f} | {1e3 * t_bwd:.3f} |")
    print("\n| K x N | tokens | fmt | torch dequant+matmul+LoRA ms | fused dequant+LoRA ms |")
    print("|---|---|---|---|---|")
    for k, n in ((4096, 4096), (4096, 11008)):
        for m in (1, 16, 1024):
            x, w, a, b = make(m, k, n, 16, dtype, dev)
            for fmt in ("int8", "int4", "nf4"):
                qdata = weight_codec.quantize(w.float(), fmt, 64)
                t_torch = bench(lambda: reference.lora_linear(
                    x, weight_codec.dequantize(qdata, fmt, n, k, 64, dtype), None, a, b, 2.0))
                t_fused = bench(lambda: fused.lora_linear_forward(x, Weight.packed(qdata, fmt, n, k, 64), None, a, b,
                                                                  2.0))
                print(f"| {k}x{n} | {m} | {fmt} | {1e3 * t_torch:.3f} | {1e3 * t_fused:.3f} |")
    print("\n| K x N | decode batch | r | 1 adapter ms | 16 adapters ms | ratio | base ms |")
    print("|---|---|---|---|---|---|---|")
    for k, n in ((4096, 4096), (4096, 11008)):
        for m in (1, 8, 32, 64):
            for r in (8, 16, 64):
                x, w, _, _ = make(m, k, n, r, dtype, dev)
                a_bank = torch.randn(16, r, k, device=dev, dtype=dtype) * k ** -0.5
                b_bank = torch.randn(16, n, r, device=dev, dtype=dtype) * r ** -0.5
                scales = torch.ones(16, device=dev)
                one = torch.zeros(m, dtype=torch.long, device=dev)
                many = torch.arange(m, device=dev) % 16
                t_one = bench(lambda: multi_ops.lora_bgmv_triton(x, w, None, a_bank, b_bank, scales, one))
                t_many = bench(lambda: multi_ops.lora_bgmv_triton(x, w, None, a_bank, b_bank, scales, many))
                t_base = bench(lambda: F.linear(x, w))
                print(f"| {k}x{n} | {m} | {r} | {1e3 * t_one:.3f} | {1e3 * t_many:.3f} | {t_many / t_one:.3f} | "
                      f"{1e3 * t_base:.3f} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
