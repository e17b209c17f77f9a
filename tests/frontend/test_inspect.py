"""Inspection: report totals, diff, DOT, rendering, networkx and dump_dir, on the tiny LLaMA."""

from __future__ import annotations

import ast
import json
import re
import shutil

import networkx as nx
import pydot
import pytest
import torch
from families import FAMILIES, compile_family

from peftc.core.paths import group_paths
from peftc.errors import GraphvizNotFoundError, ScopeError
from peftc.inspect.report import Report
from peftc.ir.graph_edit import provenance
from peftc.ir.node_text import node_module_path

R = 4
TARGETS = ("q_proj", "v_proj")
SPEC = {"adapters": [{"method": "lora", "targets": list(TARGETS), "r": R, "dropout": 0.1}],
        "trainable": ["model.norm.weight"]}


BATCH, SEQ = 2, 8  # the example inputs' sizes: the shapes the report and the diff show


def llama_inputs() -> dict:
    return FAMILIES["llama"].inputs(BATCH, SEQ)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    dump = tmp_path_factory.mktemp("dump")
    model, cm = compile_family(FAMILIES["llama"], SPEC, dump_dir=dump, example_kwargs=llama_inputs())
    return model, cm, dump


def site_paths(model) -> list[str]:
    return [f"model.layers.{i}.self_attn.{t}" for i in range(model.config.num_hidden_layers) for t in TARGETS]


def expected_adapter_params(model) -> dict[str, int]:
    """r * (in + out) per LoRA site, from the base weights' shapes."""
    return {path: R * sum(model.get_submodule(path).weight.shape) for path in site_paths(model)}


