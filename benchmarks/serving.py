"""Multi-adapter serving: peftc.serve_adapters vs HF PEFT's mixed-adapter batches, 16 LoRA adapters.

    python benchmarks/serving.py [--repeats 7] [--device cpu|cuda] [--quick]

A LLaMA-style model with 16 LoRA adapters (ranks 8 and 16 alternating, alphas differ) on
q, k, v, o, gate, up, down, saved as PEFT folders and served by both tools in this process:
  decode   batch 16 x 1 token   (a one-token forward without KV cache: the BGMV path)
  prefill  batch 16 x S tokens  (the SGMV path; S = 64 on CPU, 512 on CUDA)
each with 16 distinct adapters (one per row) and with a single adapter for the whole batch.
Contenders alternate round by round; medians; ratios < 1 mean peftc is faster.

CPU (default without a GPU): hidden 512 / 4 layers, fp32, the ops' torch implementation.
CUDA: LLaMA-7B layer shapes (hidden 4096, intermediate 11008) x 4 layers, fp16, Triton
kernels; reports the issue's goal "16 distinct adapters in one decode batch within 1.25x of
a single-adapter batch".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import llama_config, machine

import peftc

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = 16
BATCH = 16


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats, shorter prefill")
    return p.parse_args()


def config(device: str):
    if device == "cuda":
        return llama_config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
    return llama_config()


def build(device: str, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 7B-layer-shaped model is slow to init on CPU
        return LlamaForCausalLM(config(device)).to(dtype=dtype).eval()


def names() -> list[str]:
    return [f"task{i:02d}" for i in range(ADAPTERS)]


def peft_adapters(device: str, dtype: torch.dtype, folder: Path):
    """The PEFT model holding all 16 adapters (random non-zero weights), saved to `folder`/<name>."""
    from peft import LoraConfig, get_peft_model

    cfgs = [LoraConfig(r=8 if i % 2 else 16, lora_alpha=16 + i, target_modules=TARGETS) for i in range(ADAPTERS)]
    pm = get_peft_model(build(device, dtype), cfgs[0], adapter_name=names()[0])
    for name, cfg in zip(names()[1:], cfgs[1:]):
        pm.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in pm.named_parameters():
            if "lora_" in key:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    pm.eval()
    pm.save_pretrained(folder)
    return pm


def timer(device: str):
    def run(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    return run


def alternate(contenders: dict, repeats: int, device: str) -> dict[str, float]:
    import statistics

    clock = timer(device)
    for fn in contenders.values():  # warm-up (Triton compiles, allocator)
        fn(), fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(clock(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def contenders(pm, mm, base, ids):
    distinct = names()
    single = [distinct[0]] * BATCH

    def run(fn):
        def go():
            with torch.no_grad():
                fn()
        return go

    return {
        "base model": run(lambda: base(input_ids=ids, use_cache=False)),
        "peft, 16 adapters": run(lambda: pm(input_ids=ids, use_cache=False, adapter_names=distinct)),
        "peftc, 16 adapters": run(lambda: mm(input_ids=ids, adapter_ids=distinct)),
        "peft, 1 adapter": run(lambda: pm(input_ids=ids, use_cache=False, adapter_names=single)),
        "peftc, 1 adapter": run(lambda: mm(input_ids=ids, adapter_ids=single)),
    }


def check(pm, mm, ids) -> float:
    with torch.no_grad():
        want = pm(input_ids=ids, use_cache=False, adapter_names=names()).logits.float()
        got = mm(input_ids=ids, adapter_ids=names()).logits.float()
    return ((got - want).abs().max() / want.abs().max()).item()


def main() -> None:
    args = parse()
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    repeats = 3 if args.quick else args.repeats
    prefill = (32 if args.quick else 64) if device == "cpu" else 512
    vocab = config(device).vocab_size
    g = torch.Generator().manual_seed(0)
    shapes = {"decode": (BATCH, 1), "prefill": (BATCH, prefill)}
    inputs = {k: torch.randint(0, vocab, s, generator=g).to(device) for k, s in shapes.items()}
    with tempfile.TemporaryDirectory() as tmp:
        pm = peft_adapters(device, dtype, Path(tmp))
        base = build(device, dtype)
        start = time.perf_counter()
        mm = peftc.serve_adapters(build(device, dtype), {n: Path(tmp) / n for n in names()},
                                  example_kwargs={"input_ids": inputs["prefill"]})
        serve_s = time.perf_counter() - start
    print(f"machine: {machine()}, device {device}, {dtype}; {mm}; serve_adapters took {serve_s:.1f} s\n")
    for phase, ids in inputs.items():
        err = check(pm, mm, ids)
        t = alternate(contenders(pm, mm, base, ids), repeats, device)
        print(f"### {phase}: batch {tuple(ids.shape)}, max |peftc - peft| / max |peft| = {err:.1e}\n")
        print("| contender | ms (median) |")
        print("|---|---|")
        for name, seconds in t.items():
            print(f"| {name} | {1e3 * seconds:.2f} |")
        print()
        print(f"- peftc / peft, 16 adapters: **{t['peftc, 16 adapters'] / t['peft, 16 adapters']:.3f}**")
        print(f"- peftc / peft, 1 adapter: {t['peftc, 1 adapter'] / t['peft, 1 adapter']:.3f}")
        goal = " (goal <= 1.25 in decode)" if phase == "decode" else ""
        print(f"- peftc 16 adapters / peftc 1 adapter: **{t['peftc, 16 adapters'] / t['peftc, 1 adapter']:.3f}**{goal}")
        print(f"- peft 16 adapters / peft 1 adapter: {t['peft, 16 adapters'] / t['peft, 1 adapter']:.3f}")
        print(f"- peftc 16 adapters / base: {t['peftc, 16 adapters'] / t['base model']:.3f}\n")


if __name__ == "__main__":
    main()
