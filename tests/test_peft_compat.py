"""PEFT compatibility table: small models of the kinds PEFT's custom-model tests use, crossed with every
method and option peftc maps, each compared with the real `peft` package.

Every case: PEFT builds and randomizes the adapter and saves it; `peftc.from_peft` loads it and must
give PEFT's outputs (1e-5), PEFT's trainable parameter count, the same outputs merged (where PEFT can
merge), and a `save_adapter(format="peft")` directory PEFT loads back to the same outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc

peft = pytest.importorskip("peft")
from peft import (IA3Config, LNTuningConfig, LoHaConfig, LoKrConfig, LoraConfig, PeftModel,  # noqa: E402
                  TrainableTokensConfig, VeraConfig, get_peft_model)

TOL = dict(atol=1e-5, rtol=1e-5)


# -- the models (tiny dims) ------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 6)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class NormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.norm, self.lin1 = nn.Linear(10, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.lin1(self.norm(torch.relu(self.lin0(x))))


class Conv1dModel(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1, groups=groups)
        self.lin = nn.Linear(8, 3)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).mean(-1))


class Conv2dModel(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups)
        self.lin = nn.Linear(8, 3)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).mean((-1, -2)))


class Conv3dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 6, 3, padding=1)
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).mean((-1, -2, -3)))


class EmbConv1D(nn.Module):
    """An embedding and transformers' Conv1D (GPT-2's [in, out] weight, an addmm)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.emb = nn.Embedding(50, 12)
        self.conv1d = Conv1D(10, 12)
        self.lin = nn.Linear(10, 3)

    def forward(self, ids):
        return self.lin(torch.relu(self.conv1d(self.emb(ids))))


class MHAModel(nn.Module):
    def __init__(self, cross: bool = False):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lin = nn.Linear(16, 3)
        self.cross = cross

    def forward(self, x):
        # cross: keys differ from queries, so the module splits in_proj_weight into row blocks
        kv = torch.tanh(x[:, :3]) if self.cross else x
        return self.lin(self.mha(x, kv, kv, need_weights=False)[0])


class ParamMLP(nn.Module):
    """A bare nn.Parameter used as a weight (PEFT reaches it with target_parameters)."""

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(12, 10) * 0.3)

        def forward(self, x):
            return x @ self.weight.T

    def __init__(self):
        super().__init__()
        self.inner = ParamMLP.Inner()
        self.lin = nn.Linear(12, 3)

    def forward(self, x):
        return self.lin(torch.relu(self.inner(x)))


class MoE(nn.Module):
    """Experts stored as 3-D parameters [E, out, in], as transformers' Mixtral; dense soft routing."""

    class Experts(nn.Module):
        def __init__(self, experts=3, hidden=8, inner=12):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden) * 0.3)
            self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner) * 0.3)

        def forward(self, x, weights):  # x [T, H], weights [T, E]
            gate, up = torch.matmul(x.unsqueeze(0), self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
            out = torch.matmul(F.silu(gate) * up, self.down_proj.transpose(1, 2))  # [E, T, H]
            return (out * weights.T.unsqueeze(-1)).sum(0)

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 3)
        self.experts = MoE.Experts()
        self.lin = nn.Linear(8, 3)

    def forward(self, x):
        return self.lin(self.experts(x, torch.softmax(self.router(x), -1)))


def _input(shape, integer: int = 0):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, integer, shape, generator=g) if integer else torch.randn(shape, generator=g)


MODELS = {  # name: (builder, example input)
    "mlp": (MLP, lambda: _input((3, 10))),
    "norm_mlp": (NormMLP, lambda: _input((3, 10))),
    "conv1d": (Conv1dModel, lambda: _input((2, 4, 9))),
    "conv1d_grouped": (lambda: Conv1dModel(groups=2), lambda: _input((2, 4, 9))),
    "conv2d": (Conv2dModel, lambda: _input((2, 4, 6, 6))),
    "conv2d_grouped": (lambda: Conv2dModel(groups=2), lambda: _input((2, 4, 6, 6))),
    "conv3d": (Conv3dModel, lambda: _input((2, 3, 4, 4, 4))),
    "emb_conv1d": (EmbConv1D, lambda: _input((2, 5), integer=50)),
    "mha": (MHAModel, lambda: _input((2, 5, 16))),
    "mha_cross": (lambda: MHAModel(cross=True), lambda: _input((2, 5, 16))),
    "param_mlp": (ParamMLP, lambda: _input((3, 10))),
    "moe": (MoE, lambda: _input((5, 8))),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


# -- the cases: (model, config factory, PEFT can merge it) ------------------------------------

def lora(**kw):
    return lambda: LoraConfig(r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), **kw)


