"""A manual decoding loop of forward calls with a cache on T5: peftc (EncoderDecoderCache from captured graphs)
vs HF PEFT's forward (its cache) vs peftc without a cache (the whole decoder prefix each call), CPU fp32.

    python benchmarks/seq2seq_forward_cache.py [--repeats 3] [--steps 16]

The T5 of benchmarks/seq2seq_generate.py (random weights: d_model 256, 4 layers each side, vocab 4000), LoRA
r 8 on q and v of every attention; a batch of 2 prompts of 24 tokens (one right-padded by 4). A loop: a
use_cache=True call on the prompt and 4 decoder tokens (it returns the cache, as the original's does), then `steps`
one-token calls passing `encoder_outputs=` and the cache back. Reported apart: the compile, and the
first use_cache=True call and first continued call (each captures its graph: the cost of this design). Then the loop,
the three alternated, medians, and whether the last logits equal PEFT's.
"""

from __future__ import annotations

import argparse
import time

import torch
from seq2seq_generate import build, lora_pair, padded_prompts

from common import alternate, machine


def decode(model, ids, mask, start, steps: int, cached: bool = True) -> torch.Tensor:
    """The loop's last logits: a call on the prompt, then `steps` one-token calls (cached, or on the whole prefix)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start, use_cache=cached)
        sequence = start
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            sequence = torch.cat([sequence, token], 1)
            if cached:
                out = model(encoder_outputs=(out.encoder_last_hidden_state,), attention_mask=mask,
                            decoder_input_ids=token, past_key_values=out.past_key_values)
            else:
                out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=sequence, use_cache=False)
        return out.logits[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    ours, hf, compile_s = lora_pair(build())
    ids, mask = padded_prompts()
    prefix = torch.randint(2, 4000, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        start = time.perf_counter()
        out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=prefix, use_cache=True)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        ours(encoder_outputs=(out.encoder_last_hidden_state,), attention_mask=mask, decoder_input_ids=prefix[:, :1],
             past_key_values=out.past_key_values)
        step_s = time.perf_counter() - start
    n = args.steps
    last = {"peft": decode(hf, ids, mask, prefix, n), "peftc": decode(ours, ids, mask, prefix, n),
            "uncached": decode(ours, ids, mask, prefix, n, cached=False)}
    print(f"compile {compile_s:.2f} s; first use_cache=True call (captures the cached prompt graph) {first_s:.2f} s; first "
          f"continued call (captures the step graph) {step_s:.2f} s; last logits vs PEFT: peftc "
          f"{float((last['peftc'] - last['peft']).abs().max()):.2e}, uncached "
          f"{float((last['uncached'] - last['peft']).abs().max()):.2e}")
    contenders = {"peft": lambda: decode(hf, ids, mask, prefix, n), "peftc": lambda: decode(ours, ids, mask, prefix, n),
                  "uncached": lambda: decode(ours, ids, mask, prefix, n, cached=False)}
    for clock_name, clock in (("wall", time.perf_counter), ("process CPU", time.process_time)):
        times = alternate(contenders, args.repeats, warmup=1, clock=clock)
        ms = {k: 1e3 * v / (n + 1) for k, v in times.items()}
        print(f"ms per call ({clock_name}, 1 + {n} calls, batch 2): peft {ms['peft']:.2f}  peftc {ms['peftc']:.2f}  "
              f"uncached {ms['uncached']:.2f}   peftc/peft {ms['peftc'] / ms['peft']:.3f}  "
              f"uncached/peftc {ms['uncached'] / ms['peftc']:.2f}")


if __name__ == "__main__":
    main()
