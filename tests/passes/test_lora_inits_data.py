"""LoRA's weight- and data-dependent inits against the real `peft` package: CorDA and EVA (calibration
data run through the base graph), LoftQ (a quantized base owned by the compiled model) and PiSSA by
randomized SVD. Every case also checks the user's model is left bit-identical."""

from __future__ import annotations

import copy
import json
import dataclasses
import sys
import types

import pytest
import torch
from torch import nn

import peftc
from peftc.ir import weight_codec
from tests.families import FAMILIES
from tests.model_state import ModelState
from tests.peft_reference import adapter_module, trainable_count

peft = pytest.importorskip("peft")
from peft import (EvaConfig, LoraConfig, PeftModel, get_peft_model,  # noqa: E402
                  initialize_lora_eva_weights)
from peft.utils.incremental_pca import IncrementalPCA  # noqa: E402
from peft.utils.loftq_utils import _low_rank_decomposition  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


def _corda_module():
    """peft.tuners.lora.corda imports attrs' `dataclass` only to declare a record; attrs is not installed
    here, so the standard library's stands in for it."""
    if "attr" not in sys.modules:
        try:
            import attr  # noqa: F401
        except ImportError:
            sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora import corda
    return corda


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, out: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1 = nn.Linear(d_in, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class BareMatmul(nn.Module):
    """MLP's weights read by `x @ W.T` (Falcon's FalconLinear): no nn.Linear for a forward hook to see."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.w0, self.b0 = nn.Parameter(mlp.lin0.weight.detach().clone()), nn.Parameter(mlp.lin0.bias.detach().clone())
        self.lin1 = copy.deepcopy(mlp.lin1)

    def forward(self, x):
        return self.lin1(torch.relu(x @ self.w0.T + self.b0))


def batches(count: int = 4, rows: int = 8, d_in: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """Inputs with a decaying spectrum, so principal directions are well separated."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) * torch.linspace(3, 0.1, d_in)
    return [torch.randn(1, rows, d_in, generator=g) @ mix for _ in range(count)]


X = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))
LORA = {"method": "lora", "targets": ["lin0", "lin1"], "r": 4, "alpha": 8}


def compile_checked(model, spec, **kwargs):
    """Compile, asserting the user's model comes out bit-identical (weights, flags, modes, hooks)."""
    before = ModelState.of(model)
    cm = peftc.compile(model, spec, **kwargs)
    before.assert_same(model)
    return cm


def peft_corda(model, method: str, data) -> nn.Module:
    corda = _corda_module()
    reference = copy.deepcopy(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights="corda",
                        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method))
    corda.preprocess_corda(reference, config, run_model=lambda: [reference(b) for b in data])
    return get_peft_model(reference, config)


def peft_factors(reference, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = reference.base_model.model.get_submodule(name)
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


# -- CorDA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_peft(method):
    model, data = MLP(), batches()
    cm = compile_checked(model, {"adapters": [{**LORA, "init": "corda", "corda_method": method}]},
                         example_inputs=(X,), calibration=data)
    reference = peft_corda(model, method, data)
    assert trainable_count(cm) == trainable_count(reference) == 4 * (16 + 32) + 4 * (32 + 6)  # A and B, r = 4
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights="corda",
                        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method))
    read = peftc.from_peft(model, config, example_inputs=(X,), calibration=data)  # PEFT's config, same start
    torch.testing.assert_close(read.adapter_state_dict()["lin1.lora.B"], cm.adapter_state_dict()["lin1.lora.B"])
    own = cm.adapter_state_dict()
    for name in ("lin0", "lin1"):
        a, b = peft_factors(reference, name)
        torch.testing.assert_close(own[f"{name}.lora.A"], a, **TOL)
        torch.testing.assert_close(own[f"{name}.lora.B"], b, **TOL)
        assert own[f"{name}.lora.A"].abs().sum() > 0
    with torch.no_grad():  # W - s·B0 A0 + s·B A = W at the start, in both
        torch.testing.assert_close(cm(X), model(X), **TOL)
        torch.testing.assert_close(cm(X), reference(X), **TOL)
        module = adapter_module(cm, "lin0", "lora")  # the residual base, as PEFT writes it into its model
        residual = model.lin0.weight - module.scale * module.B0 @ module.A0
        torch.testing.assert_close(residual, reference.base_model.model.lin0.base_layer.weight, **TOL)


