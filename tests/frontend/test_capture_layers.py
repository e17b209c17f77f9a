"""Layer stacks exported as two layers and copied: the graph must be the full export's, op for op."""

from __future__ import annotations

import pytest
import torch
from families import randomize_adapters
from peft_reference import peft_lora
from torch import nn

import peftc
from peftc.capture import layer_stacks
from peftc.capture.export import COPIED_LAYERS, capture
from peftc.ir.sites import module_path_of


def deep(family: str) -> tuple[nn.Module, dict]:
    """A 3- or 4-layer member of the family (llama: 4, so a copy also reads a copy) and new inputs."""
    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(0, 128, (3, 11))}
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
        return LlamaForCausalLM(cfg).eval(), ids
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(n_embd=48, n_layer=3, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0,
                         eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval(), ids
    if family == "bert":
        from transformers import BertConfig, BertForSequenceClassification
        cfg = BertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=2, intermediate_size=96,
                         vocab_size=128, max_position_embeddings=64, num_labels=3)
        return BertForSequenceClassification(cfg).eval(), ids
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=2, intermediate_size=96,
                    image_size=16, patch_size=4, num_labels=5)
    return ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(5, 3, 16, 16)}


def example(model: nn.Module) -> dict:
    from peftc.capture.calls import normalize_call
    from peftc.capture.example_inputs import hf_example_inputs
    return normalize_call(model, (), hf_example_inputs(model))[1]


def resized(kwargs: dict, batch: int, seq: int) -> dict:
    """The example call at another batch (and, for token inputs, sequence) size."""
    g = torch.Generator().manual_seed(batch * 100 + seq)
    out = {}
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor):
            out[name] = value
        elif value.is_floating_point():
            out[name] = torch.randn(batch, *value.shape[1:], generator=g)
        elif name == "attention_mask":
            out[name] = torch.ones(batch, seq, dtype=value.dtype)
        else:
            out[name] = torch.randint(0, 128, (batch, seq), generator=g, dtype=value.dtype)
    return out


def described(gm: torch.fx.GraphModule) -> list[tuple]:
    """Every node as (op, target, module path, shape): what passes and sites see."""
    out = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        shape = tuple(str(d) for d in val.shape) if isinstance(val, torch.Tensor) else None
        out.append((node.op, str(node.target), module_path_of(node), shape))
    return out


def outputs(module, inputs: dict) -> torch.Tensor:
    out = module(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "vit"])
def test_copied_graph_is_the_full_export(family):
    model, _ = deep(family)
    assert [s.path for s in layer_stacks.find_stacks(model)]
    kwargs = example(model)
    inputs = resized(kwargs, 3, 11)
    copied = capture(model, (), kwargs)
    full = capture(model, (), kwargs, copy_layers=False)
    assert sorted(described(copied), key=repr) == sorted(described(full), key=repr)
    calls = [d for d in described(copied) if d[0] == "call_function"]
    assert calls == [d for d in described(full) if d[0] == "call_function"]  # same order too
    assert [n for n, _ in copied.named_parameters()] == [n for n, _ in full.named_parameters()]
    for name, p in copied.named_parameters():
        assert p is model.get_parameter(name)  # the user's weights, shared, never copied
    with torch.no_grad():
        torch.manual_seed(1)
        got = outputs(copied, inputs)
        torch.manual_seed(1)
        want = outputs(full, inputs)
    assert torch.equal(got, want)


def test_model_is_left_whole():
    model, _ = deep("llama")
    layers = model.model.layers
    capture(model, (), example(model))
    assert model.model.layers is layers and len(layers) == 4


def test_lora_on_copied_layers_matches_peft_and_trains():
    model, inputs = deep("llama")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": targets, "r": 4, "alpha": 8}]})
    assert len(cm.report().sites) == 4 * 7
    assert "capture           model.layers.{2..3} copied from model.layers.1" in str(cm.report())
    randomize_adapters(cm)
    reference = peft_lora(model, cm, targets, 4, 8)
    cm.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs(cm, inputs), outputs(reference, inputs), rtol=1e-5, atol=1e-5)
        labelled = {**inputs, "labels": inputs["input_ids"]}  # another call signature: captured again
        torch.testing.assert_close(cm(**labelled).loss, reference(**labelled).loss, rtol=1e-5, atol=1e-5)
    cm.train()
    outputs(cm, inputs).sum().backward()
    grads = {n: p.grad for n, p in cm.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 4 * 7 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


class Scaled(nn.Module):
    """A layer whose forward reads its index: layers 0 and 1 trace differently."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) * (self.layer_idx + 1)


class Mixed(nn.Module):
    """A stack whose layers differ in a setting."""

    def __init__(self, widths=(8, 8, 8)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in widths)
        self.layers[2].extra_scale = 2.0

    def forward(self, x):
        for layer in self.layers:
            x = layer(x) * getattr(layer, "extra_scale", 1.0)
        return x


class Stacked(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layers = nn.ModuleList(layer(i) for i in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_layers_that_trace_differently_are_exported_in_full():
    model = Stacked(Scaled)
    assert layer_stacks.find_stacks(model)  # alike by their settings; the graphs tell them apart
    x = torch.randn(3, 8)
    gm = capture(model, (x,), {})
    torch.testing.assert_close(gm(x), model(x))
    assert COPIED_LAYERS not in gm.meta  # the report then says nothing was copied


def test_layers_with_different_settings_are_not_a_stack():
    assert layer_stacks.find_stacks(Mixed()) == []


def test_plain_stack_is_copied_and_flips_to_eval():
    model = Stacked(lambda i: nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)))
    gm = capture(model, (torch.randn(3, 8),), {})
    layers = {module_path_of(n).split(".")[1] for n in gm.graph.nodes if module_path_of(n).startswith("layers.")}
    assert layers == {"0", "1", "2", "3"}
    dropouts = [n for n in gm.graph.nodes if n.target == torch.ops.aten.dropout.default]
    assert len(dropouts) == 4
    peftc.ir.modes.set_mode(gm, training=False)
    x = torch.randn(5, 8)
    torch.testing.assert_close(gm(x), model.eval()(x))


class Aliased(Stacked):
    """Runs its stack through a second name, which cutting `layers` does not reach."""

    def __init__(self):
        super().__init__(lambda i: nn.Linear(8, 8))
        self.blocks = self.layers

    def forward(self, x):
        for layer in self.blocks:
            x = layer(x)
        return x


def test_stack_reached_another_way_is_exported_in_full():
    model = Aliased()
    x = torch.randn(3, 8)
    gm = capture(model, (x,), {})
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 4
    torch.testing.assert_close(gm(x), model(x))
