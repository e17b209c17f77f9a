"""train_adapters (mLoRA): LoRA adapters of different ranks and targets and an IA3 adapter trained in one batch; each
adapter's gradient equals training it alone on its rows, and absent adapters are left unchanged."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, compile_family, logits

import peftc
from peftc import SpecError

FAMILY = FAMILIES["llama"]
TOL = dict(atol=1e-5, rtol=1e-5)
SPECS = {
    "sql": {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}]},
    "chat": {"adapters": [{"method": "lora", "targets": ["v_proj", "down_proj", "o_proj"], "r": 2, "alpha": 3}]},
    "math": {"adapters": [{"method": "lora", "targets": ["up_proj", "q_proj"], "r": 6, "alpha": 6, "rslora": True}]},
    "tone": {"adapters": [{"method": "ia3", "targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]}]},
}
ROWS = ["sql", "chat", None, "tone", "sql", "math", "chat", "tone"]
BATCH, SEQ = len(ROWS), 4


def _nonzero(cm, seed: int) -> None:
    """Non-zero A and B (LoRA's B starts at zero, which would hide errors in A's gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.adapter_root.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(MultiAdapterModel over sql (a spec), chat (a saved folder), math (a CompiledModel), {name: reference})."""
    inputs = FAMILY.inputs(BATCH, SEQ)
    refs = {}
    for seed, (name, spec) in enumerate(SPECS.items()):
        _, refs[name] = compile_family(FAMILY, spec, example_kwargs=inputs)
        _nonzero(refs[name], seed)
    folder = tmp_path_factory.mktemp("chat")
    refs["chat"].save_adapter(folder)
    mt = peftc.train_adapters(FAMILY.build(), {"sql": SPECS["sql"], "chat": folder, "math": refs["math"],
                                               "tone": refs["tone"]},
                              example_kwargs=inputs)
    with torch.no_grad():  # the spec-built adapter starts from the reference's weights
        for key, p in mt.adapter_parameters("sql").items():
            p.copy_(dict(refs["sql"].adapter_root.named_parameters())[key])
    return mt, refs


def test_each_adapter_gets_the_gradient_of_its_rows_alone(trained):
    mt, refs = trained
    mt.zero_grad(set_to_none=True)
    inputs = FAMILY.inputs(BATCH, SEQ)
    weights = torch.randn(BATCH, SEQ, 128, generator=torch.Generator().manual_seed(7))
    (logits(mt(**inputs, adapter_ids=ROWS)) * weights).sum().backward()
    for name, ref in refs.items():
        rows = [i for i, r in enumerate(ROWS) if r == name]
        (logits(ref(input_ids=inputs["input_ids"][rows])) * weights[rows]).sum().backward()
        own = mt.adapter_parameters(name)
        ref_params = dict(ref.adapter_root.named_parameters())
        assert set(own) == set(ref_params) and own  # its own tensors: same names, same shapes (ranks)
        for key, p in own.items():
            assert p.shape == ref_params[key].shape
            torch.testing.assert_close(p.grad, ref_params[key].grad, **TOL)
            assert p.grad.abs().sum() > 0


def test_labels_loss_and_step_touch_only_present_adapters(trained):
    mt, _ = trained
    mt.zero_grad(set_to_none=True)
    inputs = FAMILY.inputs(4, SEQ)
    params = [p for p in mt.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for n in mt.adapter_names for p in mt.adapter_parameters(n).values()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    before = {n: {k: p.detach().clone() for k, p in mt.adapter_parameters(n).items()} for n in mt.adapter_names}
    out = mt(**inputs, labels=inputs["input_ids"], adapter_ids=["sql", None, "chat", "tone"])
    assert out.loss.ndim == 0
    out.loss.backward()
    opt.step()
    for name in mt.adapter_names:
        changed = [not torch.equal(p, before[name][k]) for k, p in mt.adapter_parameters(name).items()]
        assert all(changed) if name in ("sql", "chat", "tone") else not any(changed), name
    assert all(p.grad is None for p in mt.adapter_parameters("math").values())
    assert all(p.requires_grad for p in params)  # restored after the call


def test_save_adapter_round_trips_through_compile(trained, tmp_path):
    mt, _ = trained
    mt.save_adapter("chat", tmp_path / "out")
    loaded = peftc.compile(FAMILY.build(), SPECS["chat"], example_kwargs=FAMILY.inputs(2, 3))
    loaded.load_adapter(tmp_path / "out")
    inputs = FAMILY.inputs(3, SEQ)
    with torch.no_grad():
        got = logits(mt(**inputs, adapter_ids=["chat"] * 3))
        torch.testing.assert_close(got, logits(loaded(**inputs)), **TOL)
    with pytest.raises(SpecError, match="adapter 'nope' is not trained here"):
        mt.save_adapter("nope", tmp_path / "x")


def test_non_lora_and_bad_names_are_refused():
    with pytest.raises(SpecError, match=r"spec adapters are \['dora'\]; train_adapters takes one 'lora' or 'ia3'"):
        peftc.train_adapters(FAMILY.build(), {"x": {"adapters": [{"method": "dora", "targets": ["k_proj"]}]}})
    with pytest.raises(SpecError, match="adapter name '' is not usable"):
        peftc.train_adapters(FAMILY.build(), {"": SPECS["sql"]})


def test_report_names_each_adapters_sites(trained):
    mt, refs = trained
    rows = {row["name"]: row for row in mt.report().to_dict()["adapters"]}
    assert {name: row["method"] for name, row in rows.items()} == {
        name: spec["adapters"][0]["method"] for name, spec in SPECS.items()}
    for name, ref in refs.items():
        assert rows[name]["sites"] == sorted(s.path for s in ref.sites if any(
            r.method is not None and s.path in r.sites for r in ref.records))
    assert "train_many" == mt.plan.name and "lower_lora_multi" in str(mt.report())


def test_the_adapters_own_compiles_share_one_capture_and_stay_independent():
    """Each adapter's own model is compiled from the one capture of the call (CapturedGraphs(across_views=True)):
    K adapters cost 2 exports, not K + 1, and each own model still trains only its own tensors."""
    from export_counter import counted_exports

    specs = {name: SPECS[name] for name in ("sql", "chat", "math")}
    model = FAMILY.build()
    with counted_exports() as exports:
        mm = peftc.train_adapters(model, specs, example_kwargs=FAMILY.inputs(BATCH, SEQ))
    assert len(exports) == 2  # the own compiles' capture, then the multi-adapter graph's example call
    own = [mm._own[name] for name in specs]
    params = [{id(p) for p in cm.adapter_root.parameters()} for cm in own]
    assert all(not (a & b) for i, a in enumerate(params) for b in params[i + 1:])
    for cm, seed in zip(own, range(3)):
        _nonzero(cm, seed)
    inputs = FAMILY.inputs(2, SEQ)
    outs = [cm(**inputs).logits for cm in own]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    for cm, out in zip(own, outs):  # each equals a model compiled on its own, with its weights
        _, alone = compile_family(FAMILY, cm.spec, example_kwargs=FAMILY.inputs(BATCH, SEQ))
        alone.adapter_root.load_state_dict(cm.adapter_root.state_dict())
        torch.testing.assert_close(alone(**inputs).logits, out, **TOL)


def test_adapter_folders_share_the_one_capture(tmp_path):
    """PEFT folders (IA3, LoRA) and a spec are compiled from one capture too: 2 exports, not 4; each row of the
    multi-adapter model equals its folder's PEFT model."""
    from export_counter import counted_exports
    from peft import IA3Config, LoraConfig, PeftModel
    from peft_reference import save_random_peft_folders

    configs = {"ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
               "lora": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0)}
    save_random_peft_folders(FAMILY.build, configs, tmp_path, seed=6, scale=0.3, offset=0.5)
    sources = {**{name: tmp_path / name for name in configs}, "sql": SPECS["sql"]}
    with counted_exports() as exports:
        mm = peftc.train_adapters(FAMILY.build(), sources, example_kwargs=FAMILY.inputs(BATCH, SEQ))
    assert len(exports) == 2  # the own compiles' capture (folders and spec alike), then the multi-adapter graph
    inputs = FAMILY.inputs(3, SEQ)
    rows = ["lora", "ia3", None]
    got = mm(**inputs, adapter_ids=rows).logits.detach()
    for name in configs:
        with torch.no_grad():
            want = logits(PeftModel.from_pretrained(FAMILY.build(), tmp_path / name).eval()(**inputs))
        picked = [i for i, r in enumerate(rows) if r == name]
        torch.testing.assert_close(got[picked], want[picked], **TOL)
