"""insert_p_tuning: prepend N virtual tokens that a trained MLP or LSTM encoder makes from N embeddings (P-tuning)."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from peftc.core.fields import one_of, positive_int, probability
from peftc.ir.graph_edit import Inserter
from peftc.pipeline.runner import PassContext, PassResult

from .insert_prompt import prepend_virtual_tokens

aten = torch.ops.aten


@dataclass(frozen=True)
class PTuningConfig:
    """P-tuning (Liu et al., 2021) as HF PEFT's PromptEncoder: `num_virtual_tokens` embeddings through an MLP
    (Linear-ReLU-Linear-ReLU-Linear) or a bidirectional LSTM of `encoder_num_layers` and a 2-layer MLP."""

    method = "p_tuning"
    encoder_hidden_size: int = field(metadata={"check": positive_int})
    num_virtual_tokens: int = field(default=8, metadata={"check": positive_int})
    encoder_reparameterization_type: str = field(default="MLP", metadata={"check": one_of("MLP", "LSTM")})
    encoder_num_layers: int = field(default=2, metadata={"check": positive_int})
    encoder_dropout: float = field(default=0.0, metadata={"check": probability})  # between LSTM layers

    @property
    def prepended_tokens(self) -> int:
        """How many positions the method puts before the input tokens (generate() makes room for them)."""
        return self.num_virtual_tokens


# (name, shape) of the MLP head as HF PEFT's mlp_head.<i>.weight/bias, for token width d and hidden h.
def _mlp_shapes(config: PTuningConfig, d: int) -> list[tuple[str, tuple]]:
    h = config.encoder_hidden_size
    if config.encoder_reparameterization_type == "LSTM":
        dims = [(2 * h, 2 * h), (d, 2 * h)]
        layers = (0, 2)
    else:
        dims = [(h, d), (h, h), (d, h)]
        layers = (0, 2, 4)
    out = []
    for index, (rows, cols) in zip(layers, dims):
        out += [(f"mlp_head_{index}_weight", (rows, cols)), (f"mlp_head_{index}_bias", (rows,))]
    return out


def _lstm_shapes(config: PTuningConfig, d: int) -> list[tuple[str, tuple]]:
    """HF PEFT's lstm_head.<weight|bias>_<ih|hh>_l<k>[_reverse], bidirectional, in torch.nn.LSTM's order."""
    h = config.encoder_hidden_size
    out = []
    for layer in range(config.encoder_num_layers):
        width = d if layer == 0 else 2 * h
        for suffix in ("", "_reverse"):
            out += [(f"lstm_head_weight_ih_l{layer}{suffix}", (4 * h, width)),
                    (f"lstm_head_weight_hh_l{layer}{suffix}", (4 * h, h)),
                    (f"lstm_head_bias_ih_l{layer}{suffix}", (4 * h,)),
                    (f"lstm_head_bias_hh_l{layer}{suffix}", (4 * h,))]
    return out


class PTuningWeights(nn.Module):
    """`embedding` [N, d] and the encoder's tensors, flat, named after HF PEFT's prompt_encoder ('.' -> '_').

    A PEFT checkpoint holds only the encoder's output (`encoded()`), which is what it saves as
    prompt_embeddings."""

    def __init__(self, weight: torch.Tensor, config: PTuningConfig):
        super().__init__()
        factory = dict(device=weight.device, dtype=weight.dtype)
        d = weight.shape[1]
        self.config = config
        self.embedding = nn.Parameter(torch.empty(config.num_virtual_tokens, d, **factory))
        self.lstm_names = [n for n, _ in _lstm_shapes(config, d)] if self.is_lstm else []
        for name, shape in (_lstm_shapes(config, d) if self.is_lstm else []) + _mlp_shapes(config, d):
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.mlp_names = [n for n, _ in _mlp_shapes(config, d)]
        self.reset_parameters()

    @property
    def is_lstm(self) -> bool:
        return self.config.encoder_reparameterization_type == "LSTM"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """torch's own defaults for nn.Embedding, nn.Linear and nn.LSTM, as PEFT's modules get."""
        if self.embedding.is_meta:
            return
        nn.init.normal_(self.embedding)
        bound = 1 / math.sqrt(self.config.encoder_hidden_size)
        for name in self.lstm_names:
            nn.init.uniform_(getattr(self, name), -bound, bound)
        for weight, bias in zip(self.mlp_names[::2], self.mlp_names[1::2]):
            nn.init.kaiming_uniform_(getattr(self, weight), a=math.sqrt(5))
            fan_in = getattr(self, weight).shape[1]
            nn.init.uniform_(getattr(self, bias), -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def encoded(self) -> torch.Tensor:
        """The [N, d] prompt the encoder makes (eager, no dropout): PEFT's saved prompt_embeddings."""
        h = self.embedding.unsqueeze(0)
        if self.is_lstm:
            for layer in range(self.config.encoder_num_layers):
                params = [getattr(self, n) for n in self.lstm_names if f"_l{layer}" in n]
                zeros = h.new_zeros(2, 1, self.config.encoder_hidden_size)
                h = torch.lstm(h, (zeros, zeros), params, True, 1, 0.0, False, True, True)[0]
        weights = [getattr(self, n) for n in self.mlp_names]
        for i in range(0, len(weights), 2):
            h = F.linear(h, weights[i], weights[i + 1])
            if i + 2 < len(weights):
                h = F.relu(h)
        return h[0]

    def to_peft(self, tensor: str, value: torch.Tensor) -> torch.Tensor:
        return self.encoded().detach() if tensor == "embedding" else value


def insert_p_tuning(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Prepend encoder(embedding) at the token embedding's output and lengthen the sequence-aligned inputs by N."""
    config: PTuningConfig = ctx.entry
    return prepend_virtual_tokens(gm, ctx, "insert_p_tuning", config.num_virtual_tokens,
                                  lambda weight: PTuningWeights(weight, config), _encode)


def _encode(ins: Inserter, tensor, module: PTuningWeights) -> Node:
    """The encoder as graph ops on the [N, d] embedding: (LSTM layers, dropout between), then the MLP head."""
    config = module.config
    h = ins.call(aten.unsqueeze.default, tensor("embedding"), 0)  # [1, N, d]: one prompt, expanded later
    if module.is_lstm:
        for layer in range(config.encoder_num_layers):
            if layer > 0 and config.encoder_dropout > 0:  # nn.LSTM's dropout: on every layer's output but the last
                h = ins.call(aten.dropout.default, h, config.encoder_dropout, True)
            params = [tensor(n) for n in module.lstm_names if f"_l{layer}" in n]
            zeros = ins.call(aten.new_zeros.default, h, [2, 1, config.encoder_hidden_size])
            lstm = ins.call(aten.lstm.input, h, [zeros, zeros], params, True, 1, 0.0, True, True, True)
            h = ins.call(operator.getitem, lstm, 0)
    names = module.mlp_names
    for i in range(0, len(names), 2):
        h = ins.call(aten.linear.default, h, tensor(names[i]), tensor(names[i + 1]))
        if i + 2 < len(names):
            h = ins.call(aten.relu.default, h)
    return ins.call(aten.squeeze.dim, h, 0)