def test_corda_residual_base_and_one_step_equal_peft():
    """After one SGD step the adapters moved the same way: the residual base (W - s·B0 A0) is PEFT's."""
    model, data = MLP(), batches()
    cm = compile_checked(model, {"adapters": [{**LORA, "init": "corda"}]}, example_inputs=(X,), calibration=data)
    reference = peft_corda(model, "ipm", data)
    for module in (reference, cm):
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        module(X).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        moved = cm(X)
        torch.testing.assert_close(moved, reference(X), **TOL)
        assert not torch.allclose(moved, model(X), **TOL)
        merged = cm.merged()
        torch.testing.assert_close(merged(X), moved, **TOL)
        reference.merge_adapter()
        for name in ("lin0", "lin1"):
            torch.testing.assert_close(merged.graph_module.get_parameter(f"{name}.weight"),
                                       reference.base_model.model.get_submodule(name).base_layer.weight, **TOL)


def test_calibration_sees_ops_not_modules():
    """CorDA on `x @ W.T` (no nn.Linear to hook) starts exactly as on the same weights in an nn.Linear;
    a function run(model) gives what the iterable of batches gives."""
    mlp, data = MLP(), batches()
    spec = {"adapters": [{**LORA, "targets": ["lin1"], "target_parameters": ["w0"], "init": "corda"}]}
    linear = compile_checked(mlp, {"adapters": [{**LORA, "init": "corda"}]}, example_inputs=(X,), calibration=data)
    bare_model = BareMatmul(mlp)
    bare = compile_checked(bare_model, spec, example_inputs=(X,),
                           calibration=lambda model: [model(b) for b in data])
    bare_sd, linear_sd = bare.adapter_state_dict(), linear.adapter_state_dict()
    key = next(k for k in bare_sd if k.endswith(".A") and "lin1" not in k)
    torch.testing.assert_close(bare_sd[key], linear_sd["lin0.lora.A"], **TOL)
    torch.testing.assert_close(bare_sd["lin1.lora.B"], linear_sd["lin1.lora.B"], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(bare(X), bare_model(X), **TOL)


def test_corda_on_llama_with_dict_batches_equals_peft():
    family = FAMILIES["llama"]
    model = family.build()
    data = [family.inputs(1, 6 + i) for i in range(3)]  # PEFT's hook squeezes a batch of one
    entry = {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8, "init": "corda"}
    cm = compile_checked(model, {"adapters": [entry]}, calibration=data)
    corda = _corda_module()
    reference = copy.deepcopy(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="corda")
    corda.preprocess_corda(reference, config, run_model=lambda: [reference(**b) for b in data])
    reference = get_peft_model(reference, config)
    a, _ = peft_factors(reference, "model.layers.1.self_attn.v_proj")
    torch.testing.assert_close(cm.adapter_state_dict()["model.layers.1.self_attn.v_proj.lora.A"], a, **TOL)
    inputs = family.inputs(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(cm(**inputs).logits, reference(**inputs).logits, atol=1e-4, rtol=1e-4)


def test_corda_saved_for_peft_and_read_back(tmp_path):
    """save_adapter(format='peft') writes init 'corda'; PEFT (preprocess_corda on the same data, then
    from_pretrained) and peftc.from_peft (with that data) both compute what the trained model does."""
    model, data = MLP(), batches()
    cm = compile_checked(model, {"adapters": [{**LORA, "init": "corda"}]}, example_inputs=(X,), calibration=data)
    with torch.no_grad():
        for name, p in cm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # "trained"
        expected = cm(X)
    cm.save_adapter(tmp_path, format="peft")
    corda = _corda_module()
    base = copy.deepcopy(model)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert config.init_lora_weights == "corda" and config.corda_config.corda_method == "ipm"
    corda.preprocess_corda(base, config, run_model=lambda: [base(b) for b in data])
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(base, tmp_path)(X), expected, **TOL)
        again = peftc.from_peft(model, tmp_path, example_inputs=(X,), calibration=data)
        torch.testing.assert_close(again(X), expected, **TOL)
    with pytest.raises(peftc.SpecError, match=r"adapters\[0\].init: 'corda' .* calibration"):
        peftc.from_peft(model, tmp_path, example_inputs=(X,))  # the residual base needs the same data


@pytest.mark.parametrize("entry", [{"init": "corda"}, {"init": "pissa", "pissa_niter": 2},
                                   {"init": "olora", "rslora": True}])
def test_residual_inits_save_as_plain_lora_on_the_original_weights(entry, tmp_path):
    """format='peft_lora' writes what PEFT's path_initial_model_for_weight_conversion writes: rank 2r,
    [A; A0] and [B, -B0], init True; PEFT loads it onto the untouched model, with no data, no SVD."""
    model, data = MLP(), batches()
    calibration = {"calibration": data} if entry["init"] == "corda" else {}
    cm = compile_checked(model, {"adapters": [{**LORA, **entry}]}, example_inputs=(X,), **calibration)
    with torch.no_grad():
        for p in cm.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.1)
        expected = cm(X)
    cm.save_adapter(tmp_path, format="peft_lora")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X), expected, **TOL)
        torch.testing.assert_close(peftc.from_peft(model, tmp_path, example_inputs=(X,))(X), expected, **TOL)


