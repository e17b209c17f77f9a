"""AdaLoRA, FourierFT, VB-LoRA and P-tuning: parity with the real `peft` package, rank allocation,
PEFT checkpoints both ways, merge and ONNX export, and field errors.

Parity: one compile per family carries adalora, fourierft and vblora on sites of their own; the
reference is `peft` with each method injected on the same sites, holding peftc's randomized tensors.
"""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from families import FAMILIES, call, logits
from peft_reference import adapter_module, entry_sites, sharpened

import peftc
from peftc.runtime.rank_allocation import allocators

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)

HYBRID = {
    "llama": [
        {"method": "adalora", "targets": ["o_proj", "k_proj"], "init_r": 4, "target_r": 2, "total_step": 10,
         "alpha": 6},
        {"method": "fourierft", "targets": ["q_proj", "down_proj"], "n_frequency": 300, "scaling": 100.0,
         "random_loc_seed": 5},
        {"method": "vblora", "targets": ["v_proj", "up_proj"], "r": 2, "num_vectors": 8, "vector_length": 16,
         "topk": 3},
    ],
    "bert": [
        {"method": "adalora", "targets": ["query"], "init_r": 3, "target_r": 2, "total_step": 10},
        {"method": "fourierft", "targets": ["key", "*.intermediate.dense"], "n_frequency": 200},
        {"method": "vblora", "targets": ["value"], "r": 3, "num_vectors": 6, "vector_length": 8},
    ],
}
# peftc tensor -> peft attribute on the adapted layer
PEFT_NAMES = {
    "adalora": {"A": "lora_A", "E": "lora_E", "B": "lora_B"},
    "fourierft": {"spectrum": "fourierft_spectrum"},
    "vblora": {"logits_A": "vblora_logits_A", "logits_B": "vblora_logits_B"},
}


def peft_config(entry, pattern: str):
    if entry.method == "adalora":
        return peft.AdaLoraConfig(target_modules=pattern, init_r=entry.init_r, target_r=entry.target_r,
                                  lora_alpha=entry.alpha, total_step=entry.total_step)
    if entry.method == "fourierft":
        return peft.FourierFTConfig(target_modules=pattern, n_frequency=entry.n_frequency, scaling=entry.scaling,
                                    random_loc_seed=entry.random_loc_seed)
    return peft.VBLoRAConfig(target_modules=pattern, r=entry.r, num_vectors=entry.num_vectors,
                             vector_length=entry.vector_length, topk=entry.topk)


@torch.no_grad()
def randomize(cm, seed: int = 0, std: float = 0.2) -> None:
    """Every float adapter tensor non-zero (AdaLoRA's Λ starts at zero, VB-LoRA's bank near it)."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in cm.adapter_state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * std)


def peft_tensor(layer, entry, name: str, slot: str):
    if name == "vector_bank":
        return layer.vblora_vector_bank[slot]
    return getattr(layer, PEFT_NAMES[entry.method][name])[slot]


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
            for name, tensor in adapter_module(cm, path, slot).named_parameters():
                peft_tensor(layer, entry, name, slot).copy_(tensor)
        if entry.method == "vblora":
            peft_tensor(ref.get_submodule(paths[0]), entry, "vector_bank", slot).copy_(
                adapter_module(cm, "", slot).vector_bank)
    for name, p in ref.named_parameters():
        p.requires_grad_(any(slot in name.split(".") for slot in cm.spec.entry_names()) and "ranknum" not in name)
    return ref.eval()


@pytest.fixture(scope="module", params=sorted(HYBRID))
def hybrid(request):
    family = sharpened(FAMILIES[request.param])
    inputs = family.inputs(2, 7)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    model = family.build()
    cm = peftc.compile(model, {"adapters": HYBRID[request.param]}, example_kwargs=inputs)
    randomize(cm, std=0.4)
    return SimpleNamespace(family=family, model=model, cm=cm, ref=build_reference(family, cm), inputs=inputs)


def test_outputs_match_peft(hybrid):
    ours = logits(call(hybrid.cm, hybrid.family, hybrid.inputs))
    theirs = logits(call(hybrid.ref, hybrid.family, hybrid.inputs))
    base = logits(call(hybrid.model, hybrid.family, hybrid.inputs))
    assert (ours - base).abs().max() > 0.1 * base.abs().max()  # the adapters do something
    torch.testing.assert_close(ours, theirs, **TOL)


@torch.no_grad()
def test_each_method_moves_the_output(hybrid):
    """Each method's share is far above the tolerance, so the parity above covers all three."""
    full = logits(call(hybrid.ref, hybrid.family, hybrid.inputs))
    for index, entry in enumerate(hybrid.cm.spec.adapters):
        layers = [hybrid.ref.get_submodule(p) for p in entry_sites(hybrid.cm, index)]
        for layer in layers:
            layer._disable_adapters = True
        without = logits(call(hybrid.ref, hybrid.family, hybrid.inputs))
        for layer in layers:
            layer._disable_adapters = False
        assert (full - without).abs().max() > 1e-2 * full.abs().max(), entry.method