CASES = {
    "mlp-lora": ("mlp", lora(target_modules=["lin0"])),
    "mlp-lora-rslora-bias": ("mlp", lora(target_modules=["lin0", "lin1"], use_rslora=True, bias="lora_only")),
    "mlp-lora-patterns": ("mlp", lora(target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2},
                                      alpha_pattern={"lin0": 3})),
    "mlp-lora-pissa": ("mlp", lora(target_modules=["lin0", "lin1"], init_lora_weights="pissa")),
    "mlp-lora-olora": ("mlp", lora(target_modules=["lin0", "lin1"], init_lora_weights="olora", lora_dropout=0.1)),
    "mlp-lora-modules-to-save": ("mlp", lora(target_modules=["lin0"], modules_to_save=["lin1"])),
    "mlp-lora-bias": ("mlp", lora(target_modules=["lin0", "lin1"], lora_bias=True)),
    "mlp-dora": ("mlp", lora(target_modules=["lin0", "lin1"], use_dora=True)),
    "mlp-ia3": ("mlp", lambda: IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])),
    "mlp-loha": ("mlp", lambda: LoHaConfig(r=2, alpha=4, target_modules=["lin0", "lin1"])),
    "mlp-lokr": ("mlp", lambda: LoKrConfig(r=2, alpha=4, target_modules=["lin0", "lin1"])),
    "mlp-vera": ("mlp", lambda: VeraConfig(r=4, target_modules=["lin0"], projection_prng_key=1)),
    "norm_mlp-ln-tuning": ("norm_mlp", lambda: LNTuningConfig(target_modules=["norm"])),
    "conv1d-lora": ("conv1d", lora(target_modules=["conv", "lin"])),
    "mlp-loha-dropouts": ("mlp", lambda: LoHaConfig(r=2, alpha=4, target_modules=["lin0", "lin1"], rank_dropout=0.3,
                                                    module_dropout=0.2)),
    "conv2d-lokr-dropouts": ("conv2d", lambda: LoKrConfig(r=2, alpha=4, target_modules=["conv"], rank_dropout=0.3,
                                                          module_dropout=0.2, rank_dropout_scale=True)),
    "conv2d-loha-effective": ("conv2d", lambda: LoHaConfig(r=2, alpha=4, target_modules=["conv"],
                                                            use_effective_conv2d=True)),
    "conv1d-loha-effective": ("conv1d", lambda: LoHaConfig(r=2, alpha=4, target_modules=["conv"],
                                                            use_effective_conv2d=True)),
    "conv2d-lokr-effective": ("conv2d", lambda: LoKrConfig(r=1, alpha=4, target_modules=["conv"],
                                                            use_effective_conv2d=True)),
    # (LoKr use_effective_conv2d on a Conv1d fails inside PEFT 0.21's own kron: no reference to compare with)
    "mlp-lokr-decompose-both": ("mlp", lambda: LoKrConfig(r=1, alpha=4, target_modules=["lin0", "lin1"],
                                                          decompose_both=True)),
    "mlp-lokr-decompose-factor": ("mlp", lambda: LoKrConfig(r=2, alpha=4, target_modules=["lin0", "lin1"],
                                                            decompose_factor=2)),
    "conv2d-lokr-decompose-both-factor": ("conv2d", lambda: LoKrConfig(r=1, alpha=4, target_modules=["conv"],
                                                                       decompose_both=True, decompose_factor=4)),
    "conv1d-lokr": ("conv1d", lambda: LoKrConfig(r=2, alpha=4, target_modules=["conv"])),
    "conv1d-loha": ("conv1d", lambda: LoHaConfig(r=2, alpha=4, target_modules=["conv"])),
    "conv1d_grouped-lora": ("conv1d_grouped", lora(target_modules=["conv"])),
    "conv1d_grouped-lokr": ("conv1d_grouped", lambda: LoKrConfig(r=2, alpha=4, target_modules=["conv"])),
    "conv1d_grouped-lokr-low-rank": ("conv1d_grouped", lambda: LoKrConfig(r=1, alpha=4, target_modules=["conv"])),
    "conv2d-lora": ("conv2d", lora(target_modules=["conv"])),
    "conv2d-lora-bias": ("conv2d", lora(target_modules=["conv"], lora_bias=True)),
    "conv2d-dora": ("conv2d", lora(target_modules=["conv", "lin"], use_dora=True)),
    "conv1d-dora": ("conv1d", lora(target_modules=["conv"], use_dora=True)),
    "conv3d-dora": ("conv3d", lora(target_modules=["conv"], use_dora=True)),
    "conv2d-loha": ("conv2d", lambda: LoHaConfig(r=2, alpha=4, target_modules=["conv"])),
    "conv2d-lokr": ("conv2d", lambda: LoKrConfig(r=2, alpha=4, target_modules=["conv"])),
    "conv2d-ia3": ("conv2d", lambda: IA3Config(target_modules=["conv", "lin"], feedforward_modules=["lin"])),
    "conv2d-ia3-feedforward": ("conv2d", lambda: IA3Config(target_modules=["conv"], feedforward_modules=["conv"])),
    "conv2d_grouped-ia3-feedforward": ("conv2d_grouped", lambda: IA3Config(target_modules=["conv"],
                                                                           feedforward_modules=["conv"])),
    "conv3d-ia3": ("conv3d", lambda: IA3Config(target_modules=["conv", "lin"], feedforward_modules=["lin"])),
    "conv2d_grouped-lora": ("conv2d_grouped", lora(target_modules=["conv"])),
    "conv2d_grouped-lokr": ("conv2d_grouped", lambda: LoKrConfig(r=2, alpha=4, target_modules=["conv"])),
    "conv3d-lora": ("conv3d", lora(target_modules=["conv"])),
    "emb_conv1d-lora": ("emb_conv1d", lora(target_modules=["emb", "conv1d"])),
    "emb_conv1d-dora": ("emb_conv1d", lora(target_modules=["emb", "conv1d"], use_dora=True)),
    "emb_conv1d-trainable-tokens": ("emb_conv1d", lambda: TrainableTokensConfig(target_modules=["emb"],
                                                                                token_indices=[15, 21, 4])),
    "emb_conv1d-lora-trainable-token-indices": ("emb_conv1d", lora(target_modules=["conv1d"],
                                                                   trainable_token_indices={"emb": [15, 38]})),
    "emb_conv1d-ia3": ("emb_conv1d", lambda: IA3Config(target_modules=["conv1d", "lin"],
                                                       feedforward_modules=["lin"])),
    "mha-lora": ("mha", lora(target_modules=["mha"])),
    "mha-lora-and-linear": ("mha", lora(target_modules=["mha", "lin"], use_rslora=True)),
    "mha_cross-lora": ("mha_cross", lora(target_modules=["mha"], lora_dropout=0.1)),
    "param_mlp-lora": ("param_mlp", lora(target_modules=[], target_parameters=["inner.weight"])),
    "moe-lora-experts": ("moe", lora(r=2, target_modules=[], target_parameters=["experts.gate_up_proj",
                                                                                 "experts.down_proj"])),
    "moe-lora-experts-and-router": ("moe", lora(r=2, target_modules=["router"],
                                                target_parameters=["experts.down_proj"])),
}
# PEFT refuses to merge LoRA on grouped convs; peftc keeps those adapters as graph ops when merged.
NOT_MERGEABLE_IN_PEFT = {"conv1d_grouped-lora", "conv2d_grouped-lora"}