# -- EVA --------------------------------------------------------------------------------------

def eva_batches() -> list[torch.Tensor]:
    return [b.reshape(-1, 16) for b in batches(count=6, rows=64)]


def test_eva_is_the_principal_directions_of_the_inputs():
    """A = the r leading principal directions of every calibration row, B = 0: what PEFT's incremental
    PCA computes when it keeps every component (exactly), and what its early-stopped fit approaches."""
    model, data = MLP(), eva_batches()
    cm = compile_checked(model, {"adapters": [{**LORA, "init": "eva"}]}, example_inputs=(X,), calibration=data)
    own = cm.adapter_state_dict()
    pca = IncrementalPCA(n_components=16)
    for batch in data:
        pca.partial_fit(batch)
    torch.testing.assert_close(own["lin0.lora.A"], pca.components_[:4].float(), atol=1e-4, rtol=1e-4)
    assert own["lin0.lora.B"].abs().sum() == 0 and own["lin1.lora.A"].abs().sum() > 0
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"],
                                                                init_lora_weights="eva", eva_config=EvaConfig(rho=1.0)))
    initialize_lora_eva_weights(reference, data, forward_fn=lambda m, b: m(b), prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    peft_a, _ = peft_factors(reference, "lin0")
    leading = torch.nn.functional.cosine_similarity(own["lin0.lora.A"][:2], peft_a[:2]).abs()
    assert (leading > 0.95).all(), leading
    with torch.no_grad():
        torch.testing.assert_close(cm(X), model(X), **TOL)


def test_eva_config_from_peft_and_saved_adapter_loads_as_lora(tmp_path):
    model, data = MLP(), eva_batches()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0"], init_lora_weights="eva",
                        eva_config=EvaConfig(rho=1.0))
    cm = peftc.from_peft(model, config, example_inputs=(X,), calibration=data)
    assert cm.spec.adapters[0].init == "eva"
    with torch.no_grad():
        cm.adapter_state_dict()["lin0.lora.B"].normal_()
        expected = cm(X)
    cm.save_adapter(tmp_path, format="peft")
    with torch.no_grad():  # PEFT reloads EVA's A and the trained B over the untouched base
        torch.testing.assert_close(PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)(X), expected, **TOL)
        torch.testing.assert_close(peftc.from_peft(model, tmp_path, example_inputs=(X,))(X), expected, **TOL)
    with pytest.raises(peftc.SpecError, match="eva_config.whiten"):
        peftc.from_peft(model, dataclasses.replace(config, eva_config=EvaConfig(whiten=True)), example_inputs=(X,),
                        calibration=data)


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1, self.lin2 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 6)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def test_eva_rank_redistribution_equals_peft(tmp_path):
    """rho = 2 (PEFT's default): the budget 3·r goes to the directions explaining the most variance;
    lin0's steep input spectrum gives it fewer, lin1 more, with alpha scaled to keep alpha / r. The
    ranks land in the spec, so the PEFT checkpoint carries them and PEFT loads it."""
    model, targets = Deep(), ["lin0", "lin1", "lin2"]
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 16, generator=g) * torch.logspace(0, -6, 16)
    data = [torch.randn(64, 16, generator=g) @ mix for _ in range(8)]
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                init_lora_weights="eva"))  # rho = 2.0
    initialize_lora_eva_weights(reference, data, forward_fn=lambda m, b: m(b), prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    entry = {"method": "lora", "targets": targets, "r": 4, "alpha": 8, "init": "eva", "eva_rho": 2.0}
    cm = compile_checked(model, {"adapters": [entry]}, example_inputs=(X,), calibration=data)
    resolved = cm.spec.adapters[0]
    assert resolved.rank_pattern == reference.peft_config["default"].rank_pattern == {"lin0": 3, "lin1": 5}
    assert resolved.alpha_pattern == reference.peft_config["default"].alpha_pattern
    assert trainable_count(cm) == trainable_count(reference)
    with torch.no_grad():
        for p in cm.adapter_state_dict().values():
            p.add_(0.05)
        expected = cm(X)
    cm.save_adapter(tmp_path, format="peft")
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)(X), expected, **TOL)