def test_trainable_counts_match_peft(hybrid):
    cm = hybrid.cm
    for index, (entry, slot) in enumerate(zip(cm.spec.adapters, cm.spec.entry_names())):
        ours = sum(n for r in cm.records if r.entry_index == index for n in r.params_added.values())
        theirs = sum(p.numel() for n, p in hybrid.ref.named_parameters() if slot in n.split(".") and p.requires_grad)
        assert ours == theirs, entry.method
    peft_total = sum(p.numel() for p in hybrid.ref.parameters() if p.requires_grad)
    assert cm.report().totals["trainable_params"] == peft_total


def test_gradients_match_peft(hybrid):
    cm, ref, family = hybrid.cm, hybrid.ref, hybrid.family
    for module in (cm, ref):
        module.zero_grad(set_to_none=True)
        logits(call(module, family, hybrid.inputs)).square().mean().backward()
    for index, (entry, slot) in enumerate(zip(cm.spec.adapters, cm.spec.entry_names())):
        for path in entry_sites(cm, index):
            layer = ref.get_submodule(path)
            for name, tensor in adapter_module(cm, path, slot).named_parameters():
                torch.testing.assert_close(tensor.grad, peft_tensor(layer, entry, name, slot).grad,
                                           atol=1e-5, rtol=1e-4, msg=f"{entry.method} {path} {name}")
        if entry.method == "vblora":  # the shared bank gathers every site's gradient
            bank = peft_tensor(ref.get_submodule(entry_sites(cm, index)[0]), entry, "vector_bank", slot)
            torch.testing.assert_close(adapter_module(cm, "", slot).vector_bank.grad, bank.grad, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_merged_weights_match_peft(hybrid):
    cm, ref = hybrid.cm, hybrid.ref
    merged = cm.merged()
    params = dict(merged.flat_graph_module.named_parameters())
    assert not any(n.startswith("peftc.") for n in params)  # every adapter folded
    for index, (entry, slot) in enumerate(zip(cm.spec.adapters, cm.spec.entry_names())):
        for path in entry_sites(cm, index):
            layer = ref.get_submodule(path)
            expected = layer.get_base_layer().weight + layer.get_delta_weight(slot)
            torch.testing.assert_close(params[f"{path}.weight"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(call(merged, hybrid.family, hybrid.inputs)),
                               logits(call(cm, hybrid.family, hybrid.inputs)), **TOL)


def test_fourierft_samples_peft_s_entries(hybrid):
    """Same seed, same sampled frequencies as peft: nothing is copied for them, and nothing is saved."""
    cm = hybrid.cm
    index = next(i for i, e in enumerate(cm.spec.adapters) if e.method == "fourierft")
    for path in entry_sites(cm, index):
        ours = adapter_module(cm, path, "fourierft").indices
        torch.testing.assert_close(ours, hybrid.ref.get_submodule(path).indices["fourierft"], atol=0, rtol=0)
    assert not any(k.endswith(".indices") for k in cm.adapter_state_dict())


def test_report_names_families_and_op_counts(hybrid):
    rows = {e["method"]: e["family"] for e in hybrid.cm.report().to_dict()["methods"]}
    assert rows == {"adalora": "reparameterized", "fourierft": "reparameterized", "vblora": "reparameterized"}
    inserted = [n for n in hybrid.cm.flat_graph_module.graph.nodes if (n.meta.get("peftc") or {}).get("method")]
    counts = {m: sum(n.meta["peftc"]["method"] == m and n.target == torch.ops.aten.fft_ifft2.default
                     for n in inserted) for m in ("fourierft",)}
    assert counts["fourierft"] == len(entry_sites(hybrid.cm, 1))  # one inverse DFT per site
    topks = sum(n.target == torch.ops.aten.topk.default for n in inserted)
    assert topks == 2 * len(entry_sites(hybrid.cm, 2))  # A and B each mix top-k bank vectors


# -- AdaLoRA: orthogonality term, rank allocation, PEFT's rank_pattern ----------------------------
ALLOC = dict(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=6, deltaT=1, alpha=8, beta1=0.8, beta2=0.7)
STEPS = 7


def _bert_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2])}


