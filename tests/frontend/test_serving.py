"""serve_adapters: one base, several LoRA adapters, each batch row its own; checked against HF PEFT's
mixed-adapter batches, against each adapter alone, and (training) against single-adapter compiled models."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, compile_family, compile_family_specs, logits, randomize_adapters

import peftc
from peftc import SpecError

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)

# Three adapters per family: different ranks, alphas and targets (rslora, rank_pattern, GPT-2's Conv1D).
ADAPTERS = {
    "llama": {
        "sql": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "chat": dict(r=2, lora_alpha=5, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], use_rslora=True),
        "math": dict(r=8, lora_alpha=4, target_modules=["v_proj", "up_proj", "gate_proj"], rank_pattern={"gate_proj": 3}),
    },
    "gpt2": {
        "sql": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
        "chat": dict(r=2, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        "math": dict(r=6, lora_alpha=3, target_modules=["c_fc"], fan_in_fan_out=True, use_rslora=True),
    },
}
ROWS = ["sql", "__base__", "math", "chat", "sql"]  # PEFT's names; peftc also takes None or -1 for the base


@torch.no_grad()
def _randomize_lora(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module", params=list(ADAPTERS))
def served(request, tmp_path_factory):
    """(family, PEFT model holding the 3 adapters, peftc ServedModel from the saved PEFT folders)."""
    family = FAMILIES[request.param]
    configs = ADAPTERS[request.param]
    names = list(configs)
    pm = get_peft_model(family.build(), LoraConfig(**configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, LoraConfig(**configs[name]))
    _randomize_lora(pm, seed=1)
    pm.eval()
    folder = tmp_path_factory.mktemp(request.param)
    pm.save_pretrained(folder)
    mm = peftc.serve_adapters(family.build(), {name: folder / name for name in names},
                              example_kwargs=family.inputs(2, 3))  # the tests' call signature: one capture
    return family, pm, mm


@pytest.mark.parametrize("seq", [6, 1], ids=["prefill_sgmv", "decode_bgmv"])
def test_mixed_batch_equals_peft(served, seq):
    family, pm, mm = served
    inputs = family.inputs(len(ROWS), seq)
    with torch.no_grad():
        want = logits(pm(**inputs, adapter_names=ROWS))
        got = logits(mm(**inputs, adapter_ids=[None if r == "__base__" else r for r in ROWS]))
    torch.testing.assert_close(got, want, **TOL)


def test_each_row_equals_its_adapter_alone(served):
    family, pm, mm = served
    inputs = family.inputs(len(ROWS), 5)
    with torch.no_grad():
        got = logits(mm(**inputs, adapter_ids=torch.tensor([mm.adapter_names.index(r) if r in mm.adapter_names
                                                             else -1 for r in ROWS])))
        for name in mm.adapter_names:
            pm.set_adapter(name)
            rows = [i for i, r in enumerate(ROWS) if r == name]
            torch.testing.assert_close(got[rows], logits(pm(**inputs))[rows], **TOL)
        with pm.disable_adapter():
            torch.testing.assert_close(got[1], logits(pm(**inputs))[1], **TOL)
    pm.set_adapter("sql")


def test_graph_has_one_multi_op_per_served_site(served):
    family, _, mm = served
    ops = [n for n in mm.graph_module.graph.nodes if n.target == torch.ops.peftc.lora_multi.default]
    sites = {n.meta["peftc"]["site"] for n in ops}
    want = {path for name in mm.adapter_names for path in _targeted(family.name, name, mm)}
    assert len(ops) == len(sites) == len(want) and sites == want
    assert f"adapters=3 {mm.adapter_names}, sites={len(want)}" in repr(mm)


def _targeted(family: str, name: str, mm) -> set[str]:
    keys = [t for t in ADAPTERS[family][name]["target_modules"]]
    return {path for path in mm.banks() if path.rsplit(".", 1)[-1] in keys}


def test_untargeted_sites_get_zero_slots(served):
    family, _, mm = served
    for path, bank in mm.banks().items():
        for i, name in enumerate(mm.adapter_names):
            zero = path not in _targeted(family.name, name, mm)
            assert (bank.A_bank[i].abs().sum() == 0) == zero and (bank.scales[i] == 0) == zero


def test_call_errors_name_the_fix(served):
    family, _, mm = served
    inputs = family.inputs(2, 3)
    with pytest.raises(SpecError, match="unknown adapter 'zzz'; served adapters are"):
        mm(**inputs, adapter_ids=["sql", "zzz"])
    with pytest.raises(SpecError, match="3 ids for a batch of 2; pass one id per batch row"):
        mm(**inputs, adapter_ids=["sql", "chat", "math"])
    with pytest.raises(SpecError, match="3 is out of range; ids are 0..2"):
        mm(**inputs, adapter_ids=torch.tensor([0, 3]))
    with pytest.raises(SpecError, match="adapter_ids: missing"):
        mm(**inputs)


def test_non_lora_and_non_linear_adapters_are_refused(tmp_path):
    family = FAMILIES["llama"]
    peftc.Spec.from_dict({"adapters": [{"method": "loha", "targets": ["q_proj"]}]}).save(tmp_path / "spec.json")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(SpecError, match=r"spec adapters are \['loha'\]; serving takes one entry of \['lora', 'dora'"):
        peftc.serve_adapters(family.build(), {"x": tmp_path})
    pm = get_peft_model(family.build(), LoraConfig(r=2, target_modules=["embed_tokens"]))
    pm.save_pretrained(tmp_path / "emb")
    with pytest.raises(SpecError, match="LoRA on linear layers only"):  # an embedding LoRA
        peftc.serve_adapters(family.build(), {"emb": tmp_path / "emb"})
    with pytest.raises(SpecError, match="'__base__' is not usable"):
        peftc.serve_adapters(family.build(), {"__base__": tmp_path / "emb"})


def test_training_gradients_equal_single_adapter_models(tmp_path):
    """loss.backward through the multi op: each adapter's bank slot gets what its own compiled model gets."""
    family = FAMILIES["llama"]
    specs = {"sql": {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8},
             "chat": {"method": "lora", "targets": ["v_proj", "down_proj"], "r": 2, "alpha": 3}}
    rows = ["sql", "chat", None, "sql"]
    inputs = family.inputs(len(rows), 4)  # also the example inputs: one capture per model
    _, cms = compile_family_specs(family, {name: {"adapters": [entry]} for name, entry in specs.items()},
                                  example_kwargs=inputs)
    for seed, name in enumerate(specs):
        randomize_adapters(cms[name], seed=seed)
    cms["sql"].save_adapter(tmp_path / "sql")  # one from a peftc checkpoint folder, one from the CompiledModel
    mm = peftc.serve_adapters(family.build(), {"sql": tmp_path / "sql", "chat": cms["chat"]}, example_kwargs=inputs)
    for bank in mm.banks().values():
        bank.requires_grad_(True)
    weights = torch.randn(len(rows), 4, 128, generator=torch.Generator().manual_seed(7))
    (logits(mm(**inputs, adapter_ids=rows)) * weights).sum().backward()
    for slot, (name, cm) in enumerate(cms.items()):
        picked = [i for i, r in enumerate(rows) if r == name]
        (logits(cm(input_ids=inputs["input_ids"][picked])) * weights[picked]).sum().backward()
        for key, param in cm.adapter_root.named_parameters():
            site, tensor = key.rsplit(".lora.", 1)
            bank = mm.banks()[site]
            r = param.shape[0] if tensor == "A" else param.shape[1]
            grad = bank.A_bank.grad[slot, :r] if tensor == "A" else bank.B_bank.grad[slot, :, :r]
            torch.testing.assert_close(grad, param.grad, **TOL)
    for bank in mm.banks().values():  # rank padding and untargeted slots stay without gradient
        for slot, rank in enumerate(bank.ranks):
            assert bank.A_bank.grad[slot, rank:].abs().sum() == 0 and bank.B_bank.grad[slot, :, rank:].abs().sum() == 0



