"""VB-LoRA's save_only_topk_weights files: each logits tensor as its top-k indices and k-1 softmax weights.

PEFT writes `<key>_topk_indices` (the narrowest integer type for num_vectors) and `<key>_topk_weights`
in place of `<key>`; loading rebuilds logits that are log-weights at the top-k and -inf elsewhere,
which give the same mixes (and cannot be trained further, in PEFT as here).
"""

from __future__ import annotations

import torch

INDICES, WEIGHTS = "_topk_indices", "_topk_weights"
BANK_KEY = "base_model.vblora_vector_bank"


def is_topk_file(tensors: dict) -> bool:
    return any(key.endswith(INDICES) for key in tensors)


def logits_from_topk(tensors: dict) -> dict:
    """The checkpoint with each (indices, weights) pair replaced by the logits tensor PEFT rebuilds."""
    num_vectors = tensors[BANK_KEY].shape[0]
    out = {k: v for k, v in tensors.items() if not k.endswith((INDICES, WEIGHTS))}
    for key in (k for k in tensors if k.endswith(INDICES)):
        base = key[: -len(INDICES)]
        weights = tensors[base + WEIGHTS]
        weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
        logits = torch.full((*weights.shape[:-1], num_vectors), float("-inf"), dtype=weights.dtype)
        out[base] = logits.scatter(-1, tensors[key].long(), weights.log())
    return out


def topk_from_logits(tensors: dict, topk: int, num_vectors: int) -> dict:
    """The checkpoint PEFT writes with save_only_topk_weights=True."""
    index_dtype = next(dtype for bound, dtype in ((2**8, torch.uint8), (2**15, torch.int16), (2**31, torch.int32),
                                                  (float("inf"), torch.int64)) if num_vectors < bound)
    out = {}
    for key, value in tensors.items():
        if ".vblora_logits_" not in key:
            out[key] = value
            continue
        top, index = value.topk(topk)
        out[key + INDICES] = index.to(index_dtype).contiguous()
        out[key + WEIGHTS] = torch.softmax(top, dim=-1)[..., :-1].contiguous()
    return out