@pytest.fixture(scope="module")
def allocated(tmp_path_factory):
    """peftc and peft AdaLoRA on BERT trained side by side for STEPS steps with update_and_allocate."""
    spec = {"adapters": [{"method": "adalora", "targets": ["query", "value"], **ALLOC}]}
    cm = peftc.compile(FAMILIES["bert"].build(), spec, example_kwargs=_bert_batch(0)).eval()
    randomize(cm)
    config = peft.AdaLoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], lora_alpha=ALLOC["alpha"],
                                **{k: v for k, v in ALLOC.items() if k != "alpha"})
    # SEQ_CLS: only a task model runs AdaLoraModel.forward, which adds the term; the classifier copy PEFT
    # makes for that task stays frozen here, as in peftc's spec
    ref = get_peft_model(FAMILIES["bert"].build(), config).eval()
    for name, p in ref.named_parameters():
        p.requires_grad_(".lora_" in name)
    with torch.no_grad():
        for name, tensor in cm.adapter_state_dict().items():
            path, _, leaf = name.rpartition(".adalora.")
            if leaf in PEFT_NAMES["adalora"]:
                getattr(ref.base_model.model.get_submodule(path), PEFT_NAMES["adalora"][leaf])["default"].copy_(tensor)
    first = (cm(**_bert_batch(0)).loss.item(), ref(**_bert_batch(0)).loss.item())
    patterns = []
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (cm, ref)]
    for step in range(STEPS):
        for module, opt in zip((cm, ref), opts):
            module(**_bert_batch(step)).loss.backward()
            opt.step()
        cm.update_and_allocate(step)
        ref.base_model.update_and_allocate(step)
        for opt in opts:
            opt.zero_grad()
        (allocator,) = allocators(cm)
        patterns.append((copy.deepcopy(allocator.rank_pattern), copy.deepcopy(ref.peft_config["default"].rank_pattern)))
    tmp = tmp_path_factory.mktemp("adalora")
    ref.save_pretrained(tmp / "peft")
    cm.save_adapter(tmp / "ours", format="peft")
    return SimpleNamespace(cm=cm, ref=ref, first=first, patterns=patterns, tmp=tmp)


def test_orthogonality_term_matches_peft_loss(allocated):
    ours, theirs = allocated.first
    assert abs(ours - theirs) < 1e-5
    cm = allocated.cm
    plain = peftc.compile(FAMILIES["bert"].build(), {"adapters": [
        {"method": "adalora", "targets": ["query", "value"], **ALLOC, "orth_reg_weight": 0}]},
        example_kwargs=_bert_batch(0))
    assert any("orthogonality" in note for r in cm.records for note in r.notes)
    assert not any("orthogonality" in note for r in plain.records for note in r.notes)


