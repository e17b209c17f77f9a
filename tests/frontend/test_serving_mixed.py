"""Mixed PEFT types in one batch (PetS): LoRA, DoRA, VeRA, IA3 and bottleneck adapters on one base, each row its
own adapter (or the base), checked row by row against each adapter's own compiled model."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, compile_family_specs, logits, randomize_adapters
from peft_reference import save_random_peft_folders

import peftc
from peftc.capture.export import capture

TOL = dict(atol=1e-5, rtol=1e-5)
BATCH, SEQ = 10, 5
ADAPTERS = {  # per family: one adapter of each served method, targets overlapping on purpose
    "llama": {
        "lora": {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8},
        "dora": {"method": "dora", "targets": ["q_proj", "k_proj", "down_proj"], "r": 3, "alpha": 5},
        "vera": {"method": "vera", "targets": ["v_proj", "up_proj"], "r": 8},
        "ia3": {"method": "ia3", "targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]},
        "adapter": {"method": "adapter", "targets": ["o_proj", "down_proj"], "bottleneck": 6},  # serial, relu
    },
    "gpt2": {  # Conv1D weights ([in, out]) and biases: DoRA leaves the bias unscaled, IA3 scales it
        "lora": {"method": "lora", "targets": ["c_attn"], "r": 4, "alpha": 8},
        "dora": {"method": "dora", "targets": ["c_attn", "*.attn.c_proj"], "r": 2, "alpha": 3},
        "vera": {"method": "vera", "targets": ["c_fc"], "r": 6},
        "ia3": {"method": "ia3", "targets": ["c_attn", "*.mlp.c_proj"], "feedforward": ["*.mlp.c_proj"]},
        "adapter": {"method": "adapter", "targets": ["c_fc", "*.attn.c_proj"], "placement": "parallel",
                    "activation": "gelu", "bottleneck": 5, "scale": 0.5},
    },
}
ROWS = ["lora", "dora", None, "vera", "ia3", "adapter", "dora", "ia3", "lora", "adapter"]


@pytest.fixture(scope="module", params=list(ADAPTERS))
def served(request, tmp_path_factory):
    """(family, {name: its own CompiledModel}, ServedModel): DoRA from a saved folder, the rest as models."""
    family = FAMILIES[request.param]
    inputs = family.inputs(BATCH, SEQ)
    _, cms = compile_family_specs(family, {name: {"adapters": [entry]} for name, entry in ADAPTERS[request.param].items()},
                                  example_kwargs=inputs)
    for seed, name in enumerate(ADAPTERS[request.param]):
        randomize_adapters(cms[name], std=0.3, seed=seed)
        cms[name].eval()
    folder = tmp_path_factory.mktemp(request.param) / "dora"
    cms["dora"].save_adapter(folder)
    sources = {**cms, "dora": folder}
    return family, cms, peftc.serve_adapters(family.build(), sources, example_kwargs=inputs)


@pytest.mark.parametrize("seq", [SEQ, 1], ids=["prefill_sgmv", "decode_bgmv"])
def test_each_row_equals_its_adapters_own_model(served, seq):
    family, cms, mm = served
    inputs = family.inputs(BATCH, seq)
    with torch.no_grad():
        got = logits(mm(**inputs, adapter_ids=ROWS))
        for name, cm in cms.items():
            rows = [i for i, r in enumerate(ROWS) if r == name]
            torch.testing.assert_close(got[rows], logits(cm(**inputs))[rows], **TOL)
        base = family.build()
        torch.testing.assert_close(got[2], logits(base(**inputs))[2], **TOL)
        assert not torch.allclose(got[0], got[1])  # rows differ: the adapters act


def test_base_ops_run_once_for_the_whole_batch(served):
    """Each base weight is read by as many ops as in the base model's own graph: no per-adapter copies."""
    family, _, mm = served
    graph = mm.graph_module.graph
    base_graph = capture(family.build(), (), {**family.inputs(BATCH, SEQ), "use_cache": False}).graph
    assert _weight_reads(graph) == _weight_reads(base_graph)
    multi = [n for n in graph.nodes if n.target == torch.ops.peftc.lora_multi.default]
    scaled = [n for n in graph.nodes if n.target == torch.ops.peftc.scale_rows.default]
    want_multi = {p for n in ("lora", "dora", "vera") for p in _sites(mm, n)}
    assert {n.meta["peftc"]["site"] for n in multi} == want_multi and len(multi) == len(want_multi)
    assert {n.meta["peftc"]["site"] for n in scaled} == set(_sites(mm, "dora")) | set(_sites(mm, "ia3"))
    bottlenecks = [n for n in graph.nodes if n.target == torch.ops.peftc.bottleneck_rows.default]
    assert {n.meta["peftc"]["site"] for n in bottlenecks} == set(_sites(mm, "adapter")) == {
        n.meta["peftc"]["site"] for n in bottlenecks}


