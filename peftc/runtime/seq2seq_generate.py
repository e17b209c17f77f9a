"""generate() for compiled encoder-decoder models (T5, BART): an encoder graph, then cached decoder steps.

Graphs from `runtime/seq2seq_cache.py`, captured through the compiled model's own pipeline (same
passes, same adapter parameters, as the decoder-only `Generator`): the encoder once per call (its
length and the batch dynamic), then a first decoder step that computes the cross-attention keys and
values of the encoder output into a cache, then one-token steps over the self-attention StaticCache
that read them. The step graphs are keyed by (batch, encoder length, cache length) and captured on
the first call of each (two exports; the cache length rounds up to a power of two as the causal
LMs'). `_generate_uncached`, the compiled forward on the whole decoder prefix each step (quadratic
in the new tokens), stays for comparison (benchmarks/seq2seq_generate.py).

As GenerationMixin: the decoder starts from `decoder_start_token_id` (the generation config's,
else the model config's, else `bos_token_id`), `max_new_tokens` counts the tokens after it, and
the result is the decoder's sequences, the start token included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from peftc.ir.modes import set_mode
from peftc.runtime.generate import Generator, cache_length, decode_loop, resolve_config
from peftc.runtime.prefix_window import prefix_tokens
from peftc.runtime.seq2seq_cache import Seq2SeqEncoder, WithSeq2SeqCache


@dataclass
class Seq2SeqGraphs:
    source: WithSeq2SeqCache
    first: GraphModule  # the first decoder step: fills the cross cache
    step: GraphModule  # every later step: reads it


class Seq2SeqGenerator(Generator):
    """The encoder graph (one, encoder length dynamic) and the decoder step graphs per (batch, encoder
    length, cache length) of one compiled encoder-decoder, built through its compilation's pipeline."""

    def __init__(self, compilation, plan):
        super().__init__(compilation, plan)
        self.encoder_graph: GraphModule | None = None
        self.steps: dict[tuple[int, int, int], Seq2SeqGraphs] = {}
        # Virtual tokens (prompt tuning: the encoder's input grows; prefix tuning: the decoder's cache starts
        # full) are not in these graphs: such specs decode uncached.
        self.cached = not self.prompt_tokens and not prefix_tokens(compilation.spec)

    def encoder(self, input_ids, attention_mask, graph_inputs: dict) -> torch.Tensor:
        if self.encoder_graph is None:
            # An example of batch 2 and length 5 (not the call's, which may be 1: export would specialize it).
            ids = torch.zeros(2, 5, dtype=torch.long, device=input_ids.device)
            dims = {0: Dim.AUTO, 1: Dim.AUTO}
            self.encoder_graph = self.build(Seq2SeqEncoder(self.model), (), {"input_ids": ids,
                                            "attention_mask": torch.ones_like(ids)},
                                            {"input_ids": dims, "attention_mask": dims})
            set_mode(self.encoder_graph, False)
        return self.encoder_graph(input_ids=input_ids, attention_mask=attention_mask, **graph_inputs)

    def steps_for(self, batch: int, encoder_len: int, cache_len: int) -> Seq2SeqGraphs:
        key = (batch, encoder_len, cache_len)
        if key not in self.steps:
            self.steps[key] = self._capture(batch, encoder_len, cache_len)
        return self.steps[key]

    def _capture(self, batch: int, encoder_len: int, cache_len: int) -> Seq2SeqGraphs:
        weight = next(self.model.parameters())
        device = weight.device
        config = self.model.config
        call = {"decoder_input_ids": torch.zeros(batch, 1, dtype=torch.long, device=device),
                "encoder_hidden_states": torch.zeros(batch, encoder_len, config.d_model, dtype=weight.dtype,
                                                     device=device),
                "attention_mask": torch.ones(batch, encoder_len, dtype=torch.long, device=device),
                "decoder_attention_mask": torch.ones(batch, cache_len, dtype=torch.long, device=device),
                "cache_position": torch.zeros(1, dtype=torch.long, device=device)}
        first_source = WithSeq2SeqCache(self.model, batch, cache_len, encoder_len, fill_cross=True)
        step_source = WithSeq2SeqCache(self.model, batch, cache_len, encoder_len, fill_cross=False,
                                       caches=first_source.caches)
        graphs = [self.build(source, (), call, dict.fromkeys(call)) for source in (first_source, step_source)]
        for gm in graphs:
            set_mode(gm, False)
        return Seq2SeqGraphs(first_source, *graphs)


@torch.no_grad()
def generate_seq2seq(generator: Seq2SeqGenerator | None, compiled: nn.Module, model: nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, generation_config=None,
                     graph_inputs: dict | None = None, position_mask=None, slots: int = 0, **kwargs) -> torch.Tensor:
    """Decode with `generator`'s graphs (None: over `compiled`'s forward, the uncached path); `model`: the original, whose generation config and
    config give the defaults. `graph_inputs`: more keywords each call passes (a served model's
    `adapter_ids`); `slots` and `position_mask` are a served model's prompt rows', not implemented."""
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
    if generator is None:
        return _generate_uncached(compiled, input_ids, attention_mask, config, start, new_tokens, graph_inputs)
    encoded = generator.encoder(input_ids, attention_mask, graph_inputs)
    batch, encoder_len = input_ids.shape
    graphs = generator.steps_for(batch, encoder_len, cache_length(new_tokens + 1))
    cache_len = graphs.source.caches[0].layers[0].keys.shape[2]
    decoder_mask = torch.ones(batch, cache_len, dtype=torch.long, device=input_ids.device)

    def run(graph: GraphModule, token: torch.Tensor, position: int) -> torch.Tensor:
        return graph(decoder_input_ids=token, encoder_hidden_states=encoded, attention_mask=attention_mask,
                     decoder_attention_mask=decoder_mask,
                     cache_position=torch.tensor([position], device=token.device), **graph_inputs)[:, -1]

    def next_logits(token: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        return run(graphs.step, token[:, None], sequences.shape[1] - 1)

    return decode_loop(next_logits, config, start, run(graphs.first, start, 0), new_tokens)


def _generate_uncached(compiled, input_ids, attention_mask, config, start, new_tokens: int, graph_inputs: dict):
    """Each step the compiled forward on the whole decoder prefix (encoder included): quadratic in the new
    tokens, for what the cached graphs do not cover."""
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