def test_rank_allocation_prunes_as_peft(allocated):
    seen_mask = False
    for step, (ours, theirs) in enumerate(allocated.patterns):
        theirs = {k.replace(".lora_E.default", ""): v for k, v in (theirs or {}).items()}
        assert (ours or {}) == theirs, f"step {step}"
        seen_mask |= bool(ours) and not all(all(v) for v in ours.values())
    assert seen_mask  # the schedule did prune
    final = allocated.patterns[-1][0]
    assert sum(map(sum, final.values())) == ALLOC["target_r"] * len(final)  # the target budget
    ours = dict(allocated.cm.adapter_state_dict())
    for name, module in allocated.ref.base_model.model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            torch.testing.assert_close(ours[f"{name}.adalora.E"], module.lora_E["default"], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ours[f"{name}.adalora.A"], module.lora_A["default"], atol=1e-5, rtol=1e-4)


def test_pruned_ranks_shrink_merge_and_peft_checkpoint(allocated):
    cm, tmp = allocated.cm, allocated.tmp
    x = _bert_batch(9)
    expected = allocated.ref(**x).logits
    torch.testing.assert_close(cm(**x).logits, expected, **TOL)
    torch.testing.assert_close(cm.merged()(**x).logits, expected, **TOL)
    module = adapter_module(cm, entry_sites(cm, 0)[0], "adalora")
    kept = int(module.rank_mask.sum())
    assert kept < ALLOC["init_r"]
    torch.testing.assert_close(module.delta_weight(),  # only kept ranks enter the fold
                               module.B[:, module.rank_mask] @ (module.A[module.rank_mask] * module.E[module.rank_mask])
                               * module.scale)
    ours_cfg = json.loads((tmp / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp / "peft" / "adapter_config.json").read_text())
    assert ours_cfg["rank_pattern"] == theirs_cfg["rank_pattern"]
    from safetensors.torch import load_file
    ours_t, theirs_t = load_file(tmp / "ours" / "adapter_model.safetensors"), load_file(
        tmp / "peft" / "adapter_model.safetensors")
    theirs_t = {k: v for k, v in theirs_t.items() if ".lora_" in k}  # PEFT's SEQ_CLS also saves the classifier
    assert sorted(ours_t) == sorted(theirs_t)
    for key in theirs_t:
        assert ours_t[key].shape == theirs_t[key].shape, key
    reloaded = PeftModel.from_pretrained(FAMILIES["bert"].build(), tmp / "ours").eval()
    torch.testing.assert_close(reloaded(**x).logits, expected, **TOL)
    loaded = peftc.from_peft(FAMILIES["bert"].build(), tmp / "peft", example_kwargs=x).eval()
    torch.testing.assert_close(loaded(**x).logits, expected, **TOL)
    assert adapter_module(loaded, entry_sites(loaded, 0)[0], "adalora").A.shape[0] == kept
    loaded.save_adapter(tmp / "again", format="peft")  # a loaded, pruned adapter saves the same pattern
    assert json.loads((tmp / "again" / "adapter_config.json").read_text())["rank_pattern"] == theirs_cfg["rank_pattern"]


def test_update_and_allocate_needs_adalora_and_gradients():
    cm = peftc.compile(FAMILIES["mlp"].build(), {"adapters": [
        {"method": "adalora", "targets": ["fc1"], "total_step": 4, "init_r": 2, "target_r": 1}]},
        example_inputs=(torch.randn(3, 16),))
    with pytest.raises(RuntimeError, match="no gradient; call it after loss.backward"):
        cm.update_and_allocate(0)
    lora = peftc.compile(FAMILIES["mlp"].build(), {"adapters": [{"method": "lora", "targets": ["fc1"]}]},
                         example_inputs=(torch.randn(3, 16),))
    with pytest.raises(ValueError, match="no 'adalora' entry"):
        lora.update_and_allocate(0)


