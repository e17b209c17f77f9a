"""Mixed PEFT types in one batch (PetS): one served model vs one model per type, each on its rows.

    python benchmarks/serving_mixed.py [--repeats 7] [--prefill 32]

A LLaMA-style model (hidden 512, 4 layers, fp32) with four adapters of different methods:
LoRA r16 on q,k,v,o,gate,up,down; DoRA r8 on q,v,o; VeRA r64 on q,v,up; IA3 on k,v,down
(down as feedforward). A batch of 4 types x 4 rows runs as
  mixed      one forward of `serve_adapters(model, {...})` over all 16 rows (each its adapter)
  separate   four forwards, each type's 4 rows through that type's own `peftc.compile` model
for prefill (16 x S tokens) and decode (16 x 1 token, no KV cache). Contenders alternate round
by round; medians. The issue's goal: mixed <= 0.75x separate.
"""

from __future__ import annotations

import argparse

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
    args = p.parse_args()
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
        t = alternate({"mixed": mixed, "separate": separate}, args.repeats)
        print(f"| {phase} {tuple(ids.shape)} | {1e3 * t['mixed']:.1f} | {1e3 * t['separate']:.1f} | "
              f"**{t['mixed'] / t['separate']:.3f}** | {diff:.1e} |")


if __name__ == "__main__":
    main()
