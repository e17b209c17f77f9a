"""Adapters over a bfloat16 base are float32 by default (HF PEFT's autocast_adapter_dtype=True).

AdamW's updates on bfloat16 adapters round away, so training a bfloat16 model drifts from PEFT's
within a few steps unless the adapters are kept, and computed, in float32; `adapter_dtype: "base"`
is the opt-out (PEFT's autocast_adapter_dtype=False).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftc
from families import FAMILIES, randomize_adapters
from peft_reference import copy_lora_weights

BF16 = torch.bfloat16
R, ALPHA = 4, 8
TARGETS = ["q_proj", "v_proj", "down_proj"]


def bf16_llama():
    return FAMILIES["llama"].build().to(BF16)


def lora(adapter_dtype=None, targets=TARGETS):
    spec = {"adapters": [{"method": "lora", "targets": list(targets), "r": R, "alpha": ALPHA}]}
    return spec if adapter_dtype is None else {**spec, "adapter_dtype": adapter_dtype}


def adapter_dtypes(module) -> set:
    return {p.dtype for p in module.parameters() if p.requires_grad}


def train_losses(model, ids, steps=3, lr=1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained_pair():
    """A bfloat16 LLaMA, its compiled LoRA (non-zero float32 adapters) and PEFT's with the same adapters. Tests
    that read the compiled model leave its adapters as they are: the training test below needs them equal to
    PEFT's when it starts."""
    model = bf16_llama()
    cm = peftc.compile(copy.deepcopy(model), lora())
    randomize_adapters(cm)
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    copy_lora_weights(cm, reference)
    ids = FAMILIES["llama"].inputs(2, 8)["input_ids"]
    return model, cm, reference, ids


def test_bf16_training_matches_peft_with_float32_adapters(trained_pair):
    _, cm, reference, ids = trained_pair
    assert adapter_dtypes(cm) == {torch.float32} == adapter_dtypes(reference)
    ours, theirs = train_losses(cm, ids), train_losses(reference, ids)
    assert ours[0] == theirs[0]  # same adapters in, same float32 branch: the same first loss
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4, (ours, theirs)
    assert adapter_dtypes(cm) == {torch.float32}  # the optimizer kept them float32
    assert cm(input_ids=ids).logits.dtype == BF16  # the model's outputs stay in the base dtype


def test_opt_out_keeps_adapters_in_the_base_dtype():
    model = bf16_llama()
    cm = peftc.compile(copy.deepcopy(model), lora("base"))
    assert adapter_dtypes(cm) == {BF16}
    assert "cast_adapter_dtype" not in [n for r in cm.records if r.modified for n in [r.name]]
    randomize_adapters(cm)
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS),
                               autocast_adapter_dtype=False)
    copy_lora_weights(cm, reference)
    assert adapter_dtypes(reference) == {BF16}
    ids = FAMILIES["llama"].inputs(2, 8)["input_ids"]
    torch.testing.assert_close(cm(input_ids=ids).logits, reference(input_ids=ids).logits, atol=2e-2, rtol=2e-2)


@functools.cache
def _float32_lora():
    """LoRA over the float32 LLaMA, compiled once for the two tests below (each takes a deepcopy: no export)."""
    return peftc.compile(FAMILIES["llama"].build(), lora())


def test_float32_models_keep_float32_adapters_and_no_casts():
    cm = copy.deepcopy(_float32_lora())
    assert adapter_dtypes(cm) == {torch.float32}
    assert "cast_adapter_dtype" not in [r.name for r in cm.records]
    assert not [n for n in cm.flat_graph_module.graph.nodes if n.target == torch.ops.aten._to_copy.default
                and (n.meta.get("peftc") or {}).get("role") in ("cast_up", "cast_back")]


