"""Reparameterized and selective methods (dora, loha, lokr, vera, ia3, mask, trainable patterns).

Parity: one compile per family carries every method on its own sites; the reference is the
real `peft` package with each method injected on the same sites (mask, which peft lacks, is
added to the reference's weight by hand), loaded with peftc's randomized adapter tensors.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, Family, call, compile_family, logits, randomize_adapters
from peft_reference import adapter_module, entry_sites, inputs_like_capture, sharpened

import peftc

peft = pytest.importorskip("peft")
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
FF_BERT = r"re:.*layer\.\d+\.output\.dense"

# Each family: every method on sites of its own, covering bias / no bias, low-rank and full LoKr W2,
# VeRA slicing two differently sized weights, IA3 on outputs and on a feedforward input, mask on an embedding.
HYBRID = {
    "llama": [
        {"method": "dora", "targets": ["q_proj"], "r": 4, "alpha": 8, "dropout": 0.25},
        {"method": "loha", "targets": ["k_proj"], "r": 4, "alpha": 6},
        {"method": "ia3", "targets": ["v_proj", "down_proj"], "feedforward": ["down_proj"]},
        {"method": "vera", "targets": ["o_proj", "gate_proj"], "r": 16, "seed": 3},
        {"method": "lokr", "targets": ["up_proj"], "r": 4, "alpha": 8},
        {"method": "mask", "targets": ["embed_tokens"], "density": 0.05},
    ],
    "bert": [
        {"method": "dora", "targets": ["query"], "r": 4, "alpha": 8},
        {"method": "loha", "targets": ["re:.*attention\\.output\\.dense"], "r": 2, "alpha": 4},
        {"method": "ia3", "targets": ["value", FF_BERT], "feedforward": [FF_BERT]},
        {"method": "vera", "targets": ["key", "*.pooler.dense"], "r": 8},
        {"method": "lokr", "targets": ["*.intermediate.dense"], "r": 8, "alpha": 8},
        {"method": "mask", "targets": ["classifier"], "density": 0.2, "select": "random", "seed": 1},
    ],
}



class Conv1DNet(torch.nn.Module):
    """GPT-2's Conv1D ([in, out] weights, addmm) in a model cheap to capture: the "in_out" layout path."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        torch.manual_seed(0)
        self.c_attn, self.c_fc, self.c_proj = Conv1D(24, 16), Conv1D(32, 24), Conv1D(16, 32)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.2)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(torch.tanh(self.c_attn(x)))))


def conv1d_inputs(batch: int, seq: int) -> dict:
    return {"x": torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(seq))}


CONV1D = Family("conv1d", lambda: Conv1DNet().eval(), conv1d_inputs, ("c_attn",), ("c_attn", "c_fc", "c_proj"),
                example_inputs=lambda: (torch.randn(2, 3, 16),), hf=False)
HYBRID["conv1d"] = [
    {"method": "dora", "targets": ["c_attn"], "r": 4, "alpha": 8},
    {"method": "vera", "targets": ["c_fc"], "r": 8, "seed": 5},
    {"method": "ia3", "targets": ["c_proj"], "feedforward": ["c_proj"]},
]
# conv ops: LoHa and LoKr flatten the kernel into the input dimension, as peft does by default
HYBRID["convnet"] = [
    {"method": "loha", "targets": ["conv1"], "r": 2},
    {"method": "lokr", "targets": ["conv2"], "r": 1},
    {"method": "mask", "targets": ["head"], "density": 0.3},
]

