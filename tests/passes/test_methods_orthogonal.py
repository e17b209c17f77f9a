"""Orthogonal and sparse high-rank methods (oft, boft, hra, shira) against the real `peft` package.

One compile per family carries every method on sites of its own (with the variants spread over
them: COFT, block sharing, exact Cayley, butterfly factors, Gram-Schmidt, odd r, seeds); the
reference is the family's model with each entry injected by peft's own tuner on the same sites,
holding peftc's randomized adapter tensors.

Two references are adjusted, both documented in the README:
- BOFT with more than one butterfly factor: peft needs its CUDA extension for that (on CPU it
  silently falls back to one factor), so the tests give it a torch block-diagonal in its place
  (`TorchBlockDiag`); everything else is peft's own code.
- OFT on Conv2d: peft's unmerged forward rotates unfolded input patches and folds them back,
  which disagrees with its own merge (W·Rᵀ on the flattened filter). peftc rotates the weight,
  so the reference runs peft's merge formula with peft's rotation matrix (`merged_oft_conv`).
"""

from __future__ import annotations

import copy
import re
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, Family, call, compile_family, logits
from peft_reference import adapter_module, entry_sites, inputs_like_capture, sharpened
from torch import nn

import peftc
from peftc import SpecError

peft = pytest.importorskip("peft")
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from peft.tuners.boft import layer as boft_layer  # noqa: E402
from peft.tuners.oft.layer import Conv2d as PeftOftConv2d  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
METHODS = ("oft", "boft", "hra", "shira")


