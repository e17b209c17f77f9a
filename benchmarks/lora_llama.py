"""peftc vs HF PEFT: LoRA training step and eval forward on a LLaMA-style model (CPU, fp32).

    python benchmarks/lora_llama.py [--repeats 7] [--skip-meta]

LoRA r=16, alpha=32 on q,k,v,o,gate,up,down; hidden 512, intermediate 1376, 4 layers,
8 heads, vocab 4000, batch 4, sequence 128. Both tools run in this process, alternated;
medians; ratios < 1 mean peftc is faster. Also times peftc.compile of a LLaMA-7B-shaped
config built on the meta device.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import alternate, llama_config, machine

import peftc

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32


def lora_spec() -> dict:
    """The peftc spec of this LoRA: r=16, alpha=32 on the 7 projections (a fresh dict each call)."""
    return {"adapters": [{"method": "lora", "targets": TARGETS, "r": R, "alpha": ALPHA}]}


def peft_lora(model):
    """HF PEFT's model of the same LoRA, over a copy of `model` (which is left as it is)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))


def training_step(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def forward(model, ids):
    def run():
        with torch.no_grad():
            model(input_ids=ids)

    return run


def build(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config()).eval()


def compare(repeats: int) -> dict:
    ids = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))
    full = build()
    hf = peft_lora(full)
    ours = peftc.compile(copy.deepcopy(full), lora_spec())
    hf.train(), ours.train(), full.train()
    train = alternate({"full": training_step(full, ids), "peft": training_step(hf, ids),
                       "peftc": training_step(ours, ids)}, repeats)
    hf.eval(), ours.eval(), full.eval()
    hf_merged = copy.deepcopy(hf).merge_and_unload()
    merged = ours.merged()
    evals = alternate({"base": forward(full, ids), "peft": forward(hf, ids), "peftc": forward(ours, ids),
                       "peft_merged": forward(hf_merged, ids), "peftc_merged": forward(merged, ids)}, repeats)
    return {"train": train, "eval": evals}


def compile_7b_on_meta() -> float:
    from transformers import LlamaForCausalLM

    cfg = llama_config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    start = time.perf_counter()
    cm = peftc.compile(model, lora_spec())
    seconds = time.perf_counter() - start
    assert len(cm.report().sites) == 32 * 7
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-meta", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if not args.skip_meta:
        print(f"compile LLaMA-7B shape on meta (LoRA on 7 projections x 32 layers): {compile_7b_on_meta():.2f} s")
    r = compare(args.repeats)
    t, e = r["train"], r["eval"]
    print(f"train step ms: full {1e3 * t['full']:.1f}  peft {1e3 * t['peft']:.1f}  peftc {1e3 * t['peftc']:.1f}")
    print(f"  peft/full {t['peft'] / t['full']:.3f}   peftc/peft {t['peftc'] / t['peft']:.3f}")
    print("eval forward ms: " + "  ".join(f"{k} {1e3 * v:.1f}" for k, v in e.items()))
    print(f"  peft/base {e['peft'] / e['base']:.3f}   peftc/peft {e['peftc'] / e['peft']:.3f}   "
          f"peft_merged/base {e['peft_merged'] / e['base']:.3f}   peftc_merged/base {e['peftc_merged'] / e['base']:.3f}")


if __name__ == "__main__":
    main()