def _weight_reads(graph) -> dict[str, int]:
    """Ops reading each base tensor; scale_rows' elementwise per-row rescaling of a bias is not a base op. Tensors
    no op reads are left out (a graph derived from the superset capture drops their unused get_attr nodes)."""
    reads = {node.target: sum(1 for u in node.users if u.op == "call_function"
                              and u.target != torch.ops.peftc.scale_rows.default)
             for node in graph.find_nodes(op="get_attr") if not node.target.startswith("peftc.")}
    return {target: count for target, count in reads.items() if count}


def _sites(mm, name: str) -> list[str]:
    adapter = next(a for a in mm.plan.serving.adapters if a.name == name)
    return list(adapter.sites)


def test_peft_ia3_folder_serves_beside_lora(tmp_path):
    """A PEFT IA3 folder and a PEFT LoRA folder in one served model, rows equal to PEFT's own models."""
    from peft import IA3Config, LoraConfig, PeftModel

    family = FAMILIES["llama"]
    configs = {"ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
               "lora": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])}
    save_random_peft_folders(family.build, configs, tmp_path, seed=5, scale=0.3, offset=1.0)
    inputs = family.inputs(4, 3)
    mm = peftc.serve_adapters(family.build(), {n: tmp_path / n for n in configs}, example_kwargs=inputs)
    rows = ["ia3", "lora", "ia3", None]
    with torch.no_grad():
        got = logits(mm(**inputs, adapter_ids=rows))
        for name in configs:
            want = logits(PeftModel.from_pretrained(family.build(), tmp_path / name).eval()(**inputs))
            picked = [i for i, r in enumerate(rows) if r == name]
            torch.testing.assert_close(got[picked], want[picked], **TOL)
    assert [a.method for a in mm.plan.serving.adapters] == ["ia3", "lora"]


def test_report_names_each_adapters_sites_and_type(served):
    family, _, mm = served
    report = mm.report()
    rows = {row["name"]: row for row in report.to_dict()["adapters"]}
    assert [rows[n]["method"] for n in ADAPTERS[family.name]] == list(ADAPTERS[family.name])
    for name in ADAPTERS[family.name]:
        assert rows[name]["sites"] == sorted(_sites(mm, name)) and rows[name]["params"] > 0
    text = str(report)
    assert "dora (dora)" in text and "ia3 (ia3)" in text and "lower_scales_multi" in text
    by_site = {s["path"]: s["methods"] for s in report.sites}
    for path in _sites(mm, "vera"):
        assert "vera (vera)" in by_site[path]


def _mlp_context(plan):
    from torch import nn

    from peftc.ir.sites import find_sites
    from peftc.pipeline.runner import PassContext
    from peftc.spec.methods import METHODS

    family = FAMILIES["mlp"]
    gm = capture(family.build(), family.example_inputs(), {})
    ctx = PassContext(spec=None, sites=tuple(find_sites(gm)), adapter_root=nn.Module(),
                      base_params=dict(gm.named_parameters()), trainable=frozenset(), methods=METHODS, serving=plan)
    return gm, ctx


def test_scales_pass_without_elementwise_adapters_changes_nothing():
    from peftc.ir.lora_bank import ServedAdapter, ServingPlan, SiteAdapter, SiteLora
    from peftc.passes.lower_scales_multi import lower_scales_multi

    lora = ServedAdapter("a", "lora", {"fc2": SiteAdapter(lora=SiteLora(torch.ones(2, 32), torch.ones(4, 2), 1.0))})
    gm, ctx = _mlp_context(ServingPlan((lora,)))
    before = gm.code
    result = lower_scales_multi(gm, ctx)
    gm.recompile()
    assert not result.modified and result.sites == [] and gm.code == before


def test_routing_input_is_added_once_and_is_the_last_placeholder():
    from peftc.ir.lora_bank import ServingPlan
    from peftc.passes.add_routing_input import ROUTING_INPUT, add_routing_input

    gm, ctx = _mlp_context(ServingPlan(()))
    first = add_routing_input(gm, ctx)
    again = add_routing_input(gm, ctx)
    gm.recompile()
    placeholders = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    assert first.modified and not again.modified and placeholders.count(ROUTING_INPUT) == 1
    assert placeholders[-1] == ROUTING_INPUT
    from peftc.ir.modes import record_modes, set_mode

    record_modes(gm)
    set_mode(gm, False)  # the MLP has dropout: compare in eval
    x = FAMILIES["mlp"].example_inputs()[0]
    torch.testing.assert_close(gm(x, adapter_ids=torch.zeros(x.shape[0], dtype=torch.long)), FAMILIES["mlp"].build()(x))