def test_trainer_callback_allocates(tmp_path):
    """Under a plain transformers Trainer, AdaloraCallback runs the schedule: ranks end at the target budget."""
    from transformers import Trainer, TrainingArguments

    from peftc.runtime.adalora_callback import AdaloraCallback

    spec = {"adapters": [{"method": "adalora", "targets": ["query", "value"], **ALLOC}]}
    cm = peftc.compile(FAMILIES["bert"].build(), spec, example_kwargs=_bert_batch(0))
    randomize(cm)
    data = [{k: v[0] for k, v in _bert_batch(i).items()} for i in range(2 * ALLOC["total_step"])]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=ALLOC["total_step"],
                             learning_rate=1e-2, report_to=[], save_strategy="no",
                             use_cpu=True, logging_strategy="no", dataloader_num_workers=0)
    Trainer(model=cm, args=args, train_dataset=data, callbacks=[AdaloraCallback(cm)]).train()
    (allocator,) = allocators(cm)
    kept = sum(map(sum, allocator.rank_pattern.values()))
    assert kept == ALLOC["target_r"] * 4  # query and value in 2 layers
    for path, module in allocator.sites:
        assert torch.all(module.E[~module.rank_mask] == 0)


# -- P-tuning -------------------------------------------------------------------------------------
PTUNING = {"MLP": {"encoder_hidden_size": 24},
           "LSTM": {"encoder_hidden_size": 12, "encoder_reparameterization_type": "LSTM", "encoder_num_layers": 2}}
N = 3


def _copy_encoder(cm, ref) -> None:
    ours = {n.rpartition(".p_tuning.")[2]: t for n, t in cm.adapter_state_dict().items()}
    encoder = ref.prompt_encoder.default
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            p.copy_(ours[name.replace(".weight", "") if name == "embedding.weight" else name.replace(".", "_")])