def test_spec_field_is_validated_and_round_trips():
    spec = peftc.Spec.from_dict(lora("base"))
    assert spec.adapter_dtype == "base" and peftc.Spec.from_dict(spec.to_dict()) == spec
    assert peftc.Spec.from_dict(lora()).adapter_dtype == "float32"
    with pytest.raises(peftc.SpecError, match=r"spec\.adapter_dtype: expected one of \['float32', 'base'\]"):
        peftc.Spec.from_dict(lora("bfloat16"))


def test_peft_autocast_adapter_dtype_maps_both_ways():
    from peftc.interop.peft_config import autocast_from_adapter_dtype

    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)
    assert peftc.Spec.from_peft_config(config).adapter_dtype == "float32"
    assert peftc.Spec.from_peft_config({**config.to_dict(), "autocast_adapter_dtype": False}).adapter_dtype == "base"
    assert autocast_from_adapter_dtype(peftc.Spec.from_dict(lora())) is True
    assert autocast_from_adapter_dtype(peftc.Spec.from_dict(lora("base"))) is False


# -- every method over a bfloat16 base -----------------------------------------------------------------
HYBRIDS = [
    [{"method": "dora", "targets": ["q_proj"], "r": 4, "alpha": 8},
     {"method": "loha", "targets": ["k_proj"], "r": 4, "alpha": 6},
     {"method": "ia3", "targets": ["v_proj", "down_proj"], "feedforward": ["down_proj"]},
     {"method": "vera", "targets": ["o_proj", "gate_proj"], "r": 16, "seed": 3},
     {"method": "lokr", "targets": ["up_proj"], "r": 4, "alpha": 8},
     {"method": "mask", "targets": ["embed_tokens"], "density": 0.05, "select": "random", "seed": 1}],
    [{"method": "oft", "targets": ["q_proj"], "block_size": 16},
     {"method": "boft", "targets": ["v_proj", "o_proj"], "block_size": 8, "n_butterfly_factor": 2},
     {"method": "hra", "targets": ["gate_proj"], "r": 4},
     {"method": "shira", "targets": ["down_proj"], "r": 2},
     {"method": "fourierft", "targets": ["k_proj"], "n_frequency": 300, "scaling": 100.0},
     {"method": "vblora", "targets": ["up_proj"], "r": 2, "num_vectors": 8, "vector_length": 16, "topk": 3}],
    [{"method": "adalora", "targets": ["o_proj", "k_proj"], "init_r": 4, "target_r": 2, "total_step": 10},
     {"method": "lora", "targets": ["q_proj"], "r": 4, "alpha": 8},
     {"method": "adapter", "targets": ["q_proj", "down_proj"], "bottleneck": 8}],
]


@pytest.mark.parametrize("entries", HYBRIDS, ids=lambda e: "+".join(x["method"] for x in e))
def test_every_method_trains_in_float32_over_bf16_and_matches_a_float32_model(entries):
    """Each method's tensors are float32 over a bfloat16 base; its logits differ from the same adapters over
    the float32 model no more than the bare bfloat16 model differs from the float32 one (bfloat16's own
    rounding), while the adapters move them much more; gradients reach every adapter tensor in float32;
    merged() keeps the base weights bfloat16 and agrees."""
    model = FAMILIES["llama"].build()
    ids = FAMILIES["llama"].inputs(2, 8)["input_ids"]
    with torch.no_grad():
        bare = model(input_ids=ids).logits
        noise = (copy.deepcopy(model).to(BF16)(input_ids=ids).logits.float() - bare).abs().max()
    spec = {"adapters": entries}
    full = peftc.compile(copy.deepcopy(model), spec)
    randomize_adapters(full, std=0.05)
    half = peftc.compile(copy.deepcopy(model).to(BF16), spec)
    assert adapter_dtypes(half) == {torch.float32}
    with torch.no_grad():
        for name, tensor in half.adapter_state_dict().items():
            tensor.copy_(full.adapter_state_dict()[name])
    half.eval(), full.eval()
    logits, expected = half(input_ids=ids).logits, full(input_ids=ids).logits
    assert logits.dtype == BF16
    error = (logits.float() - expected).abs().max()
    assert error <= 2 * noise, (error, noise)
    assert (expected - bare).abs().max() > 4 * error  # the adapters change the logits: the check has teeth
    half(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in half.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values()), grads
    merged = half.merged()
    assert {p.dtype for n, p in merged.named_parameters() if not n.startswith("peftc.")} == {BF16}
    assert (merged(input_ids=ids).logits.float() - logits.float()).abs().max() <= 2 * noise