# peftc tensor name -> peft attribute, where they differ
PEFT_NAMES = {
    "dora": {"A": "lora_A", "B": "lora_B", "magnitude": "lora_magnitude_vector"},
    "vera": {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d"},
    "ia3": {"l": "ia3_l"},
}


def peft_config(entry, pattern: str, feedforward: str, fan_in_fan_out: bool):
    if entry.method == "dora":
        return peft.LoraConfig(r=entry.r, lora_alpha=entry.alpha, lora_dropout=entry.dropout, target_modules=pattern,
                               use_dora=True, fan_in_fan_out=fan_in_fan_out)
    if entry.method == "loha":
        return peft.LoHaConfig(r=entry.r, alpha=entry.alpha, target_modules=pattern)
    if entry.method == "lokr":
        return peft.LoKrConfig(r=entry.r, alpha=entry.alpha, target_modules=pattern)
    if entry.method == "vera":
        return peft.VeraConfig(r=entry.r, target_modules=pattern, projection_prng_key=entry.seed,
                               fan_in_fan_out=fan_in_fan_out)
    return peft.IA3Config(target_modules=pattern, feedforward_modules=feedforward, fan_in_fan_out=fan_in_fan_out)


@torch.no_grad()
def build_reference(family, cm):
    """The family's model with each entry injected by peft (mask: added to the weight), peftc's tensors copied in."""
    ref = family.build()
    for index, (entry, slot) in enumerate(zip(cm.spec.adapters, cm.spec.entry_names())):
        paths = entry_sites(cm, index)
        if entry.method == "mask":
            for path in paths:
                site = next(s for s in cm.sites if s.path == path)
                ref.get_parameter(site.param).add_(adapter_module(cm, path, slot).delta_weight())
            continue
        pattern = "|".join(re.escape(p) for p in paths)
        feedforward = "|".join(re.escape(p) for p in paths if getattr(adapter_module(cm, p, slot), "feedforward", 0))
        fan_in_fan_out = any(s.layout == "in_out" for s in cm.sites if s.path in paths)
        config = peft_config(entry, pattern, feedforward, fan_in_fan_out)
        # the tuner class itself, as inject_adapter_in_model refuses VeRA (its A/B live on the tuner)
        ref = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](ref, config, adapter_name=slot).model
        del ref.peft_config  # each tuner keeps its own; the next one must not read this one's
        for path in paths:
            layer = ref.get_submodule(path)
            for name, tensor in adapter_module(cm, path, slot).named_parameters():
                target = getattr(layer, PEFT_NAMES.get(entry.method, {}).get(name, name))[slot]
                target = target.weight if isinstance(target, torch.nn.Module) else target
                target.copy_(tensor.view_as(target))
    for name, p in ref.named_parameters():
        p.requires_grad_(_is_peft_adapter(name, cm.spec.entry_names()))
    return ref.eval()


def _is_peft_adapter(name: str, slots: list[str]) -> bool:
    return any(slot in name.split(".") for slot in slots)


@torch.no_grad()
def randomize(cm) -> None:
    randomize_adapters(cm, std=0.2)
    for name, tensor in cm.adapter_state_dict().items():
        if name.endswith(".ia3.l"):
            tensor.add_(1.0)  # scalings around 1, as trained ones are
        elif ".loha.hada_" in name:
            tensor.mul_(3.0)  # a Hadamard product of two small products is tiny otherwise


def build_hybrid(name: str) -> SimpleNamespace:
    family = {"conv1d": CONV1D, "convnet": FAMILIES["convnet"]}.get(name) or sharpened(FAMILIES[name])
    model, cm = compile_family(family, {"adapters": HYBRID[name]})
    randomize(cm)
    return SimpleNamespace(family=family, model=model, cm=cm, ref=build_reference(family, cm),
                           inputs=inputs_like_capture(family, 2, 7))


@pytest.fixture(scope="module")
def hybrids():
    """Each family's compiled hybrid, built on first use and shared by every test of this file."""
    built: dict[str, SimpleNamespace] = {}

    def get(name: str) -> SimpleNamespace:
        if name not in built:
            built[name] = build_hybrid(name)
        return built[name]

    return get


@pytest.fixture(params=sorted(HYBRID))
def hybrid(request, hybrids):
    return hybrids(request.param)


def test_outputs_match_peft(hybrid):
    ours = logits(call(hybrid.cm, hybrid.family, hybrid.inputs))
    theirs = logits(call(hybrid.ref, hybrid.family, hybrid.inputs))
    base = logits(call(hybrid.model, hybrid.family, hybrid.inputs))
    assert (ours - base).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(ours, theirs, **TOL)