@pytest.mark.parametrize("family_name,kind", [("llama", "MLP"), ("llama", "LSTM"), ("bert", "MLP")])
def test_p_tuning_matches_peft(family_name, kind, tmp_path):
    from peft import PromptEncoderConfig, TaskType

    family = FAMILIES[family_name]
    x = family.inputs(2, 5)
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    task, x["labels"] = ((TaskType.SEQ_CLS, torch.tensor([0, 2])) if family_name == "bert"
                         else (TaskType.CAUSAL_LM, x["input_ids"].clone()))
    entry = {"method": "p_tuning", "num_virtual_tokens": N, **PTUNING[kind]}
    model, cm = family.build(), None
    cm = peftc.compile(model, {"adapters": [entry]}, example_kwargs=x).eval()
    randomize(cm, std=0.3)
    config = PromptEncoderConfig(task_type=task, num_virtual_tokens=N,
                                 **{k: v for k, v in entry.items() if k not in ("method", "num_virtual_tokens")})
    ref = get_peft_model(family.build(), config).eval()
    _copy_encoder(cm, ref)
    got, expected = cm(**x), ref(**x)
    torch.testing.assert_close(got.logits, expected.logits, **TOL)
    torch.testing.assert_close(got.loss, expected.loss, **TOL)
    assert cm.report().totals["trainable_params"] == sum(p.numel() for p in ref.prompt_encoder.parameters()
                                                         if p.requires_grad)
    for module in (cm, ref):
        module.zero_grad(set_to_none=True)
        module(**x).loss.backward()
    ours = {n.rpartition(".p_tuning.")[2]: p for n, p in getattr(cm.flat_graph_module, "peftc").named_parameters()}
    for name, p in ref.prompt_encoder.default.named_parameters():
        key = "embedding" if name == "embedding.weight" else name.replace(".", "_")
        torch.testing.assert_close(ours[key].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    if family_name == "llama":  # PEFT checkpoints both ways: they hold the encoder's output
        cm.save_adapter(tmp_path / "ours", format="peft")
        with torch.no_grad():
            reloaded = PeftModel.from_pretrained(family.build(), tmp_path / "ours").eval()(**x)
            torch.testing.assert_close(reloaded.logits, expected.logits, **TOL)
            ref.save_pretrained(tmp_path / "peft")
            loaded = peftc.from_peft(family.build(), tmp_path / "peft", example_kwargs=x).eval()
            torch.testing.assert_close(loaded(**x).logits, expected.logits, **TOL)
        assert [e.method for e in loaded.spec.adapters] == ["prompt"]  # the encoder is not in the file


# -- PEFT checkpoints and configs, both ways ------------------------------------------------------
def _peft_configs():
    return {
        "fourierft": peft.FourierFTConfig(target_modules=["q_proj", "v_proj"], n_frequency=64, scaling=80.0,
                                          random_loc_seed=11),
        "vblora": peft.VBLoRAConfig(target_modules=["q_proj", "v_proj"], r=2, num_vectors=8, vector_length=16),
        "vblora_topk": peft.VBLoRAConfig(target_modules=["q_proj"], r=2, num_vectors=8, vector_length=16,
                                         save_only_topk_weights=True),
    }


@torch.no_grad()
def _randomize_peft(model, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", ["fourierft", "vblora", "vblora_topk"])
def test_peft_checkpoints_both_ways(kind, tmp_path):
    family = FAMILIES["llama"]
    x = family.inputs(2, 6)
    model = get_peft_model(family.build(), _peft_configs()[kind])
    _randomize_peft(model)
    model.eval().save_pretrained(tmp_path / "peft")
    expected = PeftModel.from_pretrained(family.build(), tmp_path / "peft").eval()(**x).logits
    assert not torch.allclose(expected, family.build()(**x).logits, **TOL)
    cm = peftc.from_peft(family.build(), tmp_path / "peft", example_kwargs=x).eval()
    torch.testing.assert_close(cm(**x).logits, expected, **TOL)
    cm.save_adapter(tmp_path / "ours", format="peft")
    reloaded = PeftModel.from_pretrained(family.build(), tmp_path / "ours").eval()
    torch.testing.assert_close(reloaded(**x).logits, expected, **TOL)
    from safetensors.torch import load_file
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))


@pytest.mark.parametrize("config", [
    lambda: peft.AdaLoraConfig(target_modules=["q", "v"], init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=2,
                               total_step=50, beta1=0.8, beta2=0.9, orth_reg_weight=0.2, lora_alpha=16,
                               lora_dropout=0.1),
    lambda: peft.FourierFTConfig(target_modules=["q"], n_frequency=10, scaling=3.5, random_loc_seed=2,
                                 init_weights=True),
    lambda: peft.VBLoRAConfig(target_modules=["q"], r=3, num_vectors=16, vector_length=4, topk=3,
                              vblora_dropout=0.1, save_only_topk_weights=True, init_logits_std=0.3),
    lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=12,
                                     encoder_reparameterization_type="LSTM", encoder_num_layers=3,
                                     encoder_dropout=0.1),
], ids=["adalora", "fourierft", "vblora", "p_tuning"])
def test_spec_from_and_to_peft_config(config):
    cfg = config()
    spec = peftc.Spec.from_peft_config(cfg)
    back = spec.to_peft_config()
    original = {k: getattr(v, "value", v) for k, v in cfg.to_dict().items()}
    for key, value in back.items():
        if key in original and key not in ("target_modules", "exclude_modules", "peft_type", "modules_to_save",
                                           "num_transformer_submodules"):  # PEFT fills it in per model
            assert value == original[key] or (not value and not original[key]), key
    assert back["peft_type"] == original["peft_type"]
    assert peftc.Spec.from_peft_config(back) == spec
    rebuilt = type(cfg)(**{k: v for k, v in back.items() if k != "peft_type"})  # PEFT accepts what peftc writes
    assert peftc.Spec.from_peft_config(rebuilt) == spec


