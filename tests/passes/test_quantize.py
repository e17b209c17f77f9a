"""The quantized base (spec `quantize`): spec checks, the packing math, the quantize_base pass,
training on top of it, accuracy against the fp32 base, memory, and merging."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from families import FAMILIES, call, compile_family, logits, randomize_adapters

import peftc
from peftc.errors import SpecError
from peftc.ir import quantized, weight_codec

LORA_QV = {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4}
FORMATS = {"int8": {"bits": 8}, "int4": {"bits": 4, "format": "int"}, "nf4": {"bits": 4, "format": "nf4"}}


def llama(hidden=128, intermediate=160, layers=1, vocab=64, seed=0):
    """A small LLaMA-style config; 160 is not a multiple of 64, like the benchmark's 1376."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def ids(batch, seq, vocab=64, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def compile_llama(model, quantize, adapters=(LORA_QV,)):
    return peftc.compile(model, {"adapters": list(adapters), "quantize": quantize})


def run(module, x):
    """Logits, called as compile() captured (with a mask): another call signature would recapture."""
    return module(input_ids=x, attention_mask=torch.ones_like(x)).logits


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


# -- spec ------------------------------------------------------------------------------------
def test_spec_round_trip_and_defaults():
    spec = peftc.Spec.from_dict({"adapters": [LORA_QV], "quantize": {"format": "nf4", "double_quant": True}})
    q = spec.quantize
    assert (q.bits, q.format, q.group_size, q.double_quant, q.compute_dtype) == (4, "nf4", 64, True, "float32")
    assert q.targets == () and q.format_name == "nf4"
    assert peftc.Spec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["quantize"]["targets"] == []
    int8 = peftc.Spec.from_dict({"adapters": [LORA_QV], "quantize": {"bits": 8, "exclude": ["o_proj"]}})
    assert peftc.Spec.from_dict(int8.to_dict()) == int8  # what save_adapter writes to spec.json


@pytest.mark.parametrize("section, field", [
    ({"bits": 8, "format": "nf4"}, "quantize.bits"),
    ({"bits": 3}, "quantize.bits"),
    ({"format": "fp4"}, "quantize.format"),
    ({"bits": 8, "group_size": 32}, "quantize.group_size"),
    ({"bits": 8, "double_quant": True}, "quantize.double_quant"),
    ({"group_size": 0}, "quantize.group_size"),
    ({"group_size": 33}, "quantize.group_size"),
    ({"compute_dtype": "float16"}, "quantize.compute_dtype"),
    ({"bits": 4, "grup_size": 64}, "quantize.grup_size"),
    ({"targets": "re:("}, "quantize.targets"),
])
def test_invalid_sections_name_the_field(section, field):
    with pytest.raises(SpecError, match=f"^{field}"):
        peftc.Spec.from_dict({"adapters": [LORA_QV], "quantize": section})


def test_errors_at_compile_name_field_and_site():
    mlp, conv = FAMILIES["mlp"], FAMILIES["convnet"]  # cheap to capture
    with pytest.raises(SpecError, match="quantize.targets\\[0\\]: 'fc3' matches no module path"):
        compile_family(mlp, {"adapters": [{"method": "lora", "targets": ["fc1"]}],
                             "quantize": {"bits": 8, "targets": ["fc3"]}})
    with pytest.raises(SpecError, match="quantize.targets: 'conv1' is a conv site"):
        compile_family(conv, {"adapters": [{"method": "lora", "targets": ["head"]}],
                              "quantize": {"bits": 8, "targets": ["conv1", "head"]}})