def test_eva_leaves_out_padding_as_peft_does():
    """Dict batches: rows where attention_mask is 0 (or labels are -100) are not EVA's data. With right
    padding and causal attention the kept rows are those of the unpadded batch, so A is the same."""
    family = FAMILIES["llama"]
    model = family.build()
    short = [family.inputs(1, 5 + i) for i in range(3)]
    padded = []
    for batch in short:
        ids = batch["input_ids"]
        mask = torch.ones(1, ids.shape[1] + 3, dtype=torch.long)
        mask[:, ids.shape[1]:] = 0
        padded.append({"input_ids": torch.cat([ids, torch.full((1, 3), 7)], 1), "attention_mask": mask})
    entry = {"method": "lora", "targets": ["v_proj"], "r": 2, "alpha": 4, "init": "eva"}
    plain = compile_checked(model, {"adapters": [entry]}, calibration=short).adapter_state_dict()
    masked = compile_checked(model, {"adapters": [entry]}, calibration=padded).adapter_state_dict()
    key = "model.layers.1.self_attn.v_proj.lora.A"
    torch.testing.assert_close(masked[key], plain[key], atol=1e-4, rtol=1e-4)
    unmasked = [{"input_ids": b["input_ids"]} for b in padded]
    assert not torch.allclose(compile_checked(model, {"adapters": [entry]}, calibration=unmasked)
                              .adapter_state_dict()[key], plain[key], atol=1e-3)


# -- LoftQ ------------------------------------------------------------------------------------

def dequantized_base(cm, param: str) -> torch.Tensor:
    return cm.graph_module.get_submodule(f"quantized.{param}").dequantize()


@pytest.mark.parametrize("bits, fmt", [(4, "nf4"), (8, "int8")])
def test_loftq_base_is_quantized_and_corrected_as_peft_computes(bits, fmt):
    """One LoftQ iteration: the base is quant(W), and A, B are what PEFT's low-rank step makes of
    W - quant(W) (R and L, not divided by the scale); together they beat quant(W) alone."""
    model = MLP(d_in=64)
    x = torch.randn(3, 64)
    entry = {**LORA, "alpha": 4, "init": "loftq", "loftq_bits": bits}
    cm = compile_checked(model, {"adapters": [entry]}, example_inputs=(x,))
    w = model.lin0.weight.detach()
    base = dequantized_base(cm, "lin0.weight")
    assert cm.graph_module.get_submodule("quantized.lin0.weight").fmt == fmt
    torch.testing.assert_close(base, weight_codec.dequantize(weight_codec.quantize(w, fmt, 64), fmt, 32, 64, 64))
    decomposition = _low_rank_decomposition(w - base, reduced_rank=4)
    own = cm.adapter_state_dict()
    torch.testing.assert_close(own["lin0.lora.A"], decomposition["R"], **TOL)
    torch.testing.assert_close(own["lin0.lora.B"], decomposition["L"], **TOL)
    corrected = base + own["lin0.lora.B"] @ own["lin0.lora.A"]
    assert (w - corrected).norm() < (w - base).norm()
    with torch.no_grad():  # merged, the weight is Q + s·B A (s = 1 here)
        merged = cm.merged()
        torch.testing.assert_close(merged(x), cm(x), **TOL)
        torch.testing.assert_close(merged.graph_module.get_parameter("lin0.weight"), corrected, **TOL)


