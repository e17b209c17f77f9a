"""generate() time per new token on T5: peftc (cached encoder-decoder graphs) vs HF PEFT's generate (its
cache) vs peftc's old uncached path (the compiled forward on the whole decoder prefix each step), CPU fp32.

    python benchmarks/seq2seq_generate.py [--repeats 5] [--new-tokens 32]

A T5 from config (random weights: d_model 256, 4 layers each side, 4 heads, vocab 4000), LoRA r 8 on
q and v of every attention (cross-attention included); a batch of 2 prompts of 24 tokens (one
right-padded by 4), greedy, eos off so every call makes all the tokens. The three run in this
process, alternated, medians; each one's first call (peftc captures its graphs there) is a warm-up
and not timed; it is reported apart.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

import peftc
from common import alternate, machine
from peftc.runtime.seq2seq_generate import generate_seq2seq


def build():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(d_model=256, d_ff=512, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64,
                   vocab_size=4000, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def lora_pair(model):
    """(peftc's compiled model, PEFT's model with the same non-zero LoRA weights, compile seconds), both in eval."""
    from peft import PeftModel

    start = time.perf_counter()
    ours = peftc.compile(copy.deepcopy(model), {"adapters": [{"method": "lora", "targets": ["q", "v"], "r": 8,
                                                              "alpha": 16}]}).eval()
    compile_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so both sides compute them
        for tensor in ours.adapter_state_dict().values():
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
    with tempfile.TemporaryDirectory() as folder:
        ours.save_adapter(folder, format="peft")
        hf = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    return ours, hf, compile_s


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): 2 prompts of 24 tokens, the second right-padded by 4."""
    ids = torch.randint(2, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, -4:], mask[1, -4:] = 0, 0
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    ours, hf, compile_s = lora_pair(build())
    ids, mask = padded_prompts()
    n = args.new_tokens
    options = {"attention_mask": mask, "max_new_tokens": n, "do_sample": False, "eos_token_id": None}
    start = time.perf_counter()
    first = ours.generate(ids, **options)
    first_s = time.perf_counter() - start
    with torch.no_grad():
        reference = hf.generate(input_ids=ids, **options)
    old = generate_seq2seq(None, ours, ours.compilation.source, ids, **options)
    print(f"compile {compile_s:.2f} s; first generate (captures the encoder and 2 step graphs) {first_s:.2f} s; "
          f"tokens equal PEFT: {torch.equal(first, reference)}, equal the uncached path: {torch.equal(first, old)}")

    def run_peft():
        with torch.no_grad():
            hf.generate(input_ids=ids, **options)

    contenders = {"peft": run_peft, "peftc": lambda: ours.generate(ids, **options),
                  "uncached": lambda: generate_seq2seq(None, ours, ours.compilation.source, ids, **options)}
    for clock_name, clock in (("wall", time.perf_counter), ("process CPU", time.process_time)):
        times = alternate(contenders, args.repeats, warmup=1, clock=clock)
        ms = {k: 1e3 * v / n for k, v in times.items()}
        print(f"ms per new token ({clock_name}, {n} tokens, batch 2): peft {ms['peft']:.2f}  peftc {ms['peftc']:.2f}  "
              f"uncached {ms['uncached']:.2f}   peftc/peft {ms['peftc'] / ms['peft']:.3f}  "
              f"uncached/peftc {ms['uncached'] / ms['peftc']:.2f}")


if __name__ == "__main__":
    main()
