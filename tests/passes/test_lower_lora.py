"""lower_lora_triton and compile(backend="triton"): the fused op replaces each LoRA subgraph, outputs and
training match backend="torch". Without a GPU the ops run their torch implementation."""

import warnings

import pytest
import torch
from families import FAMILIES, call, compile_family, logits, randomize_adapters
from peftc.codegen.triton import ops  # noqa: F401  (registers torch.ops.peftc.*)
from peftc.passes.lower_lora_triton import FALLBACK_WARNING, lower_lora_triton

import peftc
from peftc.ir.graph_edit import provenance
from peftc.pipeline.runner import PassContext
from peftc.spec.methods import METHODS

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
    assert len(_fused_nodes(cm.flat_graph_module)) == len(sites) > 0
    assert not _lora_graph_ops(cm.flat_graph_module)  # the unfused branch is gone
    cm.eval(), ref.eval()
    inputs = _inputs(family)
    torch.testing.assert_close(logits(call(cm, family, inputs)), logits(call(ref, family, inputs)),
                               atol=1e-5, rtol=1e-5)
    assert len(cm.graphs) == 1  # no re-capture: the call used the compiled signature


def test_llama_triton_backend_equals_torch_backend(llama_pair):
    _check_equal_outputs(*llama_pair, FAMILIES["llama"])


def _lower_in_place(cm):
    """Run the pass on an already compiled (backend="torch") model's graph, as the pipeline would."""
    gm = cm.flat_graph_module
    ctx = PassContext(spec=cm.spec, sites=tuple(cm.sites), adapter_root=cm.adapter_root,
                      base_params=dict(gm.named_parameters()), trainable=frozenset(), methods=METHODS)
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
    assert len(result.sites) == len(_fused_nodes(cm.flat_graph_module)) == 8
    assert not _lora_graph_ops(cm.flat_graph_module)
    torch.testing.assert_close(logits(call(cm, family, inputs)), want, atol=1e-5, rtol=1e-5)


def test_llama_training_step_matches_torch_backend(llama_pair):
    family = FAMILIES["llama"]
    after = []
    for cm in llama_pair:
        cm.train()
        params = [p for _, p in cm.flat_graph_module.named_parameters() if p.requires_grad]
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
    assert not record.modified and not _fused_nodes(cm.flat_graph_module)
    assert "conv1 (conv site" in " ".join(record.notes)
    mixed = _compile(family, _spec(["conv1", "head"]), "triton")
    assert len(_fused_nodes(mixed.flat_graph_module)) == 1
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
    assert not _fused_nodes(merged.flat_graph_module)
    x = torch.randn(4, 16)
    torch.testing.assert_close(merged(x), cm(x), atol=1e-5, rtol=1e-5)


QUANTIZE = {"int8": {"bits": 8}, "int4": {"bits": 4, "group_size": 16},
            "nf4-double": {"bits": 4, "format": "nf4", "group_size": 16, "double_quant": True}}


@pytest.mark.parametrize("name", QUANTIZE)
def test_quantized_base_and_lora_become_one_fused_op(name):
    """quantize_base's peftc::quantized_linear + the LoRA branch -> one lora_linear_q per site, same outputs."""
    family = FAMILIES["mlp"]
    spec = dict(_spec(["fc1", "fc2"]), quantize=dict(QUANTIZE[name], targets=["fc1", "fc2"]))
    ref, cm = _compile(family, spec, "torch"), _compile(family, spec, "triton")
    fused = _fused_nodes(cm.flat_graph_module)
    assert [n.target for n in fused] == [torch.ops.peftc.lora_linear_q.default] * 2
    assert not any(n.target == torch.ops.peftc.quantized_linear.default for n in cm.flat_graph_module.graph.nodes)
    assert "fc1.weight" not in dict(cm.flat_graph_module.named_parameters())  # still no fp32 copy of the base
    x = torch.randn(5, 16)
    torch.testing.assert_close(cm(x), ref(x), atol=1e-5, rtol=1e-5)


def test_quantized_llama_trains_the_same_through_the_fused_op():
    family = FAMILIES["llama"]
    spec = dict(_spec(family.all_linear, dropout=0.1), quantize=QUANTIZE["nf4-double"])
    kwargs = {"example_kwargs": _inputs(family)}
    pair = [_compile(family, spec, backend, **kwargs) for backend in ("torch", "triton")]
    record = next(r for r in pair[1].records if r.name == "lower_lora_triton")
    assert "lowered to peftc.lora_linear_q, backend torch" in " ".join(record.notes)
    assert len(record.sites) == 14
    losses, grads = [], []
    for cm in pair:
        cm.train()
        torch.manual_seed(0)
        loss = call(cm, family, _inputs(family)).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in cm.flat_graph_module.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-5, rtol=1e-5)


def test_trainable_bias_gets_its_gradient_through_the_fused_op():
    family = FAMILIES["mlp"]
    spec = dict(_spec(["fc1", "fc2"], dropout=0.2), trainable=["*.bias"])
    grads = []
    for backend in ("torch", "triton"):
        cm = _compile(family, spec, backend)
        assert backend == "torch" or len(_fused_nodes(cm.flat_graph_module)) == 2
        cm.train()
        torch.manual_seed(0)
        cm(torch.randn(3, 16, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in cm.flat_graph_module.named_parameters() if p.requires_grad})
        for p in cm.flat_graph_module.parameters():  # the base biases are shared with the model: reset
            p.grad = None
    assert grads[0].keys() == grads[1].keys() and "fc1.bias" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5)


def test_onnx_export_of_a_triton_compile_unfuses_the_ops(tmp_path):
    """ONNX has no fused LoRA op: export rewrites it back to matmuls, merged or with LoRA inputs."""
    import numpy as np
    import onnxruntime as ort

    family = FAMILIES["mlp"]
    cm = _compile(family, dict(_spec(["fc1", "fc2"]), quantize={"targets": ["fc1"], "bits": 8}), "triton")
    assert len(_fused_nodes(cm.flat_graph_module)) == 2  # one over the int8 base, one over the float one
    x = torch.randn(4, 16)
    cm.eval()
    with torch.no_grad():
        want = cm(x).numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # LoRA defaults are initializers that are also inputs: ORT warns
    for merge in (True, False):
        path = peftc.export_onnx(cm, tmp_path / f"merge_{merge}.onnx", merge=merge)
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        run_options = None
        if not merge:  # the adapter is fed at run time from an ONNX Runtime adapter file
            adapter = ort.LoraAdapter()
            adapter.Load(str(peftc.export_adapter(cm, tmp_path / "a.onnx_adapter")))
            run_options = ort.RunOptions()
            run_options.add_active_adapter(adapter)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()}, run_options)[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert _fused_nodes(cm.flat_graph_module)  # the export worked on a copy