# -- ONNX export of the merged models -------------------------------------------------------------
def test_merge_folds_all_but_p_tuning_and_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    family = FAMILIES["bert"]
    cm = peftc.compile(family.build(), {"adapters": HYBRID["bert"] + [
        {"method": "p_tuning", "num_virtual_tokens": 2, "encoder_hidden_size": 8,
         "encoder_reparameterization_type": "LSTM"}]}).eval()  # the LSTM exports as ONNX's LSTM
    randomize(cm)
    rows = {row["method"]: row for row in cm.report().to_dict()["methods"]}
    assert rows["p_tuning"]["family"] == "additive" and "kept as graph ops" in rows["p_tuning"]["merge"]
    assert all(rows[m]["merge"] == "folded into weights" for m in ("adalora", "fourierft", "vblora"))
    read = [str(n.target) for n in cm.merged().flat_graph_module.graph.nodes if n.op == "get_attr"]
    kept = {t.rsplit(".", 2)[-2] for t in read if t.startswith("peftc.")}
    assert kept == {"p_tuning"}  # the merged graph reads the prompt encoder only
    path = peftc.export_onnx(cm, tmp_path / "model.onnx")
    x = family.inputs(3, 5)
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    got = sess.run(None, {k: v.numpy() for k, v in x.items() if k in names})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), cm(**x).logits, atol=1e-4, rtol=0)


# -- field errors ---------------------------------------------------------------------------------
BAD_FIELDS = [
    ({"method": "adalora", "targets": ["fc1"]}, r"adapters\[0\]\.total_step: required"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 0}, r"adapters\[0\]\.total_step: expected a positive"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "init_r": 0}, r"adapters\[0\]\.init_r"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "target_r": -1}, r"adapters\[0\]\.target_r"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "alpha": 0}, r"adapters\[0\]\.alpha"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "dropout": 2}, r"adapters\[0\]\.dropout"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "tinit": -1}, r"adapters\[0\]\.tinit"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "tinit": 3, "tfinal": 2},
     r"adapters\[0\]\.tinit: 3 leaves no budgeting phase"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "tfinal": "x"}, r"adapters\[0\]\.tfinal"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "deltaT": 0}, r"adapters\[0\]\.deltaT"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "beta1": 1.0}, r"adapters\[0\]\.beta1"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "beta2": 0}, r"adapters\[0\]\.beta2"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "orth_reg_weight": -0.1},
     r"adapters\[0\]\.orth_reg_weight: expected a finite number >= 0"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "rank_pattern": {"fc1": [True]}},
     r"adapters\[0\]\.rank_pattern\['fc1'\]: 1 entries, expected init_r=12"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "rank_pattern": {"fc1": [1, 0]}},
     r"adapters\[0\]\.rank_pattern\['fc1'\]: expected a non-empty list of booleans"),
    ({"method": "fourierft", "targets": ["fc1"], "n_frequency": 0}, r"adapters\[0\]\.n_frequency"),
    ({"method": "fourierft", "targets": ["fc1"], "scaling": "big"}, r"adapters\[0\]\.scaling"),
    ({"method": "fourierft", "targets": ["fc1"], "random_loc_seed": -3}, r"adapters\[0\]\.random_loc_seed"),
    ({"method": "fourierft", "targets": ["fc1"], "init": "ones"}, r"adapters\[0\]\.init"),
    ({"method": "vblora", "targets": ["fc1"], "r": 0}, r"adapters\[0\]\.r: expected a positive"),
    ({"method": "vblora", "targets": ["fc1"], "num_vectors": 0}, r"adapters\[0\]\.num_vectors"),
    ({"method": "vblora", "targets": ["fc1"], "vector_length": 1.5}, r"adapters\[0\]\.vector_length"),
    ({"method": "vblora", "targets": ["fc1"], "topk": 0}, r"adapters\[0\]\.topk"),
    ({"method": "vblora", "targets": ["fc1"], "dropout": -1}, r"adapters\[0\]\.dropout"),
    ({"method": "vblora", "targets": ["fc1"], "init_vector_bank_bound": 0}, r"adapters\[0\]\.init_vector_bank_bound"),
    ({"method": "vblora", "targets": ["fc1"], "init_logits_std": -1}, r"adapters\[0\]\.init_logits_std"),
    ({"method": "vblora", "targets": ["fc1"], "save_only_topk_weights": "yes"}, r"adapters\[0\]\.save_only_topk"),
    ({"method": "p_tuning"}, r"adapters\[0\]\.encoder_hidden_size: required"),
    ({"method": "p_tuning", "encoder_hidden_size": 0}, r"adapters\[0\]\.encoder_hidden_size"),
    ({"method": "p_tuning", "encoder_hidden_size": 4, "num_virtual_tokens": 0}, r"adapters\[0\]\.num_virtual_tokens"),
    ({"method": "p_tuning", "encoder_hidden_size": 4, "encoder_reparameterization_type": "GRU"},
     r"adapters\[0\]\.encoder_reparameterization_type"),
    ({"method": "p_tuning", "encoder_hidden_size": 4, "encoder_num_layers": 0}, r"adapters\[0\]\.encoder_num_layers"),
    ({"method": "p_tuning", "encoder_hidden_size": 4, "encoder_dropout": 1.5}, r"adapters\[0\]\.encoder_dropout"),
]


