"""lower_lora_triton and compile(backend="triton"): the fused op replaces each LoRA subgraph, outputs and
training match backend="torch". Without a GPU the ops run their torch implementation."""

import warnings

import pytest
import torch

import peftc
from families import FAMILIES, call, compile_family, logits, randomize_adapters
from peftc.codegen.triton import formats, ops  # noqa: F401  (registers torch.ops.peftc.*)
from peftc.graph_edit import provenance
from peftc.passes.lower_lora_triton import FALLBACK_WARNING, lower_lora_triton
from peftc.pipeline import PassContext

LORA_OPS = (torch.ops.peftc.lora_linear.default, torch.ops.peftc.lora_linear_q.default)


def _spec(targets, dropout=0.0):
    return {"adapters": [{"method": "lora", "targets": list(targets), "r": 4, "alpha": 8, "dropout": dropout}]}


def _compile(family, spec, backend, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, cm = compile_family(family, spec, backend=backend, **kwargs)
    randomize_adapters(cm)
    return cm


def _inputs(family):
    inputs = family.inputs(2, 6)
    if family.hf:
        inputs["labels"] = inputs["input_ids"]
    return inputs


@pytest.fixture(scope="module")
def llama_pair():
    """(torch backend, triton backend) on LLaMA, all linears, dropout on; captured for the labelled call."""
    family = FAMILIES["llama"]
    spec = _spec(family.all_linear, dropout=0.1)
    kwargs = {"example_kwargs": _inputs(family)}
    return _compile(family, spec, "torch", **kwargs), _compile(family, spec, "triton", **kwargs)


def _fused_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LORA_OPS]


def _lora_graph_ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and (provenance(n) or {}).get("pass") == "insert_lora"
            and n.target == torch.ops.aten.linear.default]


def _check_equal_outputs(ref, cm, family):
    sites = {p for r in cm.records if r.name.startswith("insert_lora") for p in r.sites}
    assert len(_fused_nodes(cm.graph_module)) == len(sites) > 0
    assert not _lora_graph_ops(cm.graph_module)  # the unfused branch is gone
    cm.eval(), ref.eval()
    inputs = _inputs(family)
    torch.testing.assert_close(logits(call(cm, family, inputs)), logits(call(ref, family, inputs)),
                               atol=1e-5, rtol=1e-5)
    assert len(cm.graphs) == 1  # no re-capture: the call used the compiled signature


def test_llama_triton_backend_equals_torch_backend(llama_pair):
    _check_equal_outputs(*llama_pair, FAMILIES["llama"])


