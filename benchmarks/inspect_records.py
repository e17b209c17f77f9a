"""What recording erased/rewired nodes costs the pipeline, and how long report()/diff() take.

    OMP_NUM_THREADS=1 python benchmarks/inspect_records.py

32-layer LLaMA config (random weights, small widths), LoRA r=8 on q_proj/v_proj over an int8 base:
quantize_base removes 448 nodes and rewires 224. Times every ChangeWatch call made by the pipeline.
"""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftc
from peftc.pipeline import changes as graph_changes

SPENT = {"watch": 0.0}


def timed(fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT["watch"] += time.perf_counter() - start
    return wrapper


def main() -> None:
    watch = graph_changes.ChangeWatch
    watch.__init__, watch.erased, watch.rewired = timed(watch.__init__), timed(watch.erased), timed(watch.rewired)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(config).eval()
    spec = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 8}], "quantize": {"bits": 8}}
    cm = peftc.compile(model, spec)
    passes = sum(r.seconds for r in cm.records)
    erased = sum(len(r.erased) for r in cm.records)
    rewired = sum(len(r.rewired) for r in cm.records)
    print(f"graph nodes {cm.records[0].nodes_before:,} captured -> {len(cm.graph_module.graph.nodes):,}; "
          f"{erased} erased and {rewired} rewired nodes recorded")
    print(f"passes {passes * 1000:.0f} ms; recording (all ChangeWatch calls) {SPENT['watch'] * 1000:.1f} ms "
          f"({100 * SPENT['watch'] / passes:.1f}% of the passes)")
    for name, view in (("report()", lambda: str(cm.report())), ("diff()", cm.diff),
                       ("diff(q_proj)", lambda: cm.diff("model.layers.0.self_attn.q_proj"))):
        start = time.perf_counter()
        lines = len(view().splitlines())
        print(f"{name:14s} {1000 * (time.perf_counter() - start):6.0f} ms, {lines} lines")


if __name__ == "__main__":
    main()