@pytest.mark.parametrize("entry,message", BAD_FIELDS)
def test_bad_fields_name_the_field(entry, message):
    with pytest.raises(peftc.SpecError, match=message):
        peftc.Spec.from_dict({"adapters": [entry]})


@pytest.mark.parametrize("entry,message", [
    ({"method": "fourierft", "targets": ["fc2"], "n_frequency": 200}, r"adapters\[0\]\.n_frequency: 200 exceeds"),
    ({"method": "vblora", "targets": ["fc1"], "vector_length": 5}, r"adapters\[0\]\.vector_length: 5 must divide"),
    ({"method": "vblora", "targets": ["fc1"], "vector_length": 4, "num_vectors": 2, "topk": 3},
     r"adapters\[0\]\.topk: 3 exceeds num_vectors=2"),
    ({"method": "adalora", "targets": ["fc1"], "total_step": 5, "init_r": 2, "rank_pattern": {"fc2": [True, False]}},
     r"adapters\[0\]\.rank_pattern: 'fc2' is not a site of this entry"),
    ({"method": "p_tuning", "encoder_hidden_size": 4}, r"adapters\[0\]\.method: 'p_tuning' prepends virtual tokens"),
])
def test_sizes_the_model_cannot_take_name_the_field(entry, message):
    with pytest.raises(peftc.SpecError, match=message):
        peftc.compile(FAMILIES["mlp"].build(), {"adapters": [entry]}, example_inputs=(torch.randn(3, 16),))


def test_native_checkpoint_keeps_the_allocation(allocated, tmp_path):
    """peftc's own format saves the rank masks with the tensors; a spec with rank_pattern round-trips."""
    cm, x = allocated.cm, _bert_batch(9)
    cm.save_adapter(tmp_path / "native")
    fresh = peftc.compile(FAMILIES["bert"].build(), cm.spec, example_kwargs=x).load_adapter(tmp_path / "native").eval()
    torch.testing.assert_close(fresh(**x).logits, cm(**x).logits, **TOL)
    path = entry_sites(cm, 0)[0]
    assert torch.equal(adapter_module(fresh, path, "adalora").rank_mask, adapter_module(cm, path, "adalora").rank_mask)
    spec = peftc.Spec.from_dict({"adapters": [{"method": "adalora", "targets": ["query"], "total_step": 5,
                                               "init_r": 2, "rank_pattern": {path: [True, False]}}]})
    spec.save(tmp_path / "spec.json")
    assert peftc.Spec.load(tmp_path / "spec.json") == spec