def _lower_in_place(cm):
    """Run the pass on an already compiled (backend="torch") model's graph, as the pipeline would."""
    gm = cm.graph_module
    ctx = PassContext(spec=cm.spec, sites=cm.sites, adapter_root=cm._adapter_root,
                      base_params=dict(gm.named_parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lower_lora_triton(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return result


def test_gpt2_conv1d_layout_is_lowered_exactly():
    """GPT-2's Conv1D is addmm against a [in, out] weight: the op reads its transpose."""
    family = FAMILIES["gpt2"]
    cm = _compile(family, _spec(family.all_linear), "torch", example_kwargs=_inputs(family))
    inputs = _inputs(family)
    want = logits(call(cm, family, inputs))
    result = _lower_in_place(cm)
    assert len(result.sites) == len(_fused_nodes(cm.graph_module)) == 8
    assert not _lora_graph_ops(cm.graph_module)
    torch.testing.assert_close(logits(call(cm, family, inputs)), want, atol=1e-5, rtol=1e-5)


def test_llama_training_step_matches_torch_backend(llama_pair):
    family = FAMILIES["llama"]
    after = []
    for cm in llama_pair:
        cm.train()
        params = [p for _, p in cm.graph_module.named_parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        torch.manual_seed(0)  # same dropout masks: the lowered graph keeps the dropout nodes in order
        loss = call(cm, family, _inputs(family)).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        after.append((loss.item(), [p.detach().clone() for p in params]))
        cm.eval()
    assert after[0][0] == pytest.approx(after[1][0], abs=1e-5)
    for a, b in zip(after[0][1], after[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_report_shows_lowered_sites_and_backend(llama_pair):
    text = str(llama_pair[1].report())
    assert "lower_lora_triton" in text
    assert "lowered to peftc.lora_linear, backend torch: model.layers.{0..1}.self_attn.q_proj" in text
    record = next(r for r in llama_pair[1].records if r.name == "lower_lora_triton")
    assert record.modified and len(record.sites) == 14


def test_fallback_warning_is_one_line():
    with pytest.warns(UserWarning, match="backend='triton'") as caught:
        compile_family(FAMILIES["mlp"], _spec(["fc1"]), backend="triton")
    messages = [str(w.message) for w in caught if "triton" in str(w.message)]
    assert messages == [FALLBACK_WARNING] and "\n" not in FALLBACK_WARNING


def test_unknown_backend_is_a_spec_error():
    with pytest.raises(peftc.SpecError, match="backend"):
        compile_family(FAMILIES["mlp"], _spec(["fc1"]), backend="cuda")


def test_conv_sites_are_left_as_graph_ops():
    family = FAMILIES["convnet"]
    cm = _compile(family, _spec(["conv1", "conv2"]), "triton")
    record = next(r for r in cm.records if r.name == "lower_lora_triton")
    assert not record.modified and not _fused_nodes(cm.graph_module)
    assert "conv1 (conv site" in " ".join(record.notes)
    mixed = _compile(family, _spec(["conv1", "head"]), "triton")
    assert len(_fused_nodes(mixed.graph_module)) == 1
    ref = _compile(family, _spec(["conv1", "head"]), "torch")
    x = family.example_inputs()[0]
    torch.testing.assert_close(mixed(x), ref(x), atol=1e-5, rtol=1e-5)


def test_trainable_base_weight_is_not_fused():
    family = FAMILIES["mlp"]
    spec = dict(_spec(["fc1", "fc2"]), trainable=["fc1.weight"])
    cm = _compile(family, spec, "triton")
    record = next(r for r in cm.records if r.name == "lower_lora_triton")
    assert record.sites == ("fc2",)
    assert "fc1 (base weight is trainable" in " ".join(record.notes)


def test_merged_model_of_a_triton_compile_has_no_fused_ops():
    family = FAMILIES["mlp"]
    cm = _compile(family, _spec(["fc1", "fc2"]), "triton")
    merged = cm.merged()
    assert not _fused_nodes(merged.graph_module)
    x = torch.randn(4, 16)
    torch.testing.assert_close(merged(x), cm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_dequantized_base_weight_is_fused_into_the_op(fmt):
    """A base read through peftc::dequantize_packed becomes one lora_linear_q op (the quantized weight's contract)."""
    family = FAMILIES["mlp"]
    cm = _compile(family, _spec(["fc1"]), "torch")
    gm = cm.graph_module
    site = next(s for s in cm.sites if s.path == "fc1")
    node = next(n for n in gm.graph.nodes if n.name == site.node)
    qweight, scales = formats.to_packed(fmt, gm.get_parameter(site.param), group_size=8)
    gm.register_buffer("fc1_qweight", qweight)
    gm.register_buffer("fc1_scales", scales)
    with gm.graph.inserting_before(node):
        q, s = gm.graph.get_attr("fc1_qweight"), gm.graph.get_attr("fc1_scales")
        dequant = gm.graph.call_function(torch.ops.peftc.dequantize_packed.default,
                                         (q, s, fmt, 8, site.in_features, torch.float32))
    node.replace_input_with(node.args[1], dequant)
    gm.recompile()
    x = torch.randn(5, 16)
    want = cm(x)
    result = _lower_in_place(cm)
    assert result.sites == ["fc1"] and "peftc.lora_linear_q" in result.notes[0]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.peftc.lora_linear_q.default in targets
    assert torch.ops.peftc.dequantize_packed.default not in targets
    torch.testing.assert_close(cm(x), want, atol=1e-5, rtol=1e-5)


def test_trainable_bias_gets_its_gradient_through_the_fused_op():
    family = FAMILIES["mlp"]
    spec = dict(_spec(["fc1", "fc2"], dropout=0.2), trainable=["*.bias"])
    grads = []
    for backend in ("torch", "triton"):
        cm = _compile(family, spec, backend)
        assert backend == "torch" or len(_fused_nodes(cm.graph_module)) == 2
        cm.train()
        torch.manual_seed(0)
        cm(torch.randn(3, 16, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in cm.graph_module.named_parameters() if p.requires_grad})
        for p in cm.graph_module.parameters():  # the base biases are shared with the model: reset
            p.grad = None
    assert grads[0].keys() == grads[1].keys() and "fc1.bias" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5)
