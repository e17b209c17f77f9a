"""generate() for compiled encoder-decoder models (T5, BART): decoding over the compiled forward.

The decoder-only path (peftc.runtime.generate) captures graphs holding a StaticCache of the
decoder's self-attention; an encoder-decoder's decoder also reads cross-attention keys and values
of the encoder's output, which those graphs do not hold. So each step here calls the compiled
model's own forward (`input_ids`, `attention_mask`, `decoder_input_ids`: the graph Trainer trains,
adapters included, in eval mode) on the whole decoder prefix and reads the last position's logits.
They are the logits transformers' cached decoding computes, so tokens equal PEFT's; the cost is
the encoder and the prefix recomputed every step (quadratic in the new tokens), which
`cm.merge_and_unload().generate(...)` avoids when it matters.

As GenerationMixin: the decoder starts from `decoder_start_token_id` (the generation config's,
else the model config's, else `bos_token_id`), `max_new_tokens` counts the tokens after it, and
the result is the decoder's sequences, the start token included.
"""

from __future__ import annotations

import torch
from torch import nn

from peftc.runtime.generate import decode_loop, resolve_config


@torch.no_grad()
def generate_seq2seq(compiled: nn.Module, model: nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, generation_config=None,
                     graph_inputs: dict | None = None, position_mask=None, slots: int = 0, **kwargs) -> torch.Tensor:
    """Decode with `compiled` (the compiled model, called as the original); `model`: the original, whose
    generation config and config give the defaults. `graph_inputs`: more keywords each call passes (a served
    model's `adapter_ids`); `slots` and `position_mask` are a served model's prompt rows', not implemented."""
    if slots or position_mask is not None:
        raise NotImplementedError("generate() on an encoder-decoder served with prompt-tuning adapters: their "
                                  "virtual-token slots are not implemented here; generate from the adapter's own "
                                  "model (peftc.from_peft(model, folder).generate(...))")
    graph_inputs = graph_inputs or {}
    config = resolve_config(model, generation_config, kwargs)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    start = torch.full((input_ids.shape[0], 1), decoder_start(config, model.config), dtype=torch.long,
                       device=input_ids.device)
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - 1
    if new_tokens <= 0:
        return start
    was_training = compiled.training
    compiled.eval()
    try:
        def next_logits(token: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
            return compiled(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=sequences,
                            **graph_inputs).logits[:, -1]

        return decode_loop(next_logits, config, start, next_logits(None, start), new_tokens)
    finally:
        compiled.train(was_training)


def decoder_start(generation_config, model_config) -> int:
    for source in (generation_config, model_config):
        for name in ("decoder_start_token_id", "bos_token_id"):
            value = getattr(source, name, None)
            if value is not None:
                return int(value[0] if isinstance(value, (list, tuple)) else value)
    raise ValueError("generate() on an encoder-decoder needs decoder_start_token_id (or bos_token_id) in the "
                     "model's generation_config or config; pass decoder_start_token_id=...")