# -- the math --------------------------------------------------------------------------------
def test_nibbles_round_trip():
    codes = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    packed = weight_codec.pack_nibbles(codes)
    assert packed.shape == (6, 5) and packed.dtype == torch.uint8
    assert torch.equal(weight_codec.unpack_nibbles(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)  # MatMulNBits order


@pytest.mark.parametrize("fmt, double", [("int8", False), ("int4", False), ("nf4", False), ("nf4", True),
                                         ("int4", True)])
def test_quantize_round_trip(fmt, double):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    tensors = weight_codec.quantize(w, fmt, 64, double)
    back = weight_codec.dequantize(tensors, fmt, 64, 512, 64)
    rel = float((back - w).norm() / w.norm())
    assert rel < {"int8": 0.01, "int4": 0.15, "nf4": 0.12}[fmt]
    bits = 8 * weight_codec.nbytes(tensors) / w.numel()
    assert bits <= {"int8": 8.2, "int4": 4.65, "nf4": 4.5}[fmt] - (0.3 if double else 0)


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_ragged_last_group_is_padded(fmt):
    """1376 (the LLaMA benchmark's intermediate size) is not a multiple of 64: the last group is zero-padded."""
    w = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    tensors = weight_codec.quantize(w, fmt, 64)
    assert tensors[0].shape == (8, 64) and tensors[1].shape == (8, 2)
    back = weight_codec.dequantize(tensors, fmt, 8, 100, 64)
    assert back.shape == w.shape and float((back - w).norm() / w.norm()) < 0.15


def test_zero_rows_and_groups_stay_zero():
    w = torch.zeros(4, 128)
    w[1, :64] = 1.0
    for fmt in weight_codec.FORMATS:
        back = weight_codec.dequantize(weight_codec.quantize(w, fmt, 64), fmt, 4, 128, 64)
        assert torch.allclose(back, w, atol=1e-6), fmt


def absmax_int4(w, group):
    """QLoRA's "Int4" baseline: symmetric, scale = absmax / 7 per group."""
    groups = w.view(w.shape[0], -1, group)
    scale = groups.abs().amax(-1, keepdim=True) / 7
    return ((groups / scale).round().clamp(-7, 7) * scale).view_as(w)


def test_nf4_beats_int4_on_normal_weights():
    """The reason NF4 exists: its levels are N(0,1) quantiles, so normal weights lose less than
    with evenly spaced absmax int4. peftc's int4 is asymmetric (min/max + zero point), which
    closes that gap: it is within a few percent of NF4."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    mse = {fmt: float((weight_codec.dequantize(weight_codec.quantize(w, fmt, 64), fmt, 256, 512, 64) - w).pow(2).mean())
           for fmt in ("int4", "nf4")}
    plain = float((absmax_int4(w, 64) - w).pow(2).mean())
    assert mse["nf4"] < 0.8 * plain, (mse, plain)
    assert mse["int4"] < plain and abs(mse["int4"] / mse["nf4"] - 1) < 0.1, (mse, plain)


@pytest.fixture(scope="module")
def formats():
    """One random-weight LLaMA, compiled once per format (adapters left at zero: B = 0)."""
    model = llama()
    versions = {name: p._version for name, p in model.named_parameters()}
    quantize = {**FORMATS, "nf4": {**FORMATS["nf4"], "double_quant": True}}
    return model, versions, {name: compile_llama(model, q) for name, q in quantize.items()}


def test_pass_rewrites_every_linear_but_the_head(formats):
    model, versions, compiled = formats
    gm = compiled["nf4"].flat_graph_module
    ops = [n for n in gm.graph.nodes if n.target == quantized.OP]
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default
               and (n.meta.get("peftc") or {}).get("method") != "lora"]
    assert len(ops) == 7 and len(linears) == 1  # 7 projections; lm_head stays fp32
    quantized_sites = [s.path for s in compiled["nf4"].sites if s.op == "peftc.quantized_linear"]
    assert len(quantized_sites) == 7 and quantized_sites[-1] == "model.layers.0.mlp.down_proj"
    with pytest.raises(AttributeError):  # the graph module no longer holds the fp32 weight
        gm.get_parameter("model.layers.0.mlp.up_proj.weight")
    names = dict(gm.named_buffers())
    assert names["quantized.model.layers.0.mlp.up_proj.weight.codes"].dtype == torch.uint8
    assert "quantized.model.layers.0.mlp.up_proj.weight.scale_codes" in names  # double-quantized scales
    assert "quantized.model.layers.0.mlp.up_proj.weight.zero_points" in dict(
        compiled["int4"].flat_graph_module.named_buffers())
    assert gm.get_parameter("lm_head.weight").data_ptr() == model.lm_head.weight.data_ptr()  # shared memory
    # the user's model is untouched
    assert {name: p._version for name, p in model.named_parameters()} == versions
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_exclude_everything_is_a_no_op():
    model = FAMILIES["mlp"].build()
    spec = {"adapters": [{"method": "lora", "targets": ["fc1"]}], "quantize": {"bits": 8, "exclude": ["fc1"]}}
    cm = peftc.compile(model, spec, example_inputs=(torch.randn(3, 16),))
    record = cm.records[0]
    assert record.name == "quantize_base" and not record.modified and record.nodes_before == record.nodes_after
    assert cm.flat_graph_module.get_parameter("fc1.weight").data_ptr() == model.fc1.weight.data_ptr()


def test_quantized_graph_re_exports():
    """The custom op has a fake kernel: torch.export (hence ONNX exporters) sees one node per site."""
    model = FAMILIES["mlp"].build()  # fc1 (16 inputs: one zero-padded group of 64) is quantized, fc2 is the head
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["fc1"]}], "quantize": {"format": "nf4"}},
                       example_inputs=(torch.randn(3, 16),))
    x = torch.randn(5, 16)
    program = torch.export.export(cm.flat_graph_module, (x,), strict=False)
    assert sum(n.target == quantized.OP for n in program.graph.nodes) == 1
    assert "quantized.fc1.weight.codes" in program.state_dict
    torch.testing.assert_close(program.module()(x), cm(x))


def test_report_shows_packed_bytes(formats):
    _, _, compiled = formats
    for name, ratio in (("int8", 0.27), ("int4", 0.16), ("nf4", 0.16)):
        totals = compiled[name].report().to_dict()["totals"]
        q = totals["quantized_base"]
        assert q["formats"] == [name] and q["weights"] == 7 and q["ratio_vs_fp32"] <= ratio
        assert q["bytes"] == sum(b.numel() * b.element_size() for b in compiled[name].flat_graph_module.quantized.buffers())
        assert q["fp32_bytes"] == 4 * q["params"] and totals["total_params"] > q["params"]
    assert "quantized base: nf4, 7 weights" in str(compiled["nf4"].report())


# -- accuracy --------------------------------------------------------------------------------
@torch.no_grad()
def test_logits_cosine_against_fp32_base(formats):
    model, _, compiled = formats
    x = ids(2, 16)
    ref = run(model, x)
    for name, floor in (("int8", 0.999), ("int4", 0.95), ("nf4", 0.95)):
        assert cosine(run(compiled[name], x), ref) >= floor, name


def _bigram_batch(batch, seq, vocab, seed):
    """Sequences following t -> (5 t + 3) mod vocab from a random start: a task a tiny model learns."""
    start = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(seed))
    steps = [start]
    for _ in range(seq - 1):
        steps.append((5 * steps[-1] + 3) % vocab)
    return torch.cat(steps, dim=1)


@pytest.fixture(scope="module")
def trained_llama():
    model = llama(seed=1).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(40):
        x = _bigram_batch(16, 12, 64, seed=step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), float(loss.detach())


@torch.no_grad()
def test_argmax_agreement_on_a_trained_model(trained_llama):
    model, loss = trained_llama
    assert loss < 0.5  # it learned the task
    x = _bigram_batch(32, 12, 64, seed=999)
    ref = run(model, x).argmax(-1)
    for name, floor in (("int8", 0.99), ("nf4", 0.95)):
        cm = compile_llama(model, FORMATS[name])
        agree = float((run(cm, x).argmax(-1) == ref).float().mean())
        assert agree >= floor, (name, agree)


# -- training on top -------------------------------------------------------------------------
def test_fp32_weights_freed_then_adapters_train():
    """The compiled model keeps no reference to the fp32 weights it packed, and LoRA trains on top."""
    model = llama()
    cm = compile_llama(model, FORMATS["nf4"])
    packed = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    head = model.lm_head.weight.data_ptr()
    params = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert packed() is None  # nothing in cm holds the packed fp32 weight
    assert cm.flat_graph_module.get_parameter("lm_head.weight").data_ptr() == head  # not quantized: shared memory
    assert all(t.dtype == torch.float32 for t in cm.adapter_state_dict().values())
    opt = torch.optim.Adam([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    x = ids(4, 12)
    losses = []
    cm.train()
    for _ in range(8):
        # a new call signature, captured from the weight-less shell (use_cache=False: a plain graph, not the
        # cached graph a call returning the cache derives)
        loss = cm(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    cm.eval()
    assert len(cm.graphs) == 2 and losses[-1] < losses[0] - 0.05, losses
    with_grad = {n for n, p in cm.adapter_root.named_parameters() if p.grad is not None}
    assert with_grad == set(cm.adapter_state_dict())
    assert all(p().grad is None for p in params if p() is not None)
    assert all(not b.requires_grad for b in cm.flat_graph_module.quantized.buffers())


def test_gpt2_conv1d_and_bf16_compute():
    family = FAMILIES["gpt2"]  # Conv1D: addmm against an [in, out] weight
    spec = {"adapters": [{"method": "lora", "targets": ["c_attn"]}],
            "quantize": {"bits": 4, "format": "nf4", "group_size": 16, "compute_dtype": "bfloat16"}}
    model, cm = compile_family(family, spec)
    x = family.inputs(2, 9)
    x["attention_mask"] = torch.ones_like(x["input_ids"])  # as captured: no second capture
    with torch.no_grad():
        out, ref = logits(call(cm, family, x)), logits(call(model, family, x))
    assert out.dtype == torch.float32 and cosine(out, ref) > 0.95
    assert sum(n.target == quantized.OP for n in cm.flat_graph_module.graph.nodes) == 8  # 4 per block; the tied head is kept
    loss = logits(call(cm, family, x)).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in cm.adapter_root.parameters())


# -- merging ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merge_pair():
    """An nf4-based compiled model with non-zero LoRA, and the eager fp32 model with that LoRA folded in."""
    model = llama()
    cm = compile_llama(model, FORMATS["nf4"])
    randomize_adapters(cm, std=0.05)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for path, module in cm.adapter_root.named_modules():
            if hasattr(module, "delta_weight"):
                reference.get_submodule(path.rsplit(".", 1)[0]).weight += module.delta_weight()
    return model, cm, reference


@torch.no_grad()
def test_merged_default_is_full_precision(merge_pair):
    model, cm, reference = merge_pair
    x = ids(2, 10)
    merged = cm.merged()
    gm = merged.flat_graph_module
    assert not any(n.target == quantized.OP for n in gm.graph.nodes) and "quantized" not in gm._modules
    assert gm.get_parameter("model.layers.0.mlp.up_proj.weight").dtype == torch.float32
    torch.testing.assert_close(run(merged, x), run(cm, x), atol=1e-5, rtol=1e-5)
    assert any(n.target == quantized.OP for n in cm.flat_graph_module.graph.nodes)  # cm untouched
    half = cm.merged(dtype=torch.bfloat16)
    assert half.flat_graph_module.get_parameter("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert cosine(run(half, x), run(cm, x)) > 0.999
    exact = cm.merged(base_state_dict=model.state_dict())  # original W + ΔW: the fp32 model, merged
    torch.testing.assert_close(run(exact, x), run(reference, x), atol=1e-5, rtol=1e-5)


def test_merged_options_need_a_quantized_base():
    cm = peftc.compile(FAMILIES["mlp"].build(), {"adapters": [{"method": "lora", "targets": ["fc1"]}]},
                       example_inputs=(torch.randn(3, 16),))
    with pytest.raises(ValueError, match="applies to a quantized base"):
        cm.merged(requantize=True)


@torch.no_grad()
def test_requantize_reports_what_survives(merge_pair):
    _, cm, _ = merge_pair
    x = ids(2, 10)
    merged = cm.merged(requantize=True)
    report = merged.requantization
    assert set(report["sites"]) == {f"model.layers.0.self_attn.{p}.weight" for p in ("q_proj", "v_proj")}
    assert report["from"] == "dequantized base"
    assert 0 < report["lost"] < 1 and abs(report["kept"] + report["lost"] - 1) < 1e-9
    assert sum(n.target == quantized.OP for n in merged.flat_graph_module.graph.nodes) == 7
    assert cosine(run(merged, x), run(cm, x)) > 0.99


@torch.no_grad()
def test_requantizing_a_small_adapter_erases_it(merge_pair):
    """At ‖ΔW‖/‖W‖ ≈ 1% almost no NF4 code moves: why merged() stays full precision by default."""
    model, cm, _ = merge_pair  # the last test to use merge_pair: it rescales the adapters
    for path, module in cm.adapter_root.named_modules():
        if hasattr(module, "delta_weight"):
            weight = model.get_submodule(path.rsplit(".", 1)[0]).weight
            module.B.mul_(0.01 * weight.norm() / module.delta_weight().norm())
    report = cm.merged(requantize=True).requantization
    for site in report["sites"].values():
        assert site["codes_changed"] < 0.10, site
    assert report["lost"] > 0.5, report


# -- ONNX ------------------------------------------------------------------------------------
class TwoLayer(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(128, hidden)
        self.fc2 = torch.nn.Linear(hidden, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("section", [
    {"bits": 8},
    {"bits": 4, "group_size": 64, "double_quant": True},  # fc2 has 96 inputs: a ragged second block
    {"format": "nf4", "group_size": 32},
    {"format": "nf4", "group_size": 64},  # fc2's 96 inputs: a ragged group, dequantized in the graph
])
def test_onnx_export_keeps_the_base_packed(tmp_path, section):
    """int8 -> DequantizeLinear, int4 -> MatMulNBits, nf4 -> MatMulBnb4; ONNX Runtime matches peftc."""
    import onnx
    import onnxruntime as ort
    from peftc.codegen.onnx.quantized_linear import export

    hidden = 96
    model = TwoLayer(hidden)
    spec = {"adapters": [{"method": "lora", "targets": ["fc1"], "r": 4}],  # A, B: 512 and 4·hidden floats
            "quantize": {**section, "targets": ["fc1", "fc2"]}}
    cm = peftc.compile(model, spec, example_inputs=(torch.randn(3, 128),))
    randomize_adapters(cm)
    x = torch.randn(5, 128)
    export(cm.flat_graph_module, (x,), str(tmp_path / "q.onnx"))
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    float_sizes = [int(torch.tensor(i.dims).prod()) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert 128 * hidden not in float_sizes and hidden * 8 not in float_sizes  # no fp32 copy of either weight
    session = ort.InferenceSession(str(tmp_path / "q.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), cm(x), atol=1e-4, rtol=1e-4)