def test_merged_folds_in_float32_and_rounds_once(trained_pair):
    model, cm, _, _ = trained_pair  # float32 adapters over the bfloat16 base (non-zero; maybe trained: any values do)
    merged = cm.merged()
    state = cm.adapter_state_dict()
    name = "model.layers.0.self_attn.q_proj"
    a, b = state[f"{name}.lora.A"], state[f"{name}.lora.B"]
    weight = dict(model.named_parameters())[f"{name}.weight"]
    expected = (weight.float() + (b @ a) * (ALPHA / R)).to(BF16)
    assert torch.equal(dict(merged.named_parameters())[f"{name}.weight"], expected)
    ids = FAMILIES["llama"].inputs(2, 8)["input_ids"]
    torch.testing.assert_close(merged(input_ids=ids).logits, cm(input_ids=ids).logits, atol=3e-2, rtol=3e-2)


def test_saves_float32_adapters_that_peft_and_peftc_load(trained_pair, tmp_path):
    model, cm, _, _ = trained_pair  # float32 adapters over the bfloat16 base (non-zero; maybe trained: any values do)
    cm.save_adapter(tmp_path / "peft", format="peft")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # as PEFT's save_pretrained writes them
    reference = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft")
    assert {p.dtype for n, p in reference.named_parameters() if "lora_" in n} == {torch.float32}
    ids = FAMILIES["llama"].inputs(2, 8)["input_ids"]
    torch.testing.assert_close(reference(input_ids=ids).logits, cm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    loaded = peftc.from_peft(copy.deepcopy(model), tmp_path / "peft")
    assert adapter_dtypes(loaded) == {torch.float32}
    torch.testing.assert_close(loaded(input_ids=ids).logits, cm(input_ids=ids).logits, atol=0, rtol=0)
    fresh = peftc.from_peft(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS),
                            autocast_adapter_dtype=False)  # a config alone: fresh adapters
    assert adapter_dtypes(fresh) == {BF16} and fresh.spec.adapter_dtype == "base"


def test_to_bfloat16_after_compile_casts_adapters_as_peft_does():
    """model.to(bfloat16) on a PeftModel casts its adapters too; the compiled model does the same."""
    cm = copy.deepcopy(_float32_lora())
    randomize_adapters(cm)
    ids = FAMILIES["llama"].inputs(2, 8)["input_ids"]
    full = cm(input_ids=ids).logits
    cm.to(BF16)
    assert adapter_dtypes(cm) == {BF16}
    torch.testing.assert_close(cm(input_ids=ids).logits.float(), full, atol=6e-2, rtol=5e-2)


def test_quantized_bf16_base_trains_float32_adapters():
    """A packed base computes in its compute dtype and returns the input's; the float32 LoRA beside it
    reads that output cast up and hands back bfloat16, as over a float base."""
    model = bf16_llama()
    spec = {**lora(targets=["q_proj", "v_proj"]), "quantize": {"format": "nf4"}}
    cm = peftc.compile(copy.deepcopy(model), spec)
    randomize_adapters(cm)
    assert adapter_dtypes(cm) == {torch.float32}
    ids = FAMILIES["llama"].inputs(2, 8)["input_ids"]
    out = cm(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in cm.parameters() if p.requires_grad)
    opted_out = peftc.compile(copy.deepcopy(model), {**spec, "adapter_dtype": "base"})
    with torch.no_grad():
        for name, tensor in opted_out.adapter_state_dict().items():
            tensor.copy_(cm.adapter_state_dict()[name])
    assert abs(opted_out(input_ids=ids, labels=ids).loss.item() - out.loss.item()) < 2e-2


