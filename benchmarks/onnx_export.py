"""ONNX export benchmark: file size, accuracy and ONNX Runtime latency of fp32 / int8 / int4 exports.

A LLaMA-style model (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4000) is first
trained briefly on a deterministic next-token task (next = perm[current] over a 256-token
alphabet), so its next-token argmax means something; then it is compiled with LoRA on the
attention projections (non-zero adapters), exported merged in fp32, and quantized.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_export.py [--steps 150] [--out DIR]

Reports sizes relative to fp32, logits cosine and argmax agreement with the fp32 export on
held-out sequences, and median latency of ORT (CPU, 1 thread) vs torch eager on the same input.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peftc.codegen.onnx import quantize_onnx

import peftc

ALPHABET = 256
SEQ = 16


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=4000, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def task_batch(perm: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences that follow next = perm[current] from a random start token."""
    tokens = torch.empty(batch, SEQ + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, ALPHABET, (batch,), generator=generator)
    for t in range(SEQ):
        tokens[:, t + 1] = perm[tokens[:, t]]
    return tokens


def train(model, perm, steps: int) -> float:
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    acc = 0.0
    for step in range(steps):
        tokens = task_batch(perm, 8, g)
        out = model(input_ids=tokens[:, :-1], use_cache=False)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = (logits.argmax(-1) == tokens[:, 1:]).float().mean().item()
        if step % 25 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} acc {acc:.3f}", flush=True)
    model.eval()
    return acc


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="peftc-onnx-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    model = build_model()
    perm = torch.randperm(ALPHABET, generator=torch.Generator().manual_seed(2))
    print(f"training {args.steps} steps on next = perm[current] ...", flush=True)
    t = time.time()
    train_acc = train(model, perm, args.steps)
    print(f"  trained in {time.time() - t:.0f}s, last-batch accuracy {train_acc:.3f}")

    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 8}]})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in cm.adapter_state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.02)
    cm.eval()

    t = time.time()
    fp32 = peftc.export_onnx(cm, out_dir / "model.onnx")
    print(f"fp32 export {time.time() - t:.0f}s")
    files = {"fp32": fp32}
    for q in ("int8", "int4"):
        t = time.time()
        files[q] = quantize_onnx(fp32, out_dir / f"model.{q}.onnx", q)
        print(f"{q} quantization {time.time() - t:.1f}s")

    tokens = task_batch(perm, 64, torch.Generator().manual_seed(4))[:, :-1]
    feed = {"input_ids": tokens.numpy(), "attention_mask": np.ones_like(tokens.numpy())}
    with torch.no_grad():
        torch_logits = cm(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits.numpy()
    sessions = {name: session(path) for name, path in files.items()}
    logits = {name: s.run(None, feed)[0] for name, s in sessions.items()}
    truth = task_batch(perm, 64, torch.Generator().manual_seed(4))[:, 1:].numpy()

    one = {"input_ids": tokens[:1].numpy(), "attention_mask": np.ones_like(tokens[:1].numpy())}
    one_t = {k: torch.from_numpy(v) for k, v in one.items()}
    latency = {}
    with torch.no_grad():
        for _ in range(2):  # alternate, so drift in machine load hits all alike
            latency.setdefault("torch eager (HF model)", []).append(
                median_ms(lambda: model(**one_t, use_cache=False), args.runs))
            for name, s in sessions.items():
                latency.setdefault(f"ORT {name}", []).append(median_ms(lambda s=s: s.run(None, one), args.runs))

    base = os.path.getsize(files["fp32"])
    print(f"\nfp32 vs torch (cm.eval()): max abs {np.abs(logits['fp32'] - torch_logits).max():.2e}")
    print("\n| export | size (MB) | size vs fp32 | logits cosine vs fp32 | argmax agreement vs fp32 | task accuracy |")
    print("|---|---|---|---|---|---|")
    for name, path in files.items():
        size = os.path.getsize(path)
        agree = (logits[name].argmax(-1) == logits["fp32"].argmax(-1)).mean()
        acc = (logits[name].argmax(-1) == truth).mean()
        print(f"| {name} | {size / 1e6:.1f} | {size / base:.3f} | {cosine(logits[name], logits['fp32']):.6f} | "
              f"{agree:.4f} | {acc:.4f} |")
    print(f"\nlatency, batch 1 x {SEQ} tokens, 1 thread, median of {args.runs} runs (x2 alternated):")
    eager = min(latency["torch eager (HF model)"])
    print("| runtime | ms | vs torch eager |\n|---|---|---|")
    for name, values in latency.items():
        print(f"| {name} | {min(values):.2f} | {min(values) / eager:.2f}x |")
    print(f"\nfiles in {out_dir}")


if __name__ == "__main__":
    main()