def test_loftq_iterations_reduce_the_error_and_compose_with_qlora():
    model = MLP(d_in=64)
    x = torch.randn(3, 64)
    w = model.lin0.weight.detach()

    def error(cm):
        own = cm.adapter_state_dict()
        return (w - dequantized_base(cm, "lin0.weight") - own["lin0.lora.B"] @ own["lin0.lora.A"]).norm()

    one = compile_checked(model, {"adapters": [{**LORA, "alpha": 4, "init": "loftq"}]}, example_inputs=(x,))
    five = compile_checked(model, {"adapters": [{**LORA, "alpha": 4, "init": "loftq", "loftq_iter": 5}]},
                           example_inputs=(x,))
    assert error(five) < error(one)
    qlora = compile_checked(model, {"adapters": [{**LORA, "alpha": 4, "init": "loftq"}],
                                    "quantize": {"bits": 4, "format": "nf4"}}, example_inputs=(x,))
    torch.testing.assert_close(qlora.adapter_state_dict()["lin0.lora.A"], one.adapter_state_dict()["lin0.lora.A"])
    with torch.no_grad():
        torch.testing.assert_close(qlora(x), one(x), **TOL)
    int4 = compile_checked(model, {"adapters": [{**LORA, "alpha": 4, "init": "loftq", "loftq_iter": 2}],
                                   "quantize": {"bits": 4, "format": "int"}}, example_inputs=(x,))
    assert int4.graph_module.get_submodule("quantized.lin0.weight").fmt == "int4"
    assert error(int4) < (w - dequantized_base(int4, "lin0.weight")).norm()
    with pytest.raises(peftc.SpecError, match=r"adapters\[0\].loftq_bits"):
        peftc.compile(model, {"adapters": [{**LORA, "init": "loftq", "loftq_bits": 8}],
                              "quantize": {"bits": 4, "format": "nf4"}}, example_inputs=(x,))