class ConvNet3(nn.Module):
    """Three 3x3 convs (one per orthogonal method, each a kernel the rotation must flatten) and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.relu(self.conv3(h)).mean(dim=(2, 3)))


CONV = Family("conv3", lambda: ConvNet3().eval(), lambda b, s: {"x": torch.randn(b, 3, 10, 10)}, ("conv1",),
              ("conv1", "conv2", "conv3"), example_inputs=lambda: (torch.randn(2, 3, 10, 10),), hf=False)

HYBRID = {
    "llama": [
        {"method": "oft", "targets": ["q_proj"], "block_size": 16, "coft": True, "eps": 0.5},
        {"method": "oft", "targets": ["k_proj"], "r": 4, "block_size": 0, "cayley_neumann": False,
         "block_share": True},
        {"method": "boft", "targets": ["v_proj", "o_proj"], "block_size": 8, "n_butterfly_factor": 2},
        {"method": "hra", "targets": ["gate_proj"], "r": 4},
        {"method": "hra", "targets": ["up_proj"], "r": 3, "gram_schmidt": True},
        {"method": "shira", "targets": ["down_proj"], "r": 2},
    ],
    "bert": [
        # block_size 32 does not divide 48: peft (and peftc) move it to 24
        {"method": "oft", "targets": ["query"], "module_dropout": 0.25, "neumann_terms": 3},
        {"method": "boft", "targets": ["key"], "block_size": 0, "block_num": 6, "dropout": 0.5},
        {"method": "hra", "targets": ["value"], "r": 4, "gram_schmidt": True},
        {"method": "hra", "targets": [r"re:.*attention\.output\.dense"], "r": 5},
        {"method": "shira", "targets": ["*.intermediate.dense"], "r": 3, "seed": 7},
    ],
    "conv3": [
        {"method": "oft", "targets": ["conv1"], "block_size": 9},
        {"method": "boft", "targets": ["conv2"], "block_size": 4, "n_butterfly_factor": 2},
        {"method": "hra", "targets": ["conv3"], "r": 4},
        {"method": "shira", "targets": ["head"], "r": 1},
    ],
}

# peftc tensor name -> peft attribute of the tuner layer, per method
PEFT_ATTRS = {"oft": {"oft_R": "oft_R"}, "boft": {"boft_R": "boft_R", "boft_s": "boft_s"},
              "hra": {"hra_u": "hra_u"}, "shira": {"shira_weight": "shira_weight"}}


class TorchBlockDiag:
    """peft's fbd_cuda extension (block-diagonal of [N, D, H, H] blocks and its backward) in torch."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        size = blocks.shape[-1]
        parts = [grad[:, i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(blocks.shape[1])]
        return [torch.stack(parts, dim=1)]


@pytest.fixture(scope="module", autouse=True)
def peft_butterflies():
    saved = boft_layer._FBD_CUDA
    boft_layer._FBD_CUDA = TorchBlockDiag()
    yield
    boft_layer._FBD_CUDA = saved


def peft_config(entry, pattern: str):
    if entry.method == "oft":
        return peft.OFTConfig(r=entry.r, oft_block_size=entry.block_size, module_dropout=entry.module_dropout,
                              coft=entry.coft, eps=entry.eps, block_share=entry.block_share,
                              use_cayley_neumann=entry.cayley_neumann, num_cayley_neumann_terms=entry.neumann_terms,
                              target_modules=pattern)
    if entry.method == "boft":
        return peft.BOFTConfig(boft_block_size=entry.block_size, boft_block_num=entry.block_num,
                               boft_n_butterfly_factor=entry.n_butterfly_factor, boft_dropout=entry.dropout,
                               target_modules=pattern)
    if entry.method == "hra":
        return peft.HRAConfig(r=entry.r, apply_GS=entry.gram_schmidt, target_modules=pattern)
    return peft.ShiraConfig(r=entry.r, random_seed=entry.seed, target_modules=pattern)


def merged_oft_conv(layer: PeftOftConv2d, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's OFT Conv2d computed as its merge() computes the weight: W·Rᵀ on [out, in·k·k], R from peft.
    Bound to the layer as its forward (a bound method, so deepcopy rebinds it to the copy)."""
    base = layer.get_base_layer()
    if layer.disable_adapters:
        return base(x)
    rotation = layer.get_delta_weight(layer.active_adapters[0])
    weight = (rotation @ base.weight.flatten(1).T).T.reshape(base.weight.shape)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)


@torch.no_grad()
def build_reference(family, cm):
    ref = family.build()
    for index, (entry, slot) in enumerate(zip(cm.spec.adapters, cm.spec.entry_names())):
        paths = entry_sites(cm, index)
        config = peft_config(entry, "|".join(re.escape(p) for p in paths))
        ref = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](ref, config, adapter_name=slot).model
        del ref.peft_config  # each tuner keeps its own; the next one must not read this one's
        for path in paths:
            layer = ref.get_submodule(path)
            ours = adapter_module(cm, path, slot)
            for name, tensor in ours.named_parameters():
                target = getattr(layer, PEFT_ATTRS[entry.method][name])[slot]
                (target.weight if isinstance(target, nn.Module) else target).copy_(tensor)
            if entry.method == "shira":
                assert torch.equal(layer.shira_indices[slot].long(), ours.shira_indices)  # peft's mask, drawn alike
            if isinstance(layer, PeftOftConv2d):
                layer.forward = types.MethodType(merged_oft_conv, layer)
    for index, slot in enumerate(cm.spec.entry_names()):  # a later tuner of the same type re-points earlier layers
        for path in entry_sites(cm, index):
            ref.get_submodule(path).set_adapter(slot)
    for name, p in ref.named_parameters():
        p.requires_grad_(any(slot in name.split(".") for slot in cm.spec.entry_names()))
    return ref.eval()


@torch.no_grad()
def randomize(cm, seed: int = 0) -> None:
    """Non-zero adapters: generators ~0.2 (rotations well away from I), BOFT scales around 1."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in cm.adapter_state_dict().items():
        tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2 + (1.0 if name.endswith("boft_s") else 0.0))


def build_hybrid(name: str) -> SimpleNamespace:
    family = CONV if name == "conv3" else sharpened(FAMILIES[name], classifier_scale=30)
    model, cm = compile_family(family, {"adapters": HYBRID[name]})
    randomize(cm)
    torch.manual_seed(1)
    return SimpleNamespace(family=family, model=model, cm=cm.eval(), ref=build_reference(family, cm),
                           inputs=inputs_like_capture(family, 2, 7))


@pytest.fixture(scope="module")
def hybrids():
    built: dict[str, SimpleNamespace] = {}

    def get(name: str) -> SimpleNamespace:
        if name not in built:
            built[name] = build_hybrid(name)
        return built[name]

    return get


@pytest.fixture(params=sorted(HYBRID))
def hybrid(request, hybrids):
    return hybrids(request.param)


# -- parity with peft ------------------------------------------------------------------------

def test_outputs_match_peft(hybrid):
    with torch.no_grad():
        ours = logits(call(hybrid.cm, hybrid.family, hybrid.inputs))
        theirs = logits(call(hybrid.ref, hybrid.family, hybrid.inputs))
        base = logits(call(hybrid.model, hybrid.family, hybrid.inputs))
    assert (ours - base).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("hybrid", ["llama", "bert", "conv3"], indirect=True)
@torch.no_grad()
def test_each_entry_moves_the_reference(hybrid):
    """Each entry's own share of the output is far above the tolerance, so parity covers all of them."""
    full = logits(call(hybrid.ref, hybrid.family, hybrid.inputs))
    for index, entry in enumerate(hybrid.cm.spec.adapters):
        layers = [hybrid.ref.get_submodule(p) for p in entry_sites(hybrid.cm, index)]
        for layer in layers:
            layer._disable_adapters = True
        try:
            without = logits(call(hybrid.ref, hybrid.family, hybrid.inputs))
        finally:
            for layer in layers:
                layer._disable_adapters = False
        assert (full - without).abs().max() > 1e-3, entry


def test_trainable_counts_match_peft(hybrid):
    cm = hybrid.cm
    for index, slot in enumerate(cm.spec.entry_names()):
        ours = sum(n for r in cm.records if r.entry_index == index for n in r.params_added.values())
        assert ours == sum(p.numel() for n, p in hybrid.ref.named_parameters() if slot in n.split(".")), slot
    peft_total = sum(p.numel() for p in hybrid.ref.parameters() if p.requires_grad)
    assert cm.report().totals["trainable_params"] == peft_total


def test_gradients_and_one_step_match_peft(hybrid):
    """Same gradients for every adapter tensor, then the same outputs after one SGD step on both."""
    cm, ref = copy.deepcopy(hybrid.cm), copy.deepcopy(hybrid.ref)
    pairs = peft_pairs(cm, ref)
    shape = logits(call(ref, hybrid.family, hybrid.inputs)).shape
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    for module in (cm, ref):
        (logits(call(module, hybrid.family, hybrid.inputs)) * weights).sum().backward()
    for name, (ours, theirs) in pairs.items():
        assert ours.grad is not None and ours.grad.abs().max() > 0, name
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4, msg=name)
    with torch.no_grad():
        for ours, theirs in pairs.values():
            ours -= 0.05 * ours.grad
            theirs -= 0.05 * theirs.grad
        if not any(getattr(e, "coft", False) for e in cm.spec.adapters):  # see the README: COFT stores differ
            torch.testing.assert_close(logits(call(cm, hybrid.family, hybrid.inputs)),
                                       logits(call(ref, hybrid.family, hybrid.inputs)), **TOL)


