"""Mixed PEFT types in one batch (PetS): one served model vs one model per type, each on its rows.

    python benchmarks/serving_mixed.py [--repeats 7] [--prefill 32]

A LLaMA-style model (hidden 512, 4 layers, fp32) with four adapters of different methods:
LoRA r16 on q,k,v,o,gate,up,down; DoRA r8 on q,v,o; VeRA r64 on q,v,up; IA3 on k,v,down
(down as feedforward). A batch of 4 types x 4 rows runs as
  mixed      one forward of `serve_adapters(model, {...})` over all 16 rows (each its adapter)
  separate   four forwards, each type's 4 rows through that type's own `peftc.compile` model
for prefill (16 x S tokens), decode without a KV cache (16 x 1 token, no past), and decode with the
KV cache (`use_cache=True`, then `past_key_values=`: the serving phase S-LoRA and Punica measure):
after a cached prefill of S tokens, D greedy-free steps of one token per row (the same next tokens for
both contenders), timed per step. Contenders alternate round by round; medians. `--clock cpu` counts
this process's CPU time (less noisy on a shared machine). The issue's goal: mixed <= 0.75x separate.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from common import alternate, llama_config, machine

import peftc

SPECS = {
    "lora": {"method": "lora", "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], "r": 16, "alpha": 32},
    "dora": {"method": "dora", "targets": ["q_proj", "v_proj", "o_proj"], "r": 8, "alpha": 16},
    "vera": {"method": "vera", "targets": ["q_proj", "v_proj", "up_proj"], "r": 64},
    "ia3": {"method": "ia3", "targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]},
}
ROWS_PER_TYPE = 4


def build():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


def randomize(cm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in cm.adapter_state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.05 + (1.0 if tensor.dim() == 1 else 0.0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--prefill", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="decode steps with the KV cache per round")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    vocab = llama_config().vocab_size
    batch = ROWS_PER_TYPE * len(SPECS)
    g = torch.Generator().manual_seed(0)
    inputs = {"prefill": torch.randint(0, vocab, (batch, args.prefill), generator=g),
              "decode": torch.randint(0, vocab, (batch, 1), generator=g)}
    cms = {}
    for seed, (name, entry) in enumerate(SPECS.items()):
        cms[name] = peftc.compile(build(), {"adapters": [entry]}, example_kwargs={"input_ids": inputs["prefill"]})
        randomize(cms[name], seed)
        cms[name].eval()
    mm = peftc.serve_adapters(build(), cms, example_kwargs={"input_ids": inputs["prefill"]})
    rows = [name for name in SPECS for _ in range(ROWS_PER_TYPE)]
    picked = {name: [i for i, r in enumerate(rows) if r == name] for name in SPECS}
    print(f"machine: {machine()}; {mm}\n")
    print("| phase | mixed ms | separate ms | mixed / separate | max abs diff |")
    print("|---|---|---|---|---|")
    for phase, ids in inputs.items():
        def mixed(ids=ids):
            with torch.no_grad():
                return mm(input_ids=ids, adapter_ids=rows).logits

        def separate(ids=ids):
            with torch.no_grad():
                return {name: cm(input_ids=ids[picked[name]]).logits for name, cm in cms.items()}

        got, want = mixed(), separate()
        diff = max((got[picked[n]] - want[n]).abs().max().item() for n in SPECS)
        t = alternate({"mixed": mixed, "separate": separate}, args.repeats, clock=clock)
        print(f"| {phase} {tuple(ids.shape)} | {1e3 * t['mixed']:.1f} | {1e3 * t['separate']:.1f} | "
              f"**{t['mixed'] / t['separate']:.3f}** | {diff:.1e} |")
    cached_decode(mm, cms, rows, picked, inputs["prefill"], args, clock)


def cached_decode(mm, cms, rows, picked, prompt, args, clock) -> None:
    """Decode with the KV cache: each contender prefills once with use_cache=True; every round starts
    from a copy of that cache and times `args.steps` one-token steps (ms per step, median over rounds)."""
    vocab = llama_config().vocab_size
    tokens = torch.randint(0, vocab, (prompt.shape[0], args.steps), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed_cache = mm(input_ids=prompt, adapter_ids=rows, use_cache=True).past_key_values
        own_caches = {name: cm(input_ids=prompt[picked[name]], use_cache=True).past_key_values
                      for name, cm in cms.items()}

    def mixed():
        cache = copy.deepcopy(mixed_cache)
        start, logits = clock(), []
        for step in range(args.steps):
            out = mm(input_ids=tokens[:, step:step + 1], adapter_ids=rows, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        return clock() - start, torch.cat(logits, 1)

    def separate():
        caches = {name: copy.deepcopy(cache) for name, cache in own_caches.items()}
        start, logits = clock(), {name: [] for name in cms}
        for step in range(args.steps):
            for name, cm in cms.items():
                out = cm(input_ids=tokens[picked[name], step:step + 1], past_key_values=caches[name],
                         use_cache=True)
                logits[name].append(out.logits)
        return clock() - start, {name: torch.cat(parts, 1) for name, parts in logits.items()}

    with torch.no_grad():
        _, got = mixed()
        _, want = separate()
        diff = max((got[picked[n]] - want[n]).abs().max().item() for n in cms)
        times = {"mixed": [], "separate": []}
        for _ in range(args.repeats):
            for name, fn in (("mixed", mixed), ("separate", separate)):
                times[name].append(fn()[0] / args.steps)
    t = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"| decode with KV cache {prompt.shape[0]} x 1 after {prompt.shape[1]} ({args.steps} steps) | "
          f"{1e3 * t['mixed']:.2f} | {1e3 * t['separate']:.2f} | **{t['mixed'] / t['separate']:.3f}** | {diff:.1e} |")


if __name__ == "__main__":
    main()
