"""The shared table of model families: small configs, random weights, nothing downloaded.

Each family builds a model in eval mode, makes inputs of any batch/sequence size, and names
the targets a LoRA-style spec should use on it (peftc names and the `peft` package's names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], dict]  # (batch, seq) -> forward kwargs
    targets: tuple[str, ...]  # attention projections, as peftc targets
    all_linear: tuple[str, ...]  # every linear layer in the blocks
    example_inputs: Callable[[], tuple] | None = None  # for non-transformers models
    hf: bool = True
    target_parameters: tuple[str, ...] = ()  # MoE expert parameters, as PEFT's target_parameters


def _ids(vocab: int) -> Callable[[int, int], dict]:
    def make(batch: int, seq: int) -> dict:
        g = torch.Generator().manual_seed(batch * 1000 + seq)
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    return make


# The decoder size the causal-LM families share (each adds what is its own).
SMALL_DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMALL_DECODER)
    return LlamaForCausalLM(cfg).eval()


def qwen2() -> nn.Module:
    """LLaMA's layout with biases on q/k/v and tied embeddings off: the other common causal LM."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(**SMALL_DECODER)
    return Qwen2ForCausalLM(cfg).eval()


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=48, n_layer=2, n_head=2, vocab_size=128, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                     vocab_size=128, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def falcon() -> nn.Module:
    """FalconLinear computes `x @ W.T` (a matmul against a transposed parameter), not nn.Linear."""
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(0)
    cfg = FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    return FalconForCausalLM(cfg).eval()


def mixtral() -> nn.Module:
    """MoE: experts stored as 3-D parameters (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
    return MixtralForCausalLM(cfg).eval()


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                    image_size=16, patch_size=4, num_labels=5)
    return ViTForImageClassification(cfg).eval()


# -- families beyond the shared table: each adds one thing the ones above do not have -------------------------
def qwen3() -> nn.Module:
    """Qwen2's layout plus an RMSNorm on each head's queries and keys (q_norm, k_norm) before RoPE."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3Config(**SMALL_DECODER, head_dim=16)
    return Qwen3ForCausalLM(cfg).eval()


def gemma2() -> nn.Module:
    """Sliding (window 4) and global layers alternating, attention and final-logit soft-capping, tied and
    sqrt(hidden)-scaled embeddings, pre- and post-norms around each block."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    cfg = Gemma2Config(**SMALL_DECODER, head_dim=16, sliding_window=4, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    return Gemma2ForCausalLM(cfg).eval()


def gemma3() -> nn.Module:
    """Gemma 2's text layout with q/k norms and a local RoPE base on the sliding layers (one of two here)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(**SMALL_DECODER, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    return Gemma3ForCausalLM(cfg).eval()