# -- report ------------------------------------------------------------------------------------
def test_report_totals_equal_counts_from_the_parameters(compiled):
    model, cm, _ = compiled
    totals = cm.report().totals
    adapter = sum(expected_adapter_params(model).values())
    base = sum(p.numel() for p in model.parameters())
    assert totals["adapter_params"] == adapter
    assert totals["adapter_params_by_method"] == {"lora": adapter}
    assert totals["total_params"] == base + adapter
    assert totals["trainable_params"] == adapter + model.model.norm.weight.numel()
    assert totals["adapter_bytes"] == adapter * torch.float32.itemsize
    by_dtype: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        key = str(t.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + t.numel() * t.element_size()
    assert totals["base_bytes_by_dtype"] == by_dtype


def test_report_rows_come_from_the_pass_records(compiled):
    model, cm, _ = compiled
    report = cm.report()
    assert [p["name"] for p in report.passes] == ["insert_lora", "freeze_params"]
    assert [p["params_added"] for p in report.passes] == [report.totals["adapter_params"], 0]
    assert sum(p["nodes_added"] for p in report.passes) == \
        report.totals["graph_nodes"] - report.totals["graph_nodes_captured"]
    expected = expected_adapter_params(model)
    assert {s["path"]: s["adapter_params"] for s in report.sites} == expected
    for row in report.sites:
        weight = model.get_submodule(row["module_path"]).weight
        assert row["methods"] == ["lora"] and row["op"] == "aten.linear.default"
        assert row["in_shape"][-1] == weight.shape[1] and row["out_shape"][-1] == weight.shape[0]
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()


def test_report_table_folds_layers(compiled):
    _, cm, _ = compiled
    text = str(cm.report())
    assert "model.layers.{0..1}.self_attn.q_proj" in text and "model.layers.{0..1}.self_attn.v_proj" in text
    assert "insert_lora[0]" in text and "freeze_params" in text
    scoped = cm.report(scope="model.layers.1")
    assert {s["path"] for s in scoped.sites} == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_report_of_32_layers_stays_one_row_per_projection(compiled):
    _, cm, _ = compiled
    base = cm.report()
    template = {s["path"].split(".")[-1]: s for s in base.sites if ".layers.0." in s["path"]}
    sites = [{**template[t], "path": f"model.layers.{i}.self_attn.{t}"} for i in range(32) for t in TARGETS]
    text = str(Report(passes=base.passes, sites=sites, totals=base.totals, methods=base.methods))
    assert "model.layers.{0..31}.self_attn.q_proj" in text and "model.layers.{0..31}.self_attn.v_proj" in text
    assert len(text.splitlines()) == len(str(base).splitlines())


def test_group_paths_names_gaps_and_singletons():
    paths = ["m.layers.0.q", "m.layers.2.q", "m.layers.5.q", "m.head", "m.layers.3.k"]
    assert [label for label, _ in group_paths(paths)] == ["m.layers.{0,2,5}.q", "m.head", "m.layers.3.k"]


# -- diff --------------------------------------------------------------------------------------
def inserted_under(cm, scope: str) -> list:
    return [n for n in cm.flat_graph_module.graph.nodes
            if provenance(n) is not None and (provenance(n)["site"] + ".").startswith(scope + ".")]


def test_diff_groups_by_site_and_folds_layers(compiled):
    _, cm, _ = compiled
    text = cm.diff()
    assert "model.layers.{0..1}.self_attn.q_proj" in text and "[2 sites, same rewrite" in text
    assert text.count("  before  ") == len(TARGETS)  # one block per projection, not per layer
    assert len(text.splitlines()) < 40


def test_diff_scope_lists_each_inserted_node_of_that_layer(compiled):
    _, cm, _ = compiled
    text = cm.diff(scope="model.layers.0")
    added = [line for line in text.splitlines() if line.lstrip().startswith("+ ")]
    assert len(added) == len(inserted_under(cm, "model.layers.0"))
    assert "model.layers.0.self_attn.q_proj" in text and "model.layers.1" not in text
    assert "before  linear = aten.linear.default(" in text and "aten.dropout.default" in text


def test_diff_of_a_scope_without_changes_and_a_wrong_scope(compiled):
    _, cm, _ = compiled
    assert "no nodes inserted or removed under 'model.layers.0.mlp'" in cm.diff(scope="model.layers.0.mlp")
    with pytest.raises(ScopeError, match="nearest: .*model.layers.0"):
        cm.diff(scope="model.layer.0")


# -- DOT and rendering ---------------------------------------------------------------------------
def dot_nodes(graph: pydot.Dot) -> list[pydot.Node]:
    """Node statements, in clusters too (pydot keeps `node [...]` defaults as a node named 'node')."""
    found = [n for n in graph.get_nodes() if n.get_name() not in ("node", "edge", "graph")]
    for sub in graph.get_subgraphs():
        found += dot_nodes(sub)
    return found


@pytest.fixture(scope="module")
def compiled_mlp():
    return compile_family(FAMILIES["mlp"], {"adapters": [{"method": "lora", "targets": ["fc1", "fc2"]}]})[1]


# pydot's parser is slow (seconds per hundred nodes on a busy machine), so whole graphs are parsed
# for the MLP; the LLaMA is parsed at scopes a user would render.
@pytest.mark.parametrize("family, scope", [("mlp", None), ("mlp", "fc2"), ("llama", "model.layers.0.mlp"),
                                           ("llama", "model.layers.1.self_attn.v_proj")])
def test_dot_parses_with_one_node_per_graph_node_in_scope(compiled, compiled_mlp, family, scope):
    cm = compiled_mlp if family == "mlp" else compiled[1]
    (graph,) = pydot.graph_from_dot_data(cm.to_dot(scope))
    expected = {n.name for n in cm.flat_graph_module.graph.nodes
                if scope is None or (node_module_path(n) + ".").startswith(scope + ".")}
    names = [n.get_name().strip('"') for n in dot_nodes(graph)]
    assert len(names) == len(expected) and set(names) == expected
    edges = {(e.get_source().strip('"'), e.get_destination().strip('"')) for e in graph.get_edges()}
    assert edges == {(a.name, n.name) for n in cm.flat_graph_module.graph.nodes if n.name in expected
                     for a in n.all_input_nodes if a.name in expected}


def test_dot_of_the_whole_model_has_every_node(compiled):
    _, cm, _ = compiled
    text = cm.to_dot()
    statements = re.findall(r'^\s*"([^"]+)" \[label=', text, flags=re.M)
    assert sorted(statements) == sorted(n.name for n in cm.flat_graph_module.graph.nodes)


def test_dot_colours_inserted_nodes_by_method(compiled):
    _, cm, _ = compiled
    scope = "model.layers.0.self_attn.q_proj"
    (graph,) = pydot.graph_from_dot_data(cm.to_dot(scope))
    fills = {n.get_name().strip('"'): n.get("fillcolor").strip('"') for n in dot_nodes(graph)}
    inserted = {n.name for n in inserted_under(cm, scope)}
    assert inserted and {fills[name] for name in inserted} == {"sandybrown"}
    assert "sandybrown" not in {c for name, c in fills.items() if name not in inserted}
    assert "lora = sandybrown" in graph.get_label()


def test_render_without_graphviz_says_how_to_install(compiled, tmp_path, monkeypatch):
    _, cm, _ = compiled
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `dot` program to be found
    with pytest.raises(GraphvizNotFoundError, match="apt-get install graphviz"):
        cm.render(tmp_path / "layer.svg", scope="model.layers.0")
    assert not (tmp_path / "layer.svg").exists()


def test_render_refuses_an_unknown_image_format(compiled, tmp_path):
    _, cm, _ = compiled
    with pytest.raises(ValueError, match=r"\.svg, \.png, \.pdf"):
        cm.render(tmp_path / "layer.bmp")


@pytest.mark.skipif(shutil.which("dot") is None, reason="the graphviz `dot` program is not installed")
def test_render_svg_with_graphviz(compiled, tmp_path):
    _, cm, _ = compiled
    path = cm.render(tmp_path / "out" / "layer.svg", scope="model.layers.0.self_attn")
    assert "<svg" in path.read_text() and "q_proj" in path.read_text()


# -- networkx ----------------------------------------------------------------------------------
def test_networkx_is_a_dag_with_one_node_per_graph_node(compiled):
    _, cm, _ = compiled
    graph = cm.to_networkx()
    nodes = list(cm.flat_graph_module.graph.nodes)
    assert isinstance(graph, nx.DiGraph) and nx.is_directed_acyclic_graph(graph)
    assert graph.number_of_nodes() == len(nodes)
    assert graph.number_of_edges() == sum(len(set(n.all_input_nodes)) for n in nodes)
    a = graph.nodes["peftc_model_layers_0_self_attn_q_proj_lora_a"]
    assert (a["op"], a["target"], a["shape"], a["dtype"], a["inserted_by"]) == \
        ("get_attr", "peftc.model.layers.0.self_attn.q_proj.lora.A", (R, 64), "float32", "insert_lora")
    assert a["module_path"] == "model.layers.0.self_attn.q_proj"
    inserted = {n.name for n in nodes if provenance(n) is not None}
    assert {n for n, d in graph.nodes(data=True) if d["inserted_by"] is not None} == inserted
    assert graph.nodes["embedding"]["module_path"] == "model.embed_tokens"


# -- dump_dir ----------------------------------------------------------------------------------
def test_dump_dir_has_valid_python_after_each_pass(compiled):
    _, cm, dump = compiled
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["00-capture.py", "01-insert_lora.py", "02-freeze_params.py"]
    for name in files:
        source = (dump / name).read_text()
        ast.parse(source)
        compile(source, name, "exec")
    assert "lora" not in (dump / "00-capture.py").read_text()
    assert "peftc_model_layers_0_self_attn_q_proj_lora_a" in (dump / "01-insert_lora.py").read_text()


# -- other specs (MLP: fast) ---------------------------------------------------------------------
def test_report_and_diff_of_a_spec_that_only_unfreezes():
    _, cm = compile_family(FAMILIES["mlp"], {"trainable": ["*.bias"]})
    text = str(cm.report())
    assert "no sites rewritten" in text and "freeze_params touched: fc1.bias, fc2.bias" in text
    assert cm.report().totals["trainable_params"] == 32 + 4
    assert cm.diff().endswith("no nodes inserted or removed")


def test_diff_names_each_entry_at_a_site_with_two_adapters():
    spec = {"adapters": [{"method": "lora", "targets": ["fc1"], "r": 2},
                         {"method": "adapter", "targets": ["fc1", "fc2"], "bottleneck": 3}]}
    _, cm = compile_family(FAMILIES["mlp"], spec)
    text = cm.diff(scope="fc1")
    assert "by insert_lora[0] (lora), insert_adapter[1] (adapter)" in text
    assert "+ param peftc.fc1.lora.A" in text and "+ param peftc.fc1.adapter." in text
    assert {s["path"]: s["methods"] for s in cm.report().sites} == {"fc1": ["lora", "adapter"], "fc2": ["adapter"]}


def test_report_scope_that_names_nothing_is_an_error(compiled):
    _, cm, _ = compiled
    with pytest.raises(ScopeError, match="model.layers.7"):
        cm.report(scope="model.layers.7")


def test_diff_of_a_pass_that_rewires_an_op_shows_what_it_read_before():
    spec = {"adapters": [{"method": "copy", "targets": ["fc2"]}]}
    _, cm = compile_family(FAMILIES["mlp"], spec)
    text = cm.diff()
    assert "(2 original removed)" in text  # the base get_attr nodes the copies replaced
    lines = text.splitlines()
    before = next(line for line in lines if line.startswith("  before  "))
    after = next(line for line in lines if line.startswith("  after   "))
    assert "aten.linear.default(" in before and "fc2.weight, fc2.bias)" in before and "copy" not in before
    assert "peftc.fc2.copy.weight, peftc.fc2.copy.bias)" in after
    assert "        - param fc2.weight  f32[4,32]    removed by copy_params[0]" in lines
    assert "        - param fc2.bias  f32[4]    removed by copy_params[0]" in lines
    assert cm.report().totals["adapter_params_by_method"] == {"copy": 4 * 32 + 4}


# -- shapes: example sizes, dynamic dims marked ------------------------------------------------
def test_report_shapes_are_the_example_sizes_with_dynamic_dims_marked(compiled):
    _, cm, _ = compiled
    report = cm.report()
    text = str(report)
    assert f"[{BATCH}*,{SEQ}*,64] -> [{BATCH}*,{SEQ}*,64]" in text  # q_proj: 64 -> 64
    assert f"[{BATCH}*,{SEQ}*,64] -> [{BATCH}*,{SEQ}*,32]" in text  # v_proj: 2 kv heads of 16
    assert "shapes: * = dynamic dim" in text
    assert re.search(r"\bs\d+\b", text) is None  # no symbol names left
    for row in report.to_dict()["sites"]:
        assert row["in_shape"][:2] == [BATCH, SEQ] and row["in_dynamic"] == [0, 1] and row["out_dynamic"] == [0, 1]
        assert all(type(size) is int for size in row["in_shape"] + row["out_shape"])


def test_diff_networkx_and_dot_show_the_same_sizes(compiled):
    _, cm, _ = compiled
    scope = "model.layers.0.self_attn.q_proj"
    diff = cm.diff(scope)
    assert "  before  linear = aten.linear.default(" in diff and f"f32[{BATCH}*,{SEQ}*,64]" in diff
    assert f"f32[{BATCH}*,{SEQ}*,{R}]" in diff and f"f32[{R},64]" in diff and "shapes: * = dynamic dim" in diff
    assert re.search(r"\bs\d+\b", diff) is None
    graph = cm.to_networkx(scope)
    assert (graph.nodes["linear"]["shape"], graph.nodes["linear"]["dynamic_dims"]) == ((BATCH, SEQ, 64), (0, 1))
    a = graph.nodes["peftc_model_layers_0_self_attn_q_proj_lora_a"]
    assert (a["shape"], a["dynamic_dims"]) == ((R, 64), ())
    dot = cm.to_dot(scope)
    assert f"f32[{BATCH}*,{SEQ}*,64]" in dot and "* = dynamic dim" in dot


def test_shapes_without_an_example_size_show_their_symbol():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from peftc.ir.node_text import format_node
    from peftc.ir.shapes import Shape

    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env):
        unbacked = torch.empty(shape_env.create_unbacked_symint(), 4)  # data-dependent: no example size
    shape = Shape.of(unbacked)
    assert shape == Shape((str(unbacked.shape[0]), 4), (0,)) and str(shape) == f"[{unbacked.shape[0]}*,4]"
    assert Shape.of(3) is None and str(Shape((2, 3))) == "[2,3]"
    traced = torch.fx.symbolic_trace(FAMILIES["mlp"].build())  # no meta["val"] anywhere
    node = next(n for n in traced.graph.nodes if n.op == "call_module")
    node.meta["val"] = unbacked
    assert format_node(node).endswith(f"f32[{unbacked.shape[0]}*,4]")
    from peftc.inspect.dot import to_dot
    from peftc.inspect.graph_view import to_networkx

    assert to_networkx(traced).nodes["x"]["shape"] is None and "digraph" in to_dot(traced)