def peft_pairs(cm, ref) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for index, (entry, slot) in enumerate(zip(cm.spec.adapters, cm.spec.entry_names())):
        for path in entry_sites(cm, index):
            layer = ref.get_submodule(path)
            for name, tensor in adapter_module(cm, path, slot).named_parameters():
                target = getattr(layer, PEFT_ATTRS[entry.method][name])[slot]
                out[f"{path}.{slot}.{name}"] = (tensor, target.weight if isinstance(target, nn.Module) else target)
    return out


def test_merged_matches_unmerged_and_peft_merge(hybrid):
    with torch.no_grad():
        merged = hybrid.cm.merged()
        torch.testing.assert_close(logits(call(merged, hybrid.family, hybrid.inputs)),
                                   logits(call(hybrid.cm, hybrid.family, hybrid.inputs)), **TOL)
        ref = copy.deepcopy(hybrid.ref)
        theirs = {}
        for index, slot in enumerate(hybrid.cm.spec.entry_names()):
            for path in entry_sites(hybrid.cm, index):
                layer = ref.get_submodule(path)
                layer.merge(adapter_names=[slot])  # peft's own merge of this entry's layer
                theirs[f"{path}.weight"] = layer.get_base_layer().weight
    ours = dict(merged.flat_graph_module.named_parameters())
    adapted = {s.param for s in hybrid.cm.sites if any(s.path in r.sites for r in hybrid.cm.records)}
    assert adapted == set(theirs)
    for name in adapted:
        assert not torch.allclose(ours[name], hybrid.model.get_parameter(name)), name  # the fold changed it
        torch.testing.assert_close(ours[name], theirs[name], **TOL, msg=name)
    assert not any(n.meta.get("peftc", {}).get("method") in METHODS for n in merged.flat_graph_module.graph.nodes)