def test_loftq_nf4_is_bitsandbytes_nf4():
    """PEFT's LoftQ quantizes with bitsandbytes (on CUDA); peftc's NF4 round trip gives its numbers."""
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    theirs = bnb.functional.dequantize_4bit(packed, state)
    ours = weight_codec.dequantize(weight_codec.quantize(w, "nf4", 64), "nf4", 32, 128, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_loftq_config_maps_both_ways(tmp_path):
    model = MLP(d_in=64)
    x = torch.randn(3, 64)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["lin0"],  # LoraConfig wants scipy
              "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 2}}
    cm = peftc.from_peft(model, config, example_inputs=(x,))
    entry = cm.spec.adapters[0]
    assert (entry.init, entry.loftq_bits, entry.loftq_iter) == ("loftq", 4, 2)
    with torch.no_grad():
        cm.adapter_state_dict()["lin0.lora.B"].add_(0.1)
        expected = cm(x)
    cm.save_adapter(tmp_path, format="peft")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    with torch.no_grad():  # the base is recomputed from W, as PEFT's from_pretrained does
        torch.testing.assert_close(peftc.from_peft(model, tmp_path, example_inputs=(x,))(x), expected, **TOL)


# -- PiSSA by randomized SVD ------------------------------------------------------------------

def test_pissa_niter_starts_as_the_model_and_spans_peft_subspace(tmp_path):
    """Randomized SVD differs run to run, so compare what is deterministic: W_res + s·B A = W, and
    B A is the rank-r part of W that PEFT's pissa_niter_16 finds (to its convergence)."""
    model = MLP()
    with torch.no_grad():  # a spectrum with a gap after the r-th value, which the randomized SVD resolves
        u, _, vh = torch.linalg.svd(model.lin0.weight, full_matrices=False)
        model.lin0.weight.copy_(u @ torch.diag(torch.logspace(0, -3, 16)) @ vh)
    cm = compile_checked(model, {"adapters": [{**LORA, "init": "pissa", "pissa_niter": 16}]}, example_inputs=(X,))
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"],
                                                                init_lora_weights="pissa_niter_16"))
    own = cm.adapter_state_dict()
    a, b = peft_factors(reference, "lin0")
    torch.testing.assert_close(own["lin0.lora.B"] @ own["lin0.lora.A"], b @ a, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(cm(X), model(X), **TOL)
        torch.testing.assert_close(reference(X), model(X), **TOL)
    cm.save_adapter(tmp_path, format="peft")
    assert peft.PeftConfig.from_pretrained(tmp_path).init_lora_weights == "pissa_niter_16"
    again = peftc.from_peft(model, tmp_path, example_inputs=(X,))
    assert (again.spec.adapters[0].init, again.spec.adapters[0].pissa_niter) == ("pissa", 16)


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, kwargs, match", [
    ({"init": "corda"}, {}, r"adapters\[0\].init: 'corda' .* calibration=batches"),
    ({"init": "eva"}, {}, r"adapters\[0\].init: 'eva'"),
    ({}, {"calibration": [X]}, "calibration: no adapter entry reads calibration data"),
    ({"init": "corda"}, {"calibration": []}, "calibration: the data holds no batches"),
    ({"init": "corda"}, {"calibration": 3}, "calibration: expected an iterable"),
    ({"init": "eva", "r": 4}, {"calibration": [X[:2]]}, "EVA needs at least r=4 input rows"),
    ({"pissa_niter": 4}, {}, r"adapters\[0\].pissa_niter: applies to init 'pissa'"),
    ({"init": "loftq", "corda_method": "kpm"}, {}, r"adapters\[0\].corda_method: applies to init 'corda'"),
    ({"init": "pissa", "pissa_niter": 10 ** 6}, {}, r"adapters\[0\].pissa_niter: each iteration is an SVD"),
])
def test_errors_name_the_field(entry, kwargs, match):
    model = MLP()
    before = ModelState.of(model)
    with pytest.raises(peftc.SpecError, match=match):
        peftc.compile(model, {"adapters": [{**LORA, **entry}]}, example_inputs=(X,), **kwargs)
    before.assert_same(model)


def test_data_inits_refuse_conv_sites():
    conv = FAMILIES["convnet"]
    with pytest.raises(peftc.SpecError, match=r"adapters\[0\].init: 'corda' is computed from a linear weight"):
        peftc.compile(conv.build(), {"adapters": [{"method": "lora", "targets": ["conv1"], "r": 2, "init": "corda"}]},
                      example_inputs=conv.example_inputs(), calibration=[conv.example_inputs()])


def test_serving_refuses_inits_that_change_the_base(tmp_path):
    model = MLP()
    cm = compile_checked(model, {"adapters": [{**LORA, "init": "pissa"}]}, example_inputs=(X,))
    with pytest.raises(peftc.SpecError, match=r"adapters\[0\].init is 'pissa', which changes the base"):
        peftc.serve_adapters(model, {"a": cm}, example_inputs=(X,))
    with torch.no_grad():
        for p in cm.adapter_state_dict().values():
            p.add_(0.1)
    cm.save_adapter(tmp_path, format="peft_lora")  # the plain-LoRA form serves
    served = peftc.serve_adapters(model, {"a": tmp_path}, example_inputs=(X,))
    with torch.no_grad():
        torch.testing.assert_close(served(X, adapter_ids=["a"] * 3), cm(X), **TOL)
        assert not torch.allclose(cm(X), model(X), **TOL)
