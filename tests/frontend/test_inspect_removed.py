"""The diff's removed nodes (`- ` lines) from the pipeline's records: quantize_base, merge_adapters,
lower_lora_triton; and what the records hold for passes that remove nothing."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, compile_family

from peftc.capture.specialize import DERIVED_REMOVED
from peftc.compiler.compilation import Compilation
from peftc.compiler.plan import Plan
from peftc.inspect.diff import diff_text
from peftc.ir import quantized
from peftc.ir.graph_edit import provenance
from peftc.spec.parse import as_spec

LORA_QV = {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4}
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def quantized_llama():
    spec = {"adapters": [LORA_QV], "quantize": {"bits": 8}}
    return compile_family(FAMILIES["llama"], spec, example_kwargs=FAMILIES["llama"].inputs(2, 8))[1]


def block_lines(text: str, marker: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.lstrip().startswith(marker)]


def test_quantized_site_shows_the_removed_linear_and_the_inserted_quantized_linear(quantized_llama):
    text = quantized_llama.diff(Q_PROJ)
    assert f"{Q_PROJ}    by quantize_base, insert_lora[0] (lora), fuse_lora_shrinks (lora)" in text
    removed = block_lines(text, "- ")
    assert removed == [
        f"- param {Q_PROJ}.weight  f32[64,64]    removed by quantize_base",
        f"- linear = aten.linear.default(mul_4, {Q_PROJ}.weight)  f32[2*,8*,64]    removed by quantize_base",
        # q_proj's own shrink x A^T: fused with v_proj's (same input) into one matmul
        f"- linear_default = aten.linear.default(mul_4, peftc.{Q_PROJ}.lora.A)  f32[2*,8*,4]    "
        "inserted by insert_lora[0] (lora), removed by fuse_lora_shrinks",
    ]
    added = block_lines(text, "+ ")
    assert any(line.startswith("+ quantized_linear_default = peftc.quantized_linear.default(mul_4, ") for line in added)
    assert any(line.startswith("+ add_tensor = aten.add.Tensor(quantized_linear_default, ") for line in added)
    assert "8 inserted, 3 removed at 1 site" in text
    assert "before" not in text  # the site's op was replaced, not kept: no before/after pair for it


def test_removed_counts_agree_with_the_graph(quantized_llama):
    cm = quantized_llama
    record = cm.records[0]
    weights = quantized.summary(cm.graph_module)["weights"]
    assert record.name == "quantize_base" and len(record.erased) == 2 * weights  # a linear and its weight read
    names_now = {n.name for n in cm.flat_graph_module.graph.nodes}
    assert not names_now & {t.name for r in cm.records for t in r.erased}
    originals_now = sum(1 for n in cm.flat_graph_module.graph.nodes if provenance(n) is None)
    # captured nodes later passes removed (skip_causal_masks: each SDPA and its repeat_kv views;
    # lower_cross_entropy: the loss of the one capture with labels the first graph is derived from)
    removed_later = sum(1 for r in cm.records[1:] for t in r.erased if t.inserted_by is None)
    assert removed_later == 2 * 11 + 1
    # the records are those of the superset capture; deriving this call's graph removed the loss nodes
    # (one of those is not a captured node: the loss op lower_cross_entropy put in place of the captured one)
    derived_removed = cm.flat_graph_module.meta.get(DERIVED_REMOVED, 0) - 1
    assert len(record.erased) == record.nodes_before - derived_removed - originals_now - removed_later
    row = cm.report().passes[0]
    assert row["nodes_removed"] == 2 * weights
    assert row["nodes_inserted"] - row["nodes_removed"] == row["nodes_added"]
    assert f"+{row['nodes_inserted']} -{row['nodes_removed']}" in str(cm.report())


def test_whole_model_diff_folds_removed_lines_across_layers(quantized_llama):
    text = quantized_llama.diff()
    assert "model.layers.{0..1}.mlp.down_proj    by quantize_base    [2 sites, same rewrite" in text
    # one block per projection, each shows its two; q and v also show their fused shrink; the
    # attention block (skip_causal_masks, folded over the layers) its SDPA and repeat_kv's 10 views,
    # and the lowered loss of the capture with labels (lower_cross_entropy) its cross-entropy
    assert len(block_lines(text, "- ")) == 2 * 7 + 2 + 11 + 1
    # 14 projections + the fused shrink of each layer's self_attn, + each layer's attention, + the loss
    assert "55 removed at 18 sites" in text


def test_passes_that_remove_nothing_record_nothing(quantized_llama):
    freeze = next(r for r in quantized_llama.records if r.name == "freeze_params")
    assert freeze.erased == () and freeze.rewired == ()
    lora = next(r for r in quantized_llama.records if r.name == "insert_lora")
    names_now = {n.name for n in quantized_llama.flat_graph_module.graph.nodes}
    assert lora.erased == () and {t.name for t in lora.rewired} <= names_now
    # what the q_proj reader read before LoRA redirected it: quantize_base's op, not the LoRA sum
    view = next(t for t in lora.rewired if t.name == "view")
    assert view.line.startswith("view = aten.view.default(quantized_linear_default, ")


def test_merged_graph_shows_the_adapter_nodes_merge_removed():
    spec = as_spec({"adapters": [{"method": "lora", "targets": ["fc1"], "r": 2}]})
    built = Compilation.start(FAMILIES["mlp"].build(), spec).build((torch.randn(3, 16),), {}, Plan.merged())
    gm, records, sites = built.flat, built.records, built.sites
    inserted = {t.name for t in records[-1].erased}
    assert records[-1].name == "merge_adapters" and inserted  # every node insert_lora added
    text = diff_text(gm, sites, records, scope="fc1")
    removed = block_lines(text, "- ")
    assert len(removed) == len(inserted) and not block_lines(text, "+ ")
    assert all(line.endswith("inserted by insert_lora[0] (lora), removed by merge_adapters") for line in removed)
    assert "- add_tensor = aten.add.Tensor(linear, linear_default_1, alpha=4.0)  f32[3*,32]" in text
    assert "fc1    by merge_adapters" in text


@pytest.mark.filterwarnings("ignore:peftc. backend='triton'")
def test_triton_lowering_shows_the_lora_subgraph_it_replaced():
    _, cm = compile_family(FAMILIES["mlp"], {"adapters": [{"method": "lora", "targets": ["fc1"], "r": 2}]},
                           backend="triton")
    text = cm.diff("fc1")
    assert "fc1    by insert_lora[0] (lora), lower_lora_triton[0] (lora)" in text
    removed = block_lines(text, "- ")
    assert removed[0] == ("- linear = aten.linear.default(x, fc1.weight, fc1.bias)  f32[3*,32]    "
                          "removed by lower_lora_triton")
    assert sum("inserted by insert_lora[0] (lora), removed by lower_lora_triton" in line for line in removed) == 3
    assert any(line.startswith("+ lora_linear_default = peftc.lora_linear.default(x, fc1.weight") for line in
               block_lines(text, "+ "))


def test_dot_colours_nodes_of_a_pass_without_a_method_by_the_pass(quantized_llama):
    dot = quantized_llama.to_dot(Q_PROJ)
    assert "lora = sandybrown, quantize_base = powderblue" in dot
    quantized_nodes = [n.name for n in quantized_llama.flat_graph_module.graph.nodes
                       if (provenance(n) or {}).get("pass") == "quantize_base" and n.meta["peftc"]["site"] == Q_PROJ]
    assert len(quantized_nodes) == 3  # codes, scales, the quantized linear
    for name in quantized_nodes:
        assert f'"{name}" [label=' in dot and 'fillcolor="powderblue"' in dot.split(f'"{name}" [label=')[1].split("\n")[0]