def family_methods(*methods: str) -> list[tuple[str, str]]:
    """(family, method) pairs of HYBRID for the given methods, to parametrize the `hybrid` fixture indirectly."""
    return [(f, e["method"]) for f in sorted(HYBRID) for e in HYBRID[f]
            if e["method"] in methods]


@pytest.mark.parametrize("hybrid,method", family_methods("dora", "loha", "ia3", "vera", "lokr"), indirect=["hybrid"])
@torch.no_grad()
def test_each_method_moves_the_reference(hybrid, method):
    """Each method's own share of the output is far above the tolerance, so parity covers all of them."""
    full = logits(call(hybrid.ref, hybrid.family, hybrid.inputs))
    layers = [hybrid.ref.get_submodule(p) for i, e in enumerate(hybrid.cm.spec.adapters) if e.method == method
              for p in entry_sites(hybrid.cm, i)]
    for layer in layers:
        layer._disable_adapters = True
    try:
        without = logits(call(hybrid.ref, hybrid.family, hybrid.inputs))
    finally:
        for layer in layers:
            layer._disable_adapters = False
    assert (full - without).abs().max() > 1e-3


def test_trainable_counts_match_peft(hybrid):
    cm, slots = hybrid.cm, hybrid.cm.spec.entry_names()
    for index, (entry, slot) in enumerate(zip(cm.spec.adapters, slots)):
        ours = sum(n for r in cm.records if r.entry_index == index for n in r.params_added.values())
        if entry.method == "mask":
            expected = sum(max(1, round(entry.density * cm.graph_module.get_parameter(s.param).numel()))
                           for s in cm.sites if s.path in entry_sites(cm, index))
        else:
            expected = sum(p.numel() for n, p in hybrid.ref.named_parameters() if slot in n.split("."))
        assert ours == expected, entry.method
    peft_total = sum(p.numel() for p in hybrid.ref.parameters() if p.requires_grad)
    mask_total = sum(p.numel() for n, p in getattr(cm.graph_module, "peftc").named_parameters() if ".mask." in n)
    assert cm.report().totals["trainable_params"] == peft_total + mask_total


def test_gradients_match_peft(hybrid):
    """Same gradients too: DoRA's detached norm, VeRA's frozen projections, IA3's input scaling."""
    cm, ref, family = hybrid.cm, hybrid.ref, hybrid.family
    for module in (cm, ref):
        module.zero_grad(set_to_none=True)
        logits(call(module, family, hybrid.inputs)).square().mean().backward()
    slots = cm.spec.entry_names()
    for index, (entry, slot) in enumerate(zip(cm.spec.adapters, slots)):
        if entry.method == "mask":
            continue
        for path in entry_sites(cm, index):
            layer = ref.get_submodule(path)
            for name, tensor in adapter_module(cm, path, slot).named_parameters():
                target = getattr(layer, PEFT_NAMES.get(entry.method, {}).get(name, name))[slot]
                target = target.weight if isinstance(target, torch.nn.Module) else target
                torch.testing.assert_close(tensor.grad, target.grad.view_as(tensor), atol=1e-5, rtol=1e-4,
                                           msg=f"{entry.method} {path} {name}")


@pytest.mark.parametrize("hybrid", ["llama"], indirect=True)  # its DoRA entry has dropout
def test_dora_dropout_matches_peft_in_train_mode(hybrid):
    """With dropout, peft recomputes W·dropout(x) for the DoRA term; same seed, same masks, same output."""
    outs = []
    for module in (hybrid.cm, hybrid.ref):
        module.train()
        for name, layer in module.named_modules():  # peft's LoHa/LoKr draw torch.rand(1) per call in train mode
            if type(layer).__module__.startswith(("peft.tuners.loha", "peft.tuners.lokr")):
                layer.train(False)
        torch.manual_seed(123)
        with torch.no_grad():
            outs.append(logits(call(module, hybrid.family, hybrid.inputs)))
        module.eval()
    eval_out = logits(call(hybrid.ref, hybrid.family, hybrid.inputs))
    assert (outs[1] - eval_out).abs().max() > 1e-3  # dropout did act
    torch.testing.assert_close(outs[0], outs[1], **TOL)


