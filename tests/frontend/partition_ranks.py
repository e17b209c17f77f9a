"""What each rank of the two-process partition tests runs (spawned processes import this by name).

A pure-torch causal LM (hidden 32, 2 layers) keeps each process's start-up short: no transformers import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.partitioning import connect, serve_base

VOCAB, HIDDEN = 64, 32
Q_V = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}]}
ALL_FIVE = {"adapters": [{"method": "lora", "targets": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                          "r": 2, "alpha": 4}]}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.up_proj, self.down_proj = nn.Linear(HIDDEN, 2 * HIDDEN), nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (p(h).unflatten(-1, (2, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return x + self.down_proj(F.gelu(self.up_proj(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids, labels):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(x)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits


def batch(seed: int, size=(2, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (size[0], size[1] + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def compiled(spec: dict, seed: int):
    """TinyLM with non-zero adapters drawn from `seed` (equality tests must not pass trivially)."""
    cm = peftc.compile(TinyLM(), spec, example_inputs=batch(0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in cm.adapter_root.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return cm


def train_steps(model, params, seed: int, steps: int) -> dict:
    """SGD on `model` (compiled or partitioned): losses, first-step outputs and gradients, final adapters."""
    optimizer = torch.optim.SGD(params, lr=0.1)
    losses, traffic, first = [], [], None
    for step in range(steps):
        loss, logits = model(*batch(seed + step))
        loss.backward()
        if first is None:
            first = {"grads": [p.grad.numpy().copy() for p in params], "logits": logits.detach().numpy().copy()}
        if hasattr(model, "traffic"):
            traffic.append(model.traffic().to_dict())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {**first, "losses": losses, "params": [p.detach().numpy().copy() for p in params], "traffic": traffic}


def serve(rank: int, *_) -> dict:
    return serve_base(TinyLM())


def user(rank: int, specs: list, seeds: list, steps: int) -> dict:
    spec, seed = specs[rank - 1], seeds[rank - 1]
    cm = compiled(spec, seed)
    part = connect(cm, base_rank=0)
    try:
        result = train_steps(part, list(cm.adapter_root.parameters()), seed, steps)
    finally:
        part.close()
    return {**result, "user_params": sum(p.numel() for p in part.user.parameters())}
