"""ONNX export checked in ONNX Runtime: merged, quantized, LoRA-as-input with adapter files, CLI.

Exports are slow, so each family is compiled and exported once (module-scoped fixtures) and
the quantized files are made from the fp32 export with quantize_onnx.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from export_counter import counted_exports  # noqa: E402
from families import FAMILIES, call, compile_family, logits, randomize_adapters  # noqa: E402
from peftc.codegen.onnx import quantize_onnx  # noqa: E402

import peftc  # noqa: E402

ATOL = 1e-4
EXPORTED = ("llama", "gpt2", "bert", "vit")


def providers() -> list[str]:
    """CUDA when onnxruntime-gpu and a GPU are present, never required."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session(path, cpu_only: bool = False):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # LoRA defaults are initializers that are also inputs: ORT warns
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"] if cpu_only else providers())


def inputs_for(family, batch=3, seq=5) -> dict:
    """Batch and length differ from the compile-time example (2 x 7)."""
    inputs = family.inputs(batch, seq)
    if "input_ids" in inputs:
        mask = torch.ones_like(inputs["input_ids"])
        mask[0, -2:] = 0  # some padding, so the mask is really used
        inputs["attention_mask"] = mask
    return inputs


def run(sess, inputs: dict, run_options=None) -> np.ndarray:
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v.numpy() for k, v in inputs.items() if k in names}, run_options)[0]


def torch_logits(module, family, inputs) -> np.ndarray:
    with torch.no_grad():
        return logits(call(module, family, inputs)).numpy()


def spec_for(family) -> dict:
    return {"adapters": [{"method": "lora", "targets": list(family.targets), "r": 4, "alpha": 8}]}


@pytest.fixture(scope="module")
def compiled():
    """family name -> (model, compiled model with non-zero adapters, in eval mode)."""
    cache = {}

    def get(name):
        if name not in cache:
            family = FAMILIES[name]
            model, cm = compile_family(family, spec_for(family))
            randomize_adapters(cm)
            cache[name] = (model, cm.eval())
        return cache[name]
    return get


@pytest.fixture(scope="module")
def exports_made():
    """family name -> the torch.export calls its merged export made (merged_file records them)."""
    return {}


@pytest.fixture(scope="module")
def merged_file(compiled, tmp_path_factory, exports_made):
    cache = {}

    def get(name):
        if name not in cache:
            cm = compiled(name)[1]
            with counted_exports() as calls:
                cache[name] = peftc.export_onnx(cm, tmp_path_factory.mktemp(name) / "model.onnx")
            exports_made[name] = calls
        return cache[name]
    return get


# -- merge=True ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_merged_export_reuses_the_compile_capture(name, merged_file, exports_made):
    """The export graph is built from the capture compile kept (peftc.capture.captured): the one
    torch.export call left is torch.onnx's own trace of that graph."""
    merged_file(name)
    calls = exports_made[name]
    assert len(calls) == 1 and isinstance(calls[0], torch.fx.GraphModule)