@torch.no_grad()
def randomize_trainable(module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if ".out_proj.lora_B" in name:
            # PEFT 0.21 adds nn.MultiheadAttention's out_proj update twice (huggingface/peft#3774):
            # comparing with PEFT, keep that update zero; test_attention_out_proj_is_added_once covers it.
            p.zero_()


def trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft(case, tmp_path):
    name, make_config = CASES[case]
    x = MODELS[name][1]()
    reference = get_peft_model(build(name), make_config())
    randomize_trainable(reference)
    reference.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = reference(x)
        assert not torch.allclose(expected, build(name)(x), **TOL)  # the adapter does something

    cm = peftc.from_peft(build(name), tmp_path / "peft", example_inputs=(x,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(x), expected, **TOL)
    assert trainable(cm) == trainable(reference)

    merged = cm.merged()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, **TOL)
    if case not in NOT_MERGEABLE_IN_PEFT:
        with torch.no_grad():
            torch.testing.assert_close(merged(x), reference.merge_and_unload()(x), **TOL)

    cm.save_adapter(tmp_path / "out", format="peft")
    reloaded = PeftModel.from_pretrained(build(name), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, **TOL)


# (nn.MultiheadAttention is left out: PEFT 0.21 doubles its out_proj update, so its gradients differ.)
STEP_CASES = ["mlp-lora", "mlp-lora-pissa", "norm_mlp-ln-tuning", "conv2d_grouped-lora", "emb_conv1d-lora",
              "param_mlp-lora", "moe-lora-experts", "conv1d_grouped-lokr"]


@pytest.mark.parametrize("case", STEP_CASES)
def test_one_optimizer_step_matches_peft(case, tmp_path):
    """Same gradients: after one SGD step on the same loss, outputs still agree."""
    name, make_config = CASES[case]
    x = MODELS[name][1]()
    reference = get_peft_model(build(name), make_config())
    randomize_trainable(reference)
    reference.eval().save_pretrained(tmp_path / "peft")
    cm = peftc.from_peft(build(name), tmp_path / "peft", example_inputs=(x,)).eval()
    for module in (reference, cm):
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        module(x).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        moved = reference(x)
        torch.testing.assert_close(cm(x), moved, **TOL)
        reference.load_adapter(tmp_path / "peft", adapter_name="before")
        reference.set_adapter("before")
        assert not torch.allclose(reference(x), moved, **TOL)  # the step changed something


def test_attention_out_proj_is_added_once(tmp_path):
    """LoRA on nn.MultiheadAttention is W + s·B A on in_proj_weight and on out_proj.weight, once each
    (PEFT 0.21 adds the out_proj update twice; peftc computes what PEFT's fix, #3774, computes)."""
    reference = get_peft_model(build("mha"), LoraConfig(r=4, lora_alpha=8, target_modules=["mha"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in reference.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    reference.save_pretrained(tmp_path)
    x = MODELS["mha"][1]()
    cm = peftc.from_peft(build("mha"), tmp_path, example_inputs=(x,)).eval()
    eager = build("mha")
    inner = reference.base_model.model.mha
    with torch.no_grad():
        pairs = ((eager.mha.in_proj_weight, inner), (eager.mha.out_proj.weight, inner.base_layer.out_proj))
        for weight, layer in pairs:
            weight += layer.get_delta_weight("default")
        torch.testing.assert_close(cm(x), eager(x), **TOL)


# Native spec entries (written for peftc, not read from PEFT): saved for PEFT, PEFT computes the same.
NATIVE = {
    "mlp-lora-bias": ("mlp", {"method": "lora", "targets": ["lin0", "lin1"], "r": 2, "alpha": 4, "lora_bias": True}),
    "moe-target-parameters": ("moe", {"method": "lora", "targets": ["router"], "r": 2,
                                      "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}),
    "mha_cross-lora": ("mha_cross", {"method": "lora", "targets": ["mha"], "r": 2}),
    "conv1d_grouped-lokr": ("conv1d_grouped", {"method": "lokr", "targets": ["conv"], "r": 2}),
    "mlp-lokr-decompose": ("mlp", {"method": "lokr", "targets": ["lin0"], "r": 1, "decompose_both": True,
                                   "decompose_factor": 4}),
    "norm_mlp-ln-tuning": ("norm_mlp", {"method": "ln_tuning", "targets": ["norm"]}),
    "conv2d-loha-effective": ("conv2d", {"method": "loha", "targets": ["conv"], "r": 2, "use_effective_conv2d": True,
                                         "rank_dropout": 0.2, "module_dropout": 0.1}),
    "conv2d-dora": ("conv2d", {"method": "dora", "targets": ["conv"], "r": 2}),
    "conv2d-ia3": ("conv2d", {"method": "ia3", "targets": ["conv", "lin"], "feedforward": ["lin"]}),
    "mlp-lora-olora": ("mlp", {"method": "lora", "targets": ["lin0"], "r": 2, "init": "olora"}),
    "emb_conv1d-trainable-tokens": ("emb_conv1d", {"method": "trainable_tokens", "targets": ["emb"],
                                                   "indices": [42, 11]}),
}


@pytest.mark.parametrize("case", list(NATIVE))
def test_native_spec_saves_what_peft_computes(case, tmp_path):
    name, entry = NATIVE[case]
    x = MODELS[name][1]()
    cm = peftc.compile(build(name), {"adapters": [entry]}, example_inputs=(x,)).eval()
    randomize_trainable(cm)
    with torch.no_grad():
        for n, p in cm.named_parameters():
            if "out_proj" in n and n.endswith(".B"):
                p.zero_()  # PEFT 0.21 doubles nn.MultiheadAttention's out_proj update (see above)
        expected = cm(x)
        assert not torch.allclose(expected, build(name)(x), **TOL)
    cm.save_adapter(tmp_path / "out", format="peft")
    reloaded = PeftModel.from_pretrained(build(name), tmp_path / "out").eval()
    assert trainable(PeftModel.from_pretrained(build(name), tmp_path / "out", is_trainable=True)) == trainable(cm)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_start_as_the_model_and_leave_it_bit_identical(init):
    model = build("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = MODELS["mlp"][1]()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["lin0"], "r": 2, "init": init}]},
                       example_inputs=(x,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), **TOL)  # W - s·B0 A0 + s·B0 A0 = W
        assert cm.adapter_state_dict()["lin0.lora.A"].abs().sum() > 0  # A, B from the weight, not zero
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    reference = get_peft_model(build("mlp"), LoraConfig(r=2, lora_alpha=8, target_modules=["lin0"],
                                                       init_lora_weights=init))
    peft_b = reference.base_model.model.lin0.lora_B["default"].weight
    torch.testing.assert_close(cm.adapter_state_dict()["lin0.lora.B"], peft_b, **TOL)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_rank_and_module_dropout_act_in_training_only(method):
    """In training, rank_dropout zeroes rows of ΔW (output features of the update) and module_dropout
    drops the whole update for a call; in eval neither does anything (equality with PEFT: the table)."""
    x = MODELS["mlp"][1]()
    entry = {"method": method, "targets": ["lin1"], "r": 2, "rank_dropout": 0.5}
    cm = peftc.compile(build("mlp"), {"adapters": [entry]}, example_inputs=(x,))
    randomize_trainable(cm)
    base = build("mlp")(x).detach()
    cm.eval()
    full = (cm(x) - base).detach()
    assert (full.abs() > 1e-6).all()
    cm.train()
    torch.manual_seed(1)
    update = (cm(x) - base).detach()
    dropped = (update.abs() < 1e-7).all(dim=0)  # a dropped row of ΔW: that output feature gets no update
    assert dropped.any() and not dropped.all()
    module = {"method": method, "targets": ["lin1"], "r": 2, "module_dropout": 0.5}
    cm = peftc.compile(build("mlp"), {"adapters": [module]}, example_inputs=(x,)).train()
    randomize_trainable(cm)
    skipped = [torch.allclose(cm(x), base, atol=1e-7) for _ in range(20)]
    assert any(skipped) and not all(skipped)
