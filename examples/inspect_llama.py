"""Inspect what peftc did to a 32-layer LLaMA: the report, the diff of one layer, a picture of it.

    python examples/inspect_llama.py [--render docs/inspect-layer0.svg]

The model is a LLaMA config with 32 layers and random weights (small widths, so it runs on a
laptop CPU in under a minute); nothing is downloaded.
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", metavar="FILE", help="also draw model.layers.0 (.svg or .png; needs graphviz)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(config).eval()
    spec = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 8, "alpha": 16,
                          "dropout": 0.05}]}
    cm = peftc.compile(model, spec)

    print(cm.report())
    print()
    print(cm.diff(scope="model.layers.0.self_attn.q_proj"))
    if args.render:
        print(f"\nwrote {cm.render(args.render, scope='model.layers.0')}")


if __name__ == "__main__":
    main()