def _mlp_graph():
    from peftc.capture.export import capture
    from peftc.ir.sites import find_sites

    family = FAMILIES["mlp"]
    model = family.build()
    gm = capture(model, family.example_inputs(), {})
    return model, gm, find_sites(gm)


def test_pass_without_adapters_changes_nothing():
    from peftc.passes.lower_lora_multi import lower_lora_multi
    from torch import nn

    from peftc.ir.lora_bank import ServingPlan
    from peftc.pipeline.runner import PassContext
    from peftc.spec.methods import METHODS

    _, gm, sites = _mlp_graph()
    before = gm.code
    ctx = PassContext(spec=None, sites=tuple(sites), adapter_root=nn.Module(), base_params=dict(gm.named_parameters()),
                      trainable=frozenset(), methods=METHODS, serving=ServingPlan(()))
    result = lower_lora_multi(gm, ctx)
    gm.recompile()
    assert not result.modified and result.sites == [] and gm.code == before


def test_plain_torch_model_rows_and_adapter_on_a_missing_layer(tmp_path):
    from safetensors.torch import save_file

    family = FAMILIES["mlp"]
    model, cm = compile_family(family, {"adapters": [{"method": "lora", "targets": ["fc2"], "r": 3}]})
    randomize_adapters(cm)
    mm = peftc.serve_adapters(model, {"fc2": cm}, example_inputs=family.example_inputs())
    x = torch.randn(4, 16)
    with torch.no_grad():
        got = mm(x, adapter_ids=[0, -1, "fc2", None])
        torch.testing.assert_close(got[[0, 2]], cm(x)[[0, 2]], **TOL)
        torch.testing.assert_close(got[[1, 3]], model(x)[[1, 3]], **TOL)
    cm.spec.save(tmp_path / "spec.json")  # a checkpoint for a layer the model does not have
    save_file({"head.lora.A": torch.ones(3, 16), "head.lora.B": torch.ones(4, 3)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(SpecError, match="adapter 'ghost': site 'head' is not a layer of this model"):
        peftc.serve_adapters(model, {"ghost": tmp_path}, example_inputs=family.example_inputs())
