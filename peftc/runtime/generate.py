"""generate() for compiled causal LMs: a decoding loop over graphs that hold a StaticCache.

Two graphs per (batch size, cache length): a prefill graph (prompt length dynamic) and a
one-token decode graph, both captured from `WithStaticCache` through the compiled model's own
pipeline (same passes, same adapter parameters), sharing one set of cache buffers. Cache
lengths are rounded up to a power of two so that most calls reuse graphs already built.

Arguments follow transformers' GenerationMixin: `generation_config` and keyword overrides of
it (max_new_tokens, max_length, do_sample, temperature, top_k, top_p, repetition_penalty,
eos_token_id, pad_token_id); the result is the sequences tensor, prompt included, as
`model.generate` returns by default. Prompts are left-padded, as transformers expects for
decoder-only models; positions come from the attention mask as transformers computes them.

Prompt tuning and p-tuning: generate() puts N slots before the prompt, which the generation graphs
fill with the virtual tokens (insert_prompt), so they enter the KV cache first; as in HF PEFT, the
mask sees them and positions count every slot (virtual tokens 0..N-1, then the prompt, padding
included: PEFT drops position_ids for prompt learning). The sequences returned leave them out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from peftc.ir.attribute_owners import alias_attribute_owners
from peftc.ir.modes import set_mode
from peftc.ir.packed_shrink import inline_packed_shrinks
from peftc.runtime.kv_cache import WithStaticCache
from peftc.runtime.prefix_window import check_prefix_window
from peftc.runtime.prompt_cache import prepended_tokens

MIN_CACHE_LEN = 32
# What this loop implements; other GenerationConfig fields passed to generate() are refused.
SUPPORTED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "eos_token_id", "pad_token_id", "bos_token_id", "use_cache", "num_beams", "num_return_sequences",
             "cache_implementation", "forced_bos_token_id", "forced_eos_token_id", "decoder_start_token_id"}

# Keywords GenerationMixin takes that change no token here, which Seq2SeqTrainer(predict_with_generate=True)
# passes: labels (a model input that only adds a loss generate does not return) and synced_gpus (the
# graphs hold no collective to keep in step: a sharded model cannot generate).
NO_EFFECT = {"labels", "synced_gpus"}


@dataclass
class DecoderGraphs:
    source: WithStaticCache
    prefill: GraphModule
    decode: GraphModule


class Generator:
    """Builds and keeps the generation graphs of one compiled model (its compilation, under its plan)."""

    def __init__(self, compilation, plan):
        self.compilation = compilation
        # Decoding runs without grad, outside FSDP and checkpointing: the flat graph, no layer calls.
        self.plan = replace(plan, structure_layers=False, checkpoint_layers=False) if plan is not None else None
        self.graphs: dict[tuple[int, int], DecoderGraphs] = {}
        # Slots the prompt methods fill before the caller's tokens (prompt tuning, p-tuning).
        self.prompt_tokens = prepended_tokens(compilation.spec)

    @property
    def model(self) -> nn.Module:
        return self.compilation.source

    def build(self, source: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: dict) -> GraphModule:
        """The compilation's build with `source` (the model plus its cache) captured instead: same
        passes, same adapter tree, same shared state."""
        built = replace(self.compilation, source=source).build(args, kwargs, self.plan, dynamic_shapes=dynamic_shapes)
        gm = inline_packed_shrinks(built.graph_module)  # decoding runs no backward (generate is no_grad)
        return alias_attribute_owners(gm)  # one lookup per parameter read, each decoding step

    def graphs_for(self, batch: int, cache_len: int) -> DecoderGraphs:
        key = (batch, cache_len)
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch, cache_len)
        return self.graphs[key]

    def _capture(self, batch: int, cache_len: int) -> DecoderGraphs:
        source = WithStaticCache(self.model, batch, cache_len)
        device = next(self.model.parameters()).device
        mask = torch.ones(batch, cache_len, dtype=torch.long, device=device)

        def call(seq: int) -> dict:
            ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
            return {"input_ids": ids, "attention_mask": mask, "position_ids": ids.clone(),
                    "cache_position": torch.arange(seq, device=device)}

        seq_dim = Dim.AUTO
        prefill = self.build(source, (), call(2), {"input_ids": {1: seq_dim}, "attention_mask": None,
                                                     "position_ids": {1: seq_dim}, "cache_position": {0: seq_dim}})
        decode = self.build(source, (), call(1), dict.fromkeys(call(1)))
        for gm in (prefill, decode):
            set_mode(gm, False)
        return DecoderGraphs(source, prefill, decode)


def cache_length(needed: int) -> int:
    length = MIN_CACHE_LEN
    while length < needed:
        length *= 2
    return length


def resolve_config(model: nn.Module, generation_config, kwargs: dict):
    """The GenerationConfig of this call: the model's (or the one given), updated by `kwargs`."""
    from transformers import GenerationConfig

    base = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
    config = copy.deepcopy(base)
    unused = config.update(**{name: value for name, value in kwargs.items() if name not in NO_EFFECT})
    if unused:
        raise TypeError(f"generate() got unexpected keyword argument(s) {sorted(unused)}; the compiled model "
                        "accepts GenerationConfig fields and attention_mask")
    changed = [k for k in kwargs if k not in SUPPORTED | NO_EFFECT]
    if changed:
        raise NotImplementedError(f"generate(): peftc's compiled generate does not implement {sorted(changed)}; "
                                  f"it supports {sorted(SUPPORTED - {'use_cache', 'cache_implementation'})}. "
                                  "cm.merge_and_unload() gives the original model with every option")
    if (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
        raise NotImplementedError("generate(): beam search (num_beams > 1) and num_return_sequences > 1 are not implemented; "
                                  "use cm.merge_and_unload().generate(...)")
    return config


def logits_processors(config, max_length: int):
    """GenerationMixin's processors for the fields this loop implements; `max_length` is the length
    of the sequences at the last step (where a forced EOS goes)."""
    from transformers import (
        ForcedBOSTokenLogitsProcessor,
        ForcedEOSTokenLogitsProcessor,
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    # After the penalty, as GenerationMixin orders them; a model's generation_config may set them (BART's
    # forced_eos_token_id), which GenerationMixin applies unasked.
    if config.forced_bos_token_id is not None:
        processors.append(ForcedBOSTokenLogitsProcessor(config.forced_bos_token_id))
    if config.forced_eos_token_id is not None:
        processors.append(ForcedEOSTokenLogitsProcessor(max_length, config.forced_eos_token_id))
    if config.do_sample:
        if config.temperature not in (None, 1.0):
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k not in (None, 0):
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p not in (None, 1.0):
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


@torch.no_grad()
def generate(generator: Generator, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             generation_config=None, graph_inputs: dict | None = None, position_mask: torch.Tensor | None = None,
             slots: int = 0, **kwargs) -> torch.Tensor:
    """`graph_inputs`: more keywords every graph call takes (a served model's per-row `adapter_ids`).
    `slots`: leading columns of `input_ids` that are virtual-token slots, not tokens (a served model puts
    them there); `position_mask`: the columns positions count (default: the attention mask's; ones
    where a row's positions count its padding too, as prompt-tuning rows' do). The result, and what
    the logits processors see, leave the slots out."""
    graph_inputs = graph_inputs or {}
    config = resolve_config(generator.model, generation_config, kwargs)
    prompt_len = input_ids.shape[1] - slots
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_len
    if new_tokens <= 0:
        return input_ids[:, slots:]
    check_prefix_window(generator.model, generator.compilation.spec, prompt_len + new_tokens, "generate()")
    if generator.prompt_tokens:
        input_ids, attention_mask, position_mask = with_slots(input_ids, attention_mask, generator.prompt_tokens)
        slots += generator.prompt_tokens
    graphs, mask, positions, logits = _prefill(generator, input_ids, attention_mask, new_tokens, graph_inputs,
                                               position_mask)
    position = positions[:, -1:]

    def next_logits(token: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        nonlocal position
        position = position + 1
        return graphs.decode(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                             cache_position=torch.tensor([sequences.shape[1] - 1], device=token.device),
                             **graph_inputs)[:, -1]

    return decode_loop(next_logits, config, input_ids, logits, new_tokens, slots)


def with_slots(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position mask) with `slots` visible positions before the prompt; positions
    count every slot (HF PEFT's prompt learning ignores position_ids: positions run 0..N+S-1)."""
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids = torch.cat([input_ids.new_zeros(batch, slots), input_ids], 1)
    mask = torch.cat([attention_mask.new_ones(batch, slots), attention_mask], 1)
    return ids, mask, torch.ones_like(mask)


def _prefill(generator: Generator, input_ids, attention_mask, new_tokens: int, graph_inputs: dict, position_mask):
    """(graphs, cache-long mask, prompt positions, last-position logits) after the prompt's prefill."""
    batch, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_mask is None:
        position_mask = attention_mask
    graphs = generator.graphs_for(batch, cache_length(prompt_len + new_tokens))
    cache_len = graphs.source.cache.layers[0].keys.shape[2]
    mask = torch.ones(batch, cache_len, dtype=torch.long, device=input_ids.device)
    mask[:, :prompt_len] = attention_mask
    # transformers' positions for left-padded prompts: count of real tokens so far, padding at 1.
    positions = (position_mask.long().cumsum(-1) - 1).masked_fill(position_mask == 0, 1)
    prefill = graphs.prefill if prompt_len > 1 else graphs.decode
    logits = prefill(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                     cache_position=torch.arange(prompt_len, device=input_ids.device), **graph_inputs)[:, -1]
    return graphs, mask, positions, logits


def decode_loop(next_logits, config, input_ids, logits, new_tokens: int, slots: int = 0) -> torch.Tensor:
    """Pick `new_tokens` tokens after `input_ids` as GenerationMixin does (processors, greedy or sampled,
    eos and pad); `logits` are the last position's, `next_logits(token, sequences)` the next step's."""
    processors = logits_processors(config, input_ids.shape[1] - slots + new_tokens)
    eos = _as_list(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    sequences = input_ids
    for step in range(new_tokens):
        scores = processors(sequences[:, slots:], logits.float())
        if config.do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(dim=-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        sequences = torch.cat([sequences, token[:, None]], dim=-1)
        if eos:
            unfinished &= ~torch.isin(token, torch.tensor(eos, device=token.device))
        if not unfinished.any() or step == new_tokens - 1:
            break
        logits = next_logits(token, sequences)
    return sequences[:, slots:]


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]