@pytest.mark.parametrize("hybrid", [f for f, _ in family_methods("vera")], indirect=True)
def test_vera_projections_are_peft_s(hybrid):
    """Same seed, same shared A and B as peft's projection_prng_key: nothing to copy."""
    index = next(i for i, e in enumerate(hybrid.cm.spec.adapters) if e.method == "vera")
    shared = getattr(hybrid.cm.graph_module, "peftc").get_submodule("vera")
    layer = hybrid.ref.get_submodule(entry_sites(hybrid.cm, index)[0])
    torch.testing.assert_close(shared.A, layer.vera_A["vera"], atol=0, rtol=0)
    torch.testing.assert_close(shared.B, layer.vera_B["vera"], atol=0, rtol=0)
    assert not any(".vera.A" in k or ".vera.B" in k for k in hybrid.cm.adapter_state_dict())


def test_merged_folds_every_method(hybrid):
    merged = hybrid.cm.merged()
    leftovers = [n.target for n in merged.graph_module.graph.nodes
                 if n.op == "get_attr" and str(n.target).startswith("peftc.")]
    assert leftovers == []
    with torch.no_grad():
        torch.testing.assert_close(logits(call(merged, hybrid.family, hybrid.inputs)),
                                   logits(call(hybrid.cm, hybrid.family, hybrid.inputs)), **TOL)


# -- mask: eager reference -------------------------------------------------------------------

def test_mask_matches_eager_reference_and_trains_only_its_entries():
    family = FAMILIES["mlp"]
    spec = {"adapters": [{"method": "mask", "targets": ["fc1"], "density": 0.1},
                         {"method": "mask", "targets": ["fc2"], "density": 0.25, "select": "random", "seed": 7}]}
    model, cm = compile_family(family, spec)
    randomize_adapters(cm)
    fc1, fc2 = adapter_module(cm, "fc1", "mask0"), adapter_module(cm, "fc2", "mask1")
    expected_fc1 = model.fc1.weight.abs().flatten().topk(round(0.1 * 16 * 32)).indices.sort().values
    expected_fc2 = torch.randperm(32 * 4, generator=torch.Generator().manual_seed(7))[:32].sort().values
    assert torch.equal(fc1.indices, expected_fc1) and torch.equal(fc2.indices, expected_fc2)

    def dense(module, weight):
        delta = torch.zeros(weight.numel())
        delta[module.indices] = module.values.detach()
        return weight + delta.view_as(weight)

    x = torch.randn(5, 16)
    with torch.no_grad():
        hidden = F.gelu(F.linear(x, dense(fc1, model.fc1.weight), model.fc1.bias))
        reference = F.linear(hidden, dense(fc2, model.fc2.weight), model.fc2.bias)
        torch.testing.assert_close(cm(x), reference, **TOL)
        torch.testing.assert_close(cm.merged()(x), reference, **TOL)
    before = model.fc1.weight.clone()
    cm(x).sum().backward()
    assert fc1.values.grad is not None and model.fc1.weight.grad is None
    assert torch.equal(model.fc1.weight, before)
    assert sorted(cm.adapter_state_dict()) == ["fc1.mask0.values", "fc2.mask1.values"]


# -- selective: trainable patterns ------------------------------------------------------------