# -- virtual-token methods over a bfloat16 base ----------------------------------------------------------
# p-tuning runs prompt tuning's code (prepend_virtual_tokens: the weights' dtype, the cast where the prompt
# joins the embeddings) plus its float32 encoder, so it stands for both (each case is a capture)
VIRTUAL = [{"method": "p_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16},
           {"method": "prefix", "num_tokens": 3}]


@pytest.mark.parametrize("entry", VIRTUAL, ids=lambda e: e["method"])
def test_virtual_tokens_train_in_float32_as_peft_does(entry):
    """PEFT builds its prompt encoders in float32 whatever the base dtype and casts the prompt (or the prefix
    keys and values) to the base's dtype where it joins the model: peftc keeps these weights float32 too,
    and the training losses follow PEFT's (bfloat16 weights drifted by ~1e-3 within three AdamW steps)."""
    from test_virtual_generate import peft_model

    family = dataclasses.replace(FAMILIES["llama"], build=bf16_llama)
    cm = peftc.compile(bf16_llama(), {"adapters": [entry]})
    randomize_adapters(cm, std=0.5)
    reference = peft_model(family, cm, entry).train()
    assert adapter_dtypes(cm) == {torch.float32} == adapter_dtypes(reference)
    ids = FAMILIES["llama"].inputs(2, 6)["input_ids"]
    ours, theirs = train_losses(cm, ids, lr=1e-2), train_losses(reference, ids, lr=1e-2)
    # The first loss is the same computation in both; after an AdamW step, bfloat16 kernels may order
    # their sums differently by CPU (1.3e-4 apart on one machine), well inside the ~1e-3 drift of bf16 weights.
    assert ours[0] == theirs[0], (ours, theirs)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 3e-4, (ours, theirs)
    assert adapter_dtypes(cm) == {torch.float32}
    assert cm(input_ids=ids).logits.dtype == BF16


def test_virtual_tokens_stay_float32_where_peft_is_told_not_to_autocast(tmp_path):
    """PEFT's autocast_adapter_dtype=False casts tuner layers only: prompt-learning weights stay float32
    (passes/_per_site.in_virtual_token_dtype). A PEFT p-tuning folder loaded both ways has float32 weights and the
    same bfloat16 logits; in a peftc spec with adapter_dtype "base", p-tuning and prefix weights are float32 and
    LoRA's bfloat16."""
    from peft import PromptEncoderConfig, TaskType
    from peft_reference import save_random_peft_folders

    config = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3, encoder_hidden_size=16)
    save_random_peft_folders(bf16_llama, {"p_tuning": config}, tmp_path, seed=2)
    reference = PeftModel.from_pretrained(bf16_llama(), tmp_path / "p_tuning", autocast_adapter_dtype=False).eval()
    cm = peftc.from_peft(bf16_llama(), tmp_path / "p_tuning", autocast_adapter_dtype=False).eval()
    assert cm.spec.adapter_dtype == "base"
    assert adapter_dtypes(cm) == {torch.float32}
    assert {p.dtype for p in reference.prompt_encoder.parameters()} == {torch.float32}
    ids = FAMILIES["llama"].inputs(2, 5)["input_ids"]
    with torch.no_grad():
        ours, theirs = cm(input_ids=ids).logits, reference(input_ids=ids).logits
    assert ours.dtype == theirs.dtype == BF16
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=0)

    spec = {"adapters": [VIRTUAL[0], VIRTUAL[1], {"method": "lora", "targets": ["q_proj"], "r": R, "alpha": ALPHA}],
            "adapter_dtype": "base"}
    mixed = peftc.compile(bf16_llama(), spec)
    by_method = {}
    for name, tensor in mixed.adapter_state_dict().items():
        by_method.setdefault(name.rsplit(".", 2)[-2], set()).add(tensor.dtype)
    assert by_method == {"p_tuning": {torch.float32}, "prefix": {torch.float32}, "lora": {BF16}}, by_method
