"""Fine-tune a small causal LM with transformers' Trainer on a peftc-compiled model, then generate.

    python examples/trainer_generate.py [--steps 60] [--out out/trainer]

The model is a tiny LLaMA built from a config (nothing downloaded); the task is "count up":
after a start digit the model should continue d, d+1, d+2, ... (mod 10). The compiled model
goes to Trainer exactly where a PeftModel would; afterwards cm.generate() (KV cache in the
graph) completes prompts, and merge_and_unload() gives a plain LlamaForCausalLM that agrees.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import peftc

LENGTH = 12


def rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 10, (n, 1), generator=g)
    ids = (starts + torch.arange(LENGTH)) % 10
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def accuracy(generate, prompts: torch.Tensor) -> float:
    out = generate(prompts)
    expected = (prompts[:, :1] + torch.arange(out.shape[1])) % 10
    return (out[:, prompts.shape[1]:] == expected[:, prompts.shape[1]:]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="out/trainer")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=11, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=10)  # 10: padding only
    model = LlamaForCausalLM(config)
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"],
                                             "r": 16, "alpha": 32}],
                               "trainable": ["lm_head.weight", "model.embed_tokens.weight"]})
    prompts = torch.stack([r["input_ids"][:3] for r in rows(64, seed=1)])

    def complete(p):
        return cm.generate(p, max_new_tokens=6, do_sample=False)

    print(f"before training: next-digit accuracy {accuracy(complete, prompts):.2f}")
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=16,
                                 learning_rate=3e-3, logging_steps=25, save_steps=args.steps, report_to=[],
                                 use_cpu=True, gradient_checkpointing=True)
    Trainer(model=cm, args=training, train_dataset=rows(2000)).train()
    cm.eval()
    print(f"after training:  next-digit accuracy {accuracy(complete, prompts):.2f}")
    print("prompt 3 4 5 ->", cm.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=6)[0].tolist())
    plain = cm.merge_and_unload().eval()
    same = torch.equal(plain.generate(prompts, max_new_tokens=6, do_sample=False), complete(prompts))
    print(f"merge_and_unload() -> {type(plain).__name__}; same tokens as the compiled model: {same}")


if __name__ == "__main__":
    main()