@pytest.mark.parametrize("name", EXPORTED)
def test_merged_export_matches_eval(name, compiled, merged_file):
    family = FAMILIES[name]
    _, cm = compiled(name)
    path = merged_file(name)
    inputs = inputs_for(family)
    np.testing.assert_allclose(run(session(path, cpu_only=True), inputs), torch_logits(cm, family, inputs), atol=ATOL, rtol=0)
    if "CUDAExecutionProvider" in providers():
        np.testing.assert_allclose(run(session(path), inputs), torch_logits(cm, family, inputs), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", EXPORTED)
def test_merged_graph_has_named_inputs_weights_and_no_adapter(name, compiled, merged_file):
    model, cm = compiled(name)
    graph = onnx.load(str(merged_file(name))).graph
    assert [i.name for i in graph.input] == list(inputs_for(FAMILIES[name]))
    assert [o.name for o in graph.output] == ["logits"]
    names = {t.name for t in graph.initializer}
    assert not [n for n in names if n.startswith("peftc.")], "adapter tensors left in a merged export"
    aliases: dict[int, list[str]] = {}  # a tied weight has several names; the file uses one of them
    for fqn, param in model.named_parameters(remove_duplicate=False):
        if param.dim() == 2:
            aliases.setdefault(id(param), []).append(fqn)
    missing = [fqns for fqns in aliases.values() if not any(f in names or f + ".T" in names for f in fqns)]
    assert not missing, f"weights without a readable initializer: {missing[:5]}"


def test_tied_embedding_stored_once(compiled, merged_file):
    model, _ = compiled("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    graph = onnx.load(str(merged_file("gpt2"))).graph
    shape = list(model.lm_head.weight.shape)
    copies = [t.name for t in graph.initializer if sorted(t.dims) == sorted(shape)]
    assert len(copies) == 1, copies


# -- quantize ----------------------------------------------------------------------------
# Tiny random models: the 0.9999 / 0.95 bounds are measured on the real config by the benchmark.
@pytest.mark.parametrize("name,quantize,min_cosine", [("llama", "int8", 0.999), ("llama", "int4", 0.95),
                                                      ("gpt2", "int8", 0.999), ("gpt2", "int4", 0.95)])
def test_quantized_export_uses_ort_formats(name, quantize, min_cosine, merged_file, tmp_path):
    fp32 = merged_file(name)
    path = quantize_onnx(fp32, tmp_path / f"{quantize}.onnx", quantize)
    graph = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in graph.node)
    fp32_ops = Counter(n.op_type for n in onnx.load(str(fp32)).graph.node)
    bits = {"int8": 8, "int4": 4}[quantize]
    assert ops["GatherBlockQuantized"] >= 1 and ops["Gather"] == fp32_ops["Gather"] - ops["GatherBlockQuantized"]
    weight_ops = fp32_ops["MatMul"] + fp32_ops["Gemm"] - 2 * 2  # two attention matmuls per layer stay float
    assert ops["MatMulNBits"] == weight_ops
    assert all(a.i == bits for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
               for a in n.attribute if a.name == "bits")
    assert os.path.getsize(path) < os.path.getsize(fp32)
    family = FAMILIES[name]
    inputs = inputs_for(family)
    ref, out = run(session(fp32), inputs), run(session(path), inputs)
    cosine = float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cosine >= min_cosine


def test_export_onnx_quantize_option(tmp_path):
    family = FAMILIES["mlp"]
    model, cm = compile_family(family, spec_for(family))
    randomize_adapters(cm)
    cm.eval()
    path = peftc.export_onnx(cm, tmp_path / "mlp.onnx", quantize="int4", block_size=16)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["MatMulNBits"] == 2 and ops["MatMul"] == 0 and ops["Gemm"] == 0
    inputs = {"x": torch.randn(5, 16)}
    np.testing.assert_allclose(run(session(path), inputs), torch_logits(cm, family, inputs), atol=0.1)


# -- merge=False: LoRA weights as inputs, ORT adapter files ---------------------------
def test_unmerged_export_swaps_adapters(compiled, tmp_path):
    family = FAMILIES["llama"]
    model, cm = compiled("llama")
    path = peftc.export_onnx(cm, tmp_path / "lora.onnx", merge=False)
    graph = onnx.load(str(path)).graph
    lora_inputs = [i.name for i in graph.input if i.name.startswith("peftc.")]
    assert len(lora_inputs) == 2 * 2 * len(family.targets)  # A and B, per layer, per target
    sess = session(path)
    inputs = inputs_for(family)
    np.testing.assert_allclose(run(sess, inputs), torch_logits(model, family, inputs), atol=ATOL, rtol=0)
    saved = {}
    try:
        for seed in (1, 2):
            randomize_adapters(cm, seed=seed)
            saved[seed] = (peftc.export_adapter(cm, tmp_path / f"a{seed}.onnx_adapter"),
                           torch_logits(cm, family, inputs))
        for seed, (adapter_path, expected) in saved.items():
            adapter = ort.LoraAdapter()
            adapter.Load(str(adapter_path))
            options = ort.RunOptions()
            options.add_active_adapter(adapter)
            np.testing.assert_allclose(run(sess, inputs, options), expected, atol=ATOL, rtol=0)
    finally:
        randomize_adapters(cm)  # back to the fixture's weights


def test_export_adapter_from_saved_folder(compiled, tmp_path):
    _, cm = compiled("llama")
    cm.save_adapter(tmp_path / "adapter")
    from_cm = ort.AdapterFormat.read_adapter(str(peftc.export_adapter(cm, tmp_path / "a.onnx_adapter")))
    from_dir = ort.AdapterFormat.read_adapter(str(peftc.export_adapter(tmp_path / "adapter", tmp_path / "b.onnx_adapter")))
    a, b = from_cm.get_parameters(), from_dir.get_parameters()
    assert sorted(a) == sorted(b) and all(k.startswith("peftc.") and k[-2:] in (".A", ".B") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


# -- bad input -------------------------------------------------------------------------
def test_unknown_quantize_value_is_refused(compiled, tmp_path):
    with pytest.raises(peftc.ExportError, match="quantize"):
        peftc.export_onnx(compiled("llama")[1], tmp_path / "m.onnx", quantize="int3")
    with pytest.raises(peftc.ExportError, match="block_size"):
        peftc.export_onnx(compiled("llama")[1], tmp_path / "m.onnx", quantize="int4", block_size=24)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path_fails_before_exporting(compiled, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(peftc.ExportError, match="cannot write"):
        peftc.export_onnx(compiled("llama")[1], blocker / "m.onnx")
    with pytest.raises(peftc.ExportError, match="directory"):
        peftc.export_onnx(compiled("llama")[1], tmp_path)


class Eigen(torch.nn.Module):
    """Captures fine, but aten._linalg_eigh has no ONNX translation."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return torch.linalg.eigh(y @ y.transpose(-1, -2)).eigenvalues


def test_unexportable_model_leaves_no_file(tmp_path):
    cm = peftc.compile(Eigen(), {"adapters": [{"method": "lora", "targets": ["fc"]}]},
                       example_inputs=(torch.randn(3, 4, 4),))
    with pytest.raises(peftc.ExportError, match="eigh"):
        peftc.export_onnx(cm, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# -- CLI ---------------------------------------------------------------------------------
def cli(*argv: str) -> int:
    from peftc.cli.main import main

    return main(["export", *argv])


def test_cli_exports_model_with_adapter(compiled, tmp_path, capsys):
    _, cm = compiled("gpt2")
    cm.save_adapter(tmp_path / "adapter")
    out = tmp_path / "gpt2.onnx"
    assert cli("families:gpt2", "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--quantize", "int8") == 0
    assert "exporting" in capsys.readouterr().err
    family = FAMILIES["gpt2"]
    inputs = inputs_for(family)
    ref = torch_logits(cm, family, inputs)
    got = run(session(out), inputs)
    assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999


@pytest.mark.parametrize("argv,message", [
    (("no/such/dir", "--out", "m.onnx"), "no such directory"),
    (("families:nothing_here", "--out", "m.onnx"), "has no callable 'nothing_here'"),
    (("families:gpt2", "--out", "m.onnx", "--no-merge"), "--no-merge needs --adapter"),
])
def test_cli_bad_input_exits_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(*argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_unknown_quantize(capsys):
    assert cli("families:gpt2", "--out", "m.onnx", "--quantize", "int3") == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err