def test_bitfit_trains_only_biases():
    family = FAMILIES["bert"]
    model, cm = compile_family(family, {"trainable": ["*.bias"]})
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert set(cm.adapter_state_dict()) == biases
    assert cm.report().totals["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in biases)
    inputs = inputs_like_capture(family, 2, 5)
    logits(call(cm, family, inputs)).sum().backward()
    # gradients land on the compiled model's own view of the weights, never on the user's tensors
    assert all((p.grad is not None) == (n in biases) for n, p in cm.graph_module.named_parameters()
               if not n.startswith("peftc."))
    assert all(p.grad is None for p in model.parameters())


def test_layernorm_tuning_changes_only_norms():
    family = FAMILIES["llama"]
    model, cm = compile_family(family, {"trainable": ["*norm.weight"]})
    norms = {n for n, _ in model.named_parameters() if n.endswith("norm.weight")}
    assert set(cm.adapter_state_dict()) == norms and len(norms) == 5  # 2 layers x 2 + final
    inputs = inputs_like_capture(family, 2, 5)
    before = logits(call(cm, family, inputs)).detach()
    frozen = model.model.layers[0].self_attn.q_proj.weight.clone()
    logits(call(cm, family, inputs)).square().mean().backward()
    with torch.no_grad():
        for p in cm.parameters():  # the view shares the user's memory: the step writes both
            if p.grad is not None:
                p -= 0.5 * p.grad
    assert not torch.allclose(logits(call(cm, family, inputs)), before)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, frozen)


# -- bad combinations --------------------------------------------------------------------------

@pytest.mark.parametrize("first,second", [("lora", "dora"), ("dora", "lora"), ("loha", "ia3"), ("mask", "vera")])
def test_two_reparameterizations_on_one_weight_are_refused(first, second):
    spec = {"adapters": [{"method": first, "targets": ["fc1"]}, {"method": second, "targets": ["fc1", "fc2"]}]}
    with pytest.raises(peftc.SpecError, match=r"adapters\[0\] \('%s'\) and adapters\[1\] \('%s'\)" % (first, second)):
        compile_family(FAMILIES["mlp"], spec)


def test_ia3_on_an_embedding_is_refused():
    """IA3 acts on linear and conv ops (tests/test_peft_compat.py compares conv with peft); not on lookups."""
    spec = {"adapters": [{"method": "ia3", "targets": ["wte", "c_attn"]}]}
    with pytest.raises(peftc.SpecError, match=r"adapters\[0\]\.targets: method 'ia3' cannot act on 'transformer.wte'"):
        compile_family(FAMILIES["gpt2"], spec)


def test_ia3_feedforward_must_be_a_subset_of_targets():
    spec = {"adapters": [{"method": "ia3", "targets": ["fc1"], "feedforward": ["fc2"]}]}
    with pytest.raises(peftc.SpecError, match=r"adapters\[0\]\.feedforward\[0\]"):
        compile_family(FAMILIES["mlp"], spec)


@pytest.mark.parametrize("entry,message", [
    ({"method": "mask", "targets": ["fc1"], "density": 0}, r"adapters\[0\]\.density"),
    ({"method": "mask", "targets": ["fc1"], "select": "magnitudes"}, r"did you mean 'magnitude'"),
    ({"method": "dora", "targets": ["fc1"], "rslora": True}, r"adapters\[0\]\.rslora: unknown field"),
    ({"method": "vera", "targets": ["fc1"], "r": 0}, r"adapters\[0\]\.r: expected a positive integer"),
])
def test_fields_are_validated(entry, message):
    with pytest.raises(peftc.SpecError, match=message):
        peftc.Spec.from_dict({"adapters": [entry]})


def test_spec_round_trips():
    spec = peftc.Spec.from_dict({"adapters": HYBRID["bert"]})
    assert peftc.Spec.from_dict(spec.to_dict()) == spec


def test_graph_shape_ia3_adds_one_mul_per_site():
    """IA3 adds exactly a get_attr and a mul per site: before the op on a feedforward site, after it elsewhere."""
    spec = {"adapters": [{"method": "ia3", "targets": ["fc1", "fc2"], "feedforward": ["fc2"]}]}
    _, cm = compile_family(FAMILIES["mlp"], spec)
    record = next(r for r in cm.records if r.method == "ia3")
    assert record.nodes_after - record.nodes_before == 4
    graph = cm.graph_module.graph
    fc1 = next(n for n in graph.nodes if n.name == next(s.node_name for s in cm.sites if s.path == "fc1"))
    fc2 = next(n for n in graph.nodes if n.name == next(s.node_name for s in cm.sites if s.path == "fc2"))
    assert [u.target for u in fc1.users] == [torch.ops.aten.mul.Tensor]
    assert fc2.args[0].target == torch.ops.aten.mul.Tensor