def phi3() -> nn.Module:
    """Fused projections: one qkv_proj [q; k; v] and one gate_up_proj [gate; up] per layer."""
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(0)
    cfg = Phi3Config(**SMALL_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(cfg).eval()


def mistral() -> nn.Module:
    """LLaMA's layout with every layer a sliding-window one (window 4, shorter than the test sequences)."""
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = MistralConfig(**SMALL_DECODER, sliding_window=4)
    return MistralForCausalLM(cfg).eval()


def opt() -> nn.Module:
    """Learned positions offset by 2 and computed from the attention mask; biases everywhere; pad id 1."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                    max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2)
    return OPTForCausalLM(cfg).eval()


def gpt_neox() -> nn.Module:
    """A fused query_key_value interleaved per head, partial rotary embeddings, parallel attention + MLP."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPTNeoXForCausalLM(cfg).eval()


def t5() -> nn.Module:
    """Encoder-decoder with relative position biases and no biases in its linears (q, k, v, o, wi, wo)."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, vocab_size=128,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def bart() -> nn.Module:
    """Encoder-decoder with learned positions (offset 2); as facebook/bart-large, decoding starts from EOS and the
    generation config forces BOS first and EOS at the last step."""
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    cfg = BartConfig(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=128,
                     max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     decoder_start_token_id=2)
    model = BartForConditionalGeneration(cfg).eval()
    model.generation_config.forced_bos_token_id = 0  # transformers 5 leaves it out of the generated config
    return model


def _seq2seq_ids(vocab: int) -> Callable[[int, int], dict]:
    def make(batch: int, seq: int) -> dict:
        g = torch.Generator().manual_seed(batch * 1000 + seq)
        return {"input_ids": torch.randint(3, vocab, (batch, seq), generator=g),
                "decoder_input_ids": torch.randint(3, vocab, (batch, max(1, seq - 2)), generator=g)}
    return make


def vit_inputs(batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h)).mean(dim=(2, 3))
        return self.head(h)


FAMILIES = {
    "llama": Family("llama", llama, _ids(128), ("q_proj", "v_proj"),
                    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "qwen2": Family("qwen2", qwen2, _ids(128), ("q_proj", "v_proj"),
                    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "gpt2": Family("gpt2", gpt2, _ids(128), ("c_attn",), ("c_attn", "c_proj", "c_fc")),
    "bert": Family("bert", bert, _ids(128), ("query", "value"), ("query", "key", "value", "dense")),
    "falcon": Family("falcon", falcon, _ids(128), ("query_key_value",),
                     ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "mixtral": Family("mixtral", mixtral, _ids(128), ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                      target_parameters=("experts.gate_up_proj", "experts.down_proj")),
    "vit": Family("vit", vit, vit_inputs, ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj")),
    "mlp": Family("mlp", lambda: MLP().eval(), lambda b, s: {"x": torch.randn(b, 16)}, ("fc1", "fc2"),
                  ("fc1", "fc2"), example_inputs=lambda: (torch.randn(3, 16),), hf=False),
    "convnet": Family("convnet", lambda: ConvNet().eval(), lambda b, s: {"x": torch.randn(b, 3, 12, 12)},
                      ("conv1", "conv2", "head"), ("conv1", "conv2", "head"),
                      example_inputs=lambda: (torch.randn(2, 3, 12, 12),), hf=False),
}
HF_FAMILIES = [name for name, f in FAMILIES.items() if f.hf]

_LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Kept out of FAMILIES, so the tests parametrized over the whole table do not grow; the drop-in workflow
# (tests/frontend/test_dropin_more_families.py) runs on each. all_linear is what those tests adapt.
MORE_FAMILIES = {
    "qwen3": Family("qwen3", qwen3, _ids(128), ("q_proj", "v_proj"), _LLAMA_LINEAR),
    "gemma2": Family("gemma2", gemma2, _ids(128), ("q_proj", "v_proj"), _LLAMA_LINEAR),
    "gemma3": Family("gemma3", gemma3, _ids(128), ("q_proj", "v_proj"), _LLAMA_LINEAR),
    "phi3": Family("phi3", phi3, _ids(128), ("qkv_proj",), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "mistral": Family("mistral", mistral, _ids(128), ("q_proj", "v_proj"), _LLAMA_LINEAR),
    "opt": Family("opt", opt, _ids(128), ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    "gpt_neox": Family("gpt_neox", gpt_neox, _ids(128), ("query_key_value",),
                       ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "t5": Family("t5", t5, _seq2seq_ids(128), ("q", "v"), ("q", "k", "v", "o", "wi", "wo")),
    "bart": Family("bart", bart, _seq2seq_ids(128), ("q_proj", "v_proj"),
                   ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
}


def compile_family(family: Family, spec, **kwargs):
    import peftc
    model = family.build()
    if family.hf:
        return model, peftc.compile(model, spec, **kwargs)
    return model, peftc.compile(model, spec, example_inputs=family.example_inputs(), **kwargs)


def compile_family_specs(family: Family, specs: dict, **kwargs) -> tuple[nn.Module, dict]:
    """(model, {name: CompiledModel}): each spec compiled on one model built once, the compiles sharing one
    capture store as train_adapters' per-adapter compiles do (peftc.compiler.compile.compile_sharing_captures),
    so specs captured with the same call export the model once. For tests whose subject comes after the
    compiles (serving, export); tests of compile itself call compile_family."""
    from peftc.capture.captured import CapturedGraphs
    from peftc.compiler.compile import compile_sharing_captures

    model = family.build()
    captured = CapturedGraphs(across_views=True)
    if not family.hf:
        kwargs = {"example_inputs": family.example_inputs(), **kwargs}
    return model, {name: compile_sharing_captures(model, spec, captured, **kwargs) for name, spec in specs.items()}


def call(module: nn.Module, family: Family, inputs: dict):
    """Call a compiled or plain module with family inputs (positional for plain torch models)."""
    return module(**inputs) if family.hf else module(*inputs.values())


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@torch.no_grad()
def randomize_adapters(cm, std: float = 0.1, seed: int = 0) -> None:
    """Non-zero adapter weights, so equality tests cannot pass trivially."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in cm.adapter_state_dict().items():
        tensor.copy_(torch.randn(tensor.shape, generator=g) * std)
