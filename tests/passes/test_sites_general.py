"""Sites are ops: Falcon's x @ W.T, MoE expert parameters (Mixtral), nn.MultiheadAttention, grouped
convs, and a diffusers UNet's attention, each against the `peft` package."""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES, logits
from torch import nn

import peftc
from peftc import SpecError
from peftc.capture.export import capture
from peftc.ir.sites import find_sites

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


@torch.no_grad()
def randomize_trainable(module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def check_against_peft(build, config, inputs: dict, tmp_path, compile_kwargs=None):
    """PEFT's adapter through from_peft: outputs, trainable count, merged outputs, save for PEFT."""
    reference = get_peft_model(build(), config)
    randomize_trainable(reference)
    reference.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = logits(reference(**inputs))
        assert not torch.allclose(expected, logits(build()(**inputs)), **TOL)
    cm = peftc.from_peft(build(), tmp_path / "peft", **(compile_kwargs or {})).eval()
    assert trainable(cm) == trainable(reference)
    with torch.no_grad():
        torch.testing.assert_close(logits(cm(**inputs)), expected, **TOL)
        torch.testing.assert_close(logits(cm.merged()(**inputs)), expected, **TOL)
        torch.testing.assert_close(logits(cm.merged()(**inputs)), logits(reference.merge_and_unload()(**inputs)),
                                   **TOL)
    cm.save_adapter(tmp_path / "out", format="peft")
    reloaded = PeftModel.from_pretrained(build(), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded(**inputs)), expected, **TOL)
    return cm


# -- Falcon: FalconLinear is `x @ self.weight.T` ------------------------------------------------

def test_falcon_matmul_against_a_transposed_weight_is_a_site(tmp_path):
    family = FAMILIES["falcon"]
    inputs = family.inputs(2, 6)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_4h_to_h"])
    cm = check_against_peft(family.build, config, inputs, tmp_path)
    sites = {s.path: s for s in cm.sites}
    qkv = sites["transformer.h.0.self_attention.query_key_value"]
    assert (qkv.op, qkv.layout, qkv.in_features, qkv.out_features) == ("aten.matmul.default", "out_in", 32, 48)


def test_a_permute_that_is_not_a_transpose_is_no_site():
    class Keep(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            return x @ self.w.permute(0, 1) + x @ self.w.T

    gm = capture(Keep(), (torch.randn(2, 6),), {})
    assert [(s.op, s.layout) for s in find_sites(gm)] == [("aten.matmul.default", "out_in")]  # only x @ w.T


# -- Mixtral: experts as 3-D parameters ------------------------------------------------------

def test_mixtral_expert_sites_record_the_expert_dimension():
    gm = capture(FAMILIES["mixtral"].build(), (), {**FAMILIES["mixtral"].inputs(2, 5), "use_cache": False})
    experts = [s for s in find_sites(gm) if s.kind == "experts"]
    assert [s.path for s in experts[:2]] == ["model.layers.0.mlp.experts.gate_up_proj",
                                             "model.layers.0.mlp.experts.down_proj"]
    gate_up, down = experts[:2]
    assert (gate_up.experts, gate_up.out_features, gate_up.in_features, gate_up.layout) == (4, 96, 32, "out_in")
    assert (down.experts, down.out_features, down.in_features) == (4, 32, 48)
    assert gate_up.weight_shape == (4, 96, 32)
    assert len(experts) == 4  # one site per parameter, however many ops read it


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], []])
def test_mixtral_lora_on_attention_and_experts_matches_peft(targets, tmp_path):
    family = FAMILIES["mixtral"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, target_parameters=list(family.target_parameters))
    cm = check_against_peft(family.build, config, family.inputs(2, 6), tmp_path)
    a = cm.adapter_state_dict()["model.layers.1.mlp.experts.down_proj.lora.A"]
    assert a.shape == (2 * 4, 48)  # one rank-2 A per expert, stacked as PEFT's ParamWrapper


def test_mixtral_native_spec_trains_each_expert(tmp_path):
    family = FAMILIES["mixtral"]
    spec = {"adapters": [{"method": "lora", "target_parameters": ["experts.down_proj"], "r": 2, "alpha": 4}]}
    model = family.build()
    before = copy.deepcopy(model.state_dict())
    cm = peftc.compile(model, spec).train()
    randomize_trainable(cm)
    inputs = family.inputs(2, 6)
    cm(**inputs).logits.pow(2).mean().backward()
    b = next(p for n, p in cm.named_parameters() if n.endswith("layers.0.mlp.experts.down_proj.lora.B"))
    grad = b.grad.reshape(b.shape[0], 2, 4)  # [out, r, E]: each expert's B columns
    assert (grad.abs().sum(dim=(0, 1)) > 0).sum() >= 2  # the routed experts get their own gradients
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    cm.save_adapter(tmp_path / "out", format="peft")
    reloaded = PeftModel.from_pretrained(family.build(), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, cm.eval()(**inputs).logits, **TOL)


def test_expert_errors_name_the_field():
    family = FAMILIES["mixtral"]
    with pytest.raises(SpecError, match=r"adapters\[0\]\.dropout: LoRA on the expert parameter"):
        peftc.compile(family.build(), {"adapters": [{"method": "lora", "target_parameters": ["experts.down_proj"],
                                                     "dropout": 0.1}]})
    with pytest.raises(SpecError, match=r"adapters\[0\]\.target_parameters\[0\]: 'experts.up_proj' matches no"):
        peftc.compile(family.build(), {"adapters": [{"method": "lora", "target_parameters": ["experts.up_proj"]}]})
    message = r"adapters\[0\]\.targets: expected a non-empty list of module names, or 'target_parameters'"
    with pytest.raises(SpecError, match=message):
        peftc.Spec.from_dict({"adapters": [{"method": "lora"}]})


# -- grouped convs ---------------------------------------------------------------------------

def test_grouped_conv_rank_must_divide_the_groups():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4))
    with pytest.raises(SpecError, match=r"adapters\[0\]\.r: 6 is not divisible by the 4 groups"):
        peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["0"], "r": 6}]},
                      example_inputs=(torch.randn(1, 4, 5, 5),))


# -- diffusers UNet: LoRA on to_q, to_k, to_v, to_out.0 ---------------------------------------

def unet() -> nn.Module:
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).eval()


def test_unet_attention_lora_matches_peft(tmp_path):
    pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 5]),
              "encoder_hidden_states": torch.randn(2, 3, 16, generator=g)}
    sample = lambda out: out.sample  # noqa: E731
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    reference = get_peft_model(unet(), config)
    randomize_trainable(reference)
    reference.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = sample(reference(**inputs))
    cm = peftc.from_peft(unet(), tmp_path / "peft", example_kwargs=inputs).eval()
    assert trainable(cm) == trainable(reference)
    adapted = {p for r in cm.records if r.method == "lora" for p in r.sites}
    wrapped = {n[len("base_model.model."):] for n, m in reference.named_modules() if hasattr(m, "lora_A")}
    assert adapted == wrapped and sum(p.endswith("to_out.0") for p in adapted) == 8  # 8 attentions
    with torch.no_grad():
        torch.testing.assert_close(sample(cm(**inputs)), expected, **TOL)
    cm.save_adapter(tmp_path / "out", format="peft")
    reloaded = PeftModel.from_pretrained(unet(), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(sample(reloaded(**inputs)), expected, **TOL)