# -- graph shape, report, export -------------------------------------------------------------

@pytest.mark.parametrize("hybrid", ["llama"], indirect=True)
def test_one_tagged_output_per_site_and_report_families(hybrid):
    cm = hybrid.cm
    outputs = [n.meta["peftc"] for n in cm.flat_graph_module.graph.nodes
               if n.meta.get("peftc", {}).get("role") == "output"]
    for index, slot in enumerate(cm.spec.entry_names()):
        sites = entry_sites(cm, index)
        assert sorted(t["site"] for t in outputs if t["slot"] == slot) == sorted(sites)
    rows = {(m["entry"], m["method"]): m for m in cm.report().to_dict()["methods"]}
    for (index, method), row in rows.items():
        assert row["family"] == ("selective" if method == "shira" else "reparameterized")
        assert row["merge"] == "folded into weights"


@pytest.mark.parametrize("hybrid", ["conv3"], indirect=True)  # all four methods, linear and conv sites
def test_merged_onnx_export_matches_onnxruntime(hybrid, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = peftc.export_onnx(hybrid.cm, tmp_path / "model.onnx")
    x = torch.randn(3, 3, 12, 12)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = hybrid.cm(x).numpy()
    assert abs(got - expected).max() < 1e-4


def test_dropout_replaces_blocks_in_train_mode_only():
    """boft dropout / oft module_dropout: random blocks become I in training; eval is deterministic."""
    family = FAMILIES["mlp"]
    _, cm = compile_family(family, {"adapters": [
        {"method": "boft", "targets": ["fc1"], "block_size": 4, "dropout": 0.5},
        {"method": "oft", "targets": ["fc2"], "block_size": 8, "module_dropout": 0.5}]})
    randomize(cm)
    x = torch.randn(4, 16)
    with torch.no_grad():
        train = [cm.train()(x) for _ in range(4)]
        evals = [cm.eval()(x) for _ in range(2)]
        merged = cm.merged()(x)
    assert any((train[0] - t).abs().max() > 1e-3 for t in train[1:])
    torch.testing.assert_close(evals[0], evals[1], atol=0, rtol=0)
    torch.testing.assert_close(merged, evals[0], **TOL)
    assert all((t - evals[0]).abs().max() > 1e-4 for t in train)


@pytest.mark.parametrize("block_size, factors", [(2, 2), (4, 2), (2, 3), (2, 4)])
def test_butterfly_permutations_are_peft_s(block_size, factors):
    """BoftWeights' reshape-and-transpose butterflies equal peft's permutation matrices."""
    from peftc.passes.insert_boft import BoftWeights

    dimension = 32
    module = SimpleNamespace(boft_R=torch.zeros(factors, dimension // block_size, block_size, block_size))
    layer = object.__new__(boft_layer.Linear)
    weight = torch.randn(3, dimension)
    for factor in range(factors):
        perm = layer.block_butterfly_perm(dimension, dimension // block_size // 2 ** factor, block_size // 2,
                                          factors - 1)
        p = layer.perm2mat(perm)
        torch.testing.assert_close(BoftWeights._butterfly(module, weight, factor, inverse=False), weight @ p.T)
        torch.testing.assert_close(BoftWeights._butterfly(module, weight, factor, inverse=True), weight @ p)


# -- PEFT checkpoints, both ways ---------------------------------------------------------------

INTEROP = {
    "oft": (FAMILIES["mlp"], lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["fc1", "fc2"],
                                                    coft=True, eps=0.3, use_cayley_neumann=False)),
    "boft": (FAMILIES["convnet"], lambda: peft.BOFTConfig(boft_block_size=9, target_modules=["conv1", "conv2"],
                                                          modules_to_save=["head"])),
    "hra": (FAMILIES["convnet"], lambda: peft.HRAConfig(r=2, apply_GS=True, target_modules=["conv2", "head"],
                                                        bias="hra_only")),
    "shira": (FAMILIES["mlp"], lambda: peft.ShiraConfig(r=1, random_seed=3, target_modules=["fc1", "fc2"])),
}


@pytest.mark.parametrize("method", METHODS)
def test_peft_checkpoints_round_trip(method, tmp_path):
    family, make_config = INTEROP[method]
    x = family.example_inputs()
    model = peft.get_peft_model(family.build(), make_config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval().save_pretrained(tmp_path / "peft")
    expected = peft.PeftModel.from_pretrained(family.build(), tmp_path / "peft").eval()(*x)
    assert (expected - family.build()(*x)).abs().max() > 1e-2

    cm = peftc.from_peft(family.build(), tmp_path / "peft", example_inputs=x).eval()
    assert cm.spec.adapters[0].method == method
    torch.testing.assert_close(cm(*x), expected, **TOL)
    cm.save_adapter(tmp_path / "out", format="peft")
    reloaded = peft.PeftModel.from_pretrained(family.build(), tmp_path / "out").eval()
    torch.testing.assert_close(reloaded(*x), expected, **TOL)

    spec = peftc.Spec.from_peft_config(make_config())
    again = peftc.Spec.from_peft_config(spec.to_peft_config())
    assert again.adapters == spec.adapters and spec.adapters[0].method == method


def test_peft_config_fields_map_to_peftc_names():
    spec = peftc.Spec.from_peft_config(peft.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"], coft=True,
                                                      eps=1e-3, block_share=True, use_cayley_neumann=False,
                                                      num_cayley_neumann_terms=7, module_dropout=0.1))
    oft = spec.adapters[0]
    assert (oft.r, oft.block_size, oft.coft, oft.eps, oft.block_share, oft.cayley_neumann, oft.neumann_terms,
            oft.module_dropout) == (4, 0, True, 1e-3, True, False, 7, 0.1)
    boft = peftc.Spec.from_peft_config(peft.BOFTConfig(boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=2,
                                                       boft_dropout=0.1, target_modules=["q_proj"])).adapters[0]
    assert (boft.block_size, boft.block_num, boft.n_butterfly_factor, boft.dropout) == (0, 4, 2, 0.1)
    hra = peftc.Spec.from_peft_config(peft.HRAConfig(r=6, apply_GS=True, target_modules=["q"])).adapters[0]
    assert (hra.r, hra.gram_schmidt) == (6, True)
    shira = peftc.Spec.from_peft_config(peft.ShiraConfig(target_modules=["q"])).adapters[0]
    assert (shira.r, shira.seed, shira.mask_type) == (32, None, "random")  # peft's defaults


# -- errors ------------------------------------------------------------------------------------

BAD_FIELDS = [
    ("oft", "r", -1), ("oft", "block_size", 2.5), ("oft", "module_dropout", 1.0), ("oft", "coft", "yes"),
    ("oft", "eps", 0), ("oft", "block_share", 1), ("oft", "cayley_neumann", None), ("oft", "neumann_terms", 0),
    ("oft", "exclude", [""]), ("boft", "block_size", -4), ("boft", "block_num", "2"), ("boft", "n_butterfly_factor", 0),
    ("boft", "dropout", -0.1), ("hra", "r", 0), ("hra", "gram_schmidt", "no"), ("shira", "r", 0),
    ("shira", "mask_type", "magnitude"), ("shira", "seed", -1), ("shira", "targets", []),
]


@pytest.mark.parametrize("method, name, value", BAD_FIELDS)
def test_bad_field_values_name_the_field(method, name, value):
    entry = {"method": method, "targets": ["fc1"], name: value}
    if method == "oft" and name == "block_size":
        entry["r"] = 0
    with pytest.raises(SpecError, match=re.escape(f"adapters[0].{name}")):
        peftc.Spec.from_dict({"adapters": [entry]})


@pytest.mark.parametrize("entry, field", [
    ({"method": "oft", "r": 4}, "r"),  # and block_size 32 by default: both set
    ({"method": "oft", "r": 0, "block_size": 0}, "r"),
    ({"method": "boft", "block_size": 4, "block_num": 4}, "block_size"),
    ({"method": "boft", "block_size": 0, "block_num": 0}, "block_size"),
])
def test_either_count_or_size_as_peft(entry, field):
    with pytest.raises(SpecError, match=re.escape(f"adapters[0].{field}: ")):
        peftc.Spec.from_dict({"adapters": [{**entry, "targets": ["fc1"]}]})


@pytest.mark.parametrize("entry, message", [
    ({"method": "boft", "block_size": 5}, r"adapters\[0\]\.block_size: 5 does not divide"),
    ({"method": "boft", "block_size": 0, "block_num": 3}, r"adapters\[0\]\.block_num: 3 does not divide"),
    ({"method": "boft", "block_size": 8, "n_butterfly_factor": 3}, r"adapters\[0\]\.n_butterfly_factor"),
    ({"method": "boft", "block_size": 0, "block_num": 2, "n_butterfly_factor": 3},
     r"adapters\[0\]\.n_butterfly_factor"),
    ({"method": "shira", "r": 11}, r"adapters\[0\]\.r: 11·\(32 \+ 16\) = 528"),
    ({"method": "hra", "r": 17, "gram_schmidt": True}, r"adapters\[0\]\.r: Gram-Schmidt"),
])
def test_layouts_peft_refuses_are_spec_errors(entry, message):
    family = FAMILIES["mlp"]
    with pytest.raises(SpecError, match=message):
        compile_family(family, {"adapters": [{**entry, "targets": ["fc1"]}]})


def test_oft_moves_a_size_that_does_not_divide_as_peft_and_says_so():
    _, cm = compile_family(FAMILIES["mlp"], {"adapters": [{"method": "oft", "targets": ["fc1"], "block_size": 5}]})
    module = adapter_module(cm, "fc1", "oft")
    assert (module.blocks, module.block_size) == (4, 4)  # 16 inputs: 5 -> 4 (ties go down), as peft
    assert any("block_size 5 does not divide 16" in n for n in cm.records[0].notes)


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, ids):
        return self.proj(self.embed(ids))


@pytest.mark.parametrize("method", METHODS)
def test_sites_a_method_cannot_act_on_are_refused(method):
    with pytest.raises(SpecError, match=r"adapters\[0\]\.targets: .* acts on \['linear'"):
        peftc.compile(Embedder(), {"adapters": [{"method": method, "targets": ["embed"]}]},
                      example_inputs=(torch.tensor([[1, 2, 3]]),))


class Conv1DNet(nn.Module):
    """GPT-2's Conv1D ([in, out] weights, addmm), or its nn.Linear twin: the "in_out" layout path."""

    def __init__(self, linear: bool):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.layers = nn.ModuleList([Conv1D(24, 16), Conv1D(32, 24), Conv1D(16, 32), Conv1D(8, 16)])
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=0.2)
        if linear:
            twins = []
            for layer in self.layers:
                twin = nn.Linear(*layer.weight.shape)
                with torch.no_grad():
                    twin.weight.copy_(layer.weight.T)
                    twin.bias.copy_(layer.bias)
                twins.append(twin)
            self.layers = nn.ModuleList(twins)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def test_conv1d_layout_equals_its_linear_twin():
    """On GPT-2's [in, out] Conv1D weights every method computes what it computes on the nn.Linear twin."""
    spec = {"adapters": [{"method": "oft", "targets": ["layers.0"], "block_size": 4, "coft": True, "eps": 0.5},
                         {"method": "boft", "targets": ["layers.1"], "block_size": 4, "n_butterfly_factor": 2},
                         {"method": "hra", "targets": ["layers.2"], "r": 3},
                         {"method": "shira", "targets": ["layers.3"], "r": 2}]}
    x = torch.randn(2, 5, 16)
    conv1d, linear = (peftc.compile(Conv1DNet(twin), spec, example_inputs=(x,)).eval() for twin in (False, True))
    assert {s.layout for s in conv1d.sites} == {"in_out"} and {s.layout for s in linear.sites} != {"in_out"}
    randomize(conv1d)
    with torch.no_grad():
        for name, tensor in linear.adapter_state_dict().items():
            tensor.copy_(conv1d.adapter_state_dict()[name])
        ours = conv1d(x)
        assert (ours - Conv1DNet(False)(x)).abs().max() > 1e-2
        torch.testing.assert_close(ours, linear(x), **TOL)
        torch.testing.assert_close(conv1d.merged()(x), ours, **TOL)
