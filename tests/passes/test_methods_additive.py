"""Additive methods (adapter, prompt, prefix) and hybrids: parity with HF PEFT where it has the method,
an eager reference written here where it does not, op counts, spec errors, a hybrid that trains."""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, compile_family, logits, randomize_adapters

import peftc
from peftc.ir.graph_edit import provenance
from peftc.spec import presets

N = 3  # virtual tokens
ACT = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def padded_inputs(family, batch=2, seq=5):
    x = family.inputs(batch, seq)
    x["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    x["attention_mask"][1, :2] = 0  # left padding on one row
    return x


def adapter_nodes(gm, method):
    return [n for n in gm.graph.nodes if (provenance(n) or {}).get("method") == method]


# -- eager references (methods HF PEFT lacks) --------------------------------------------------
def adapter_update(h, w, activation="relu", scale=1.0, gated=False):
    hidden = ACT[activation](F.linear(h, w["down"], w["down_bias"]))
    delta = F.linear(hidden, w["up"], w["up_bias"]) * scale
    return delta * torch.sigmoid(F.linear(h, w["gate"], w["gate_bias"])) if gated else delta


def lora_update(x, w, scale, gated=False):
    delta = F.linear(F.linear(x, w["A"]), w["B"]) * scale
    return delta * torch.sigmoid(F.linear(x, w["gate"], w["gate_bias"])) if gated else delta


def weights_of(cm, site_path, slot):
    prefix = f"{site_path}.{slot}."
    return {k[len(prefix):]: v for k, v in cm.adapter_state_dict().items() if k.startswith(prefix)}


@contextmanager
def hooks(model, updates):
    """updates: module path -> fn(module input, module output) -> output."""
    handles = [model.get_submodule(path).register_forward_hook(
        lambda mod, args, out, fn=fn: fn(args[0], out)) for path, fn in updates.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def prefixed_sdpa(prefixes):
    """Eager prefix tuning: each sdpa call (in layer order) sees its layer's (gated) prefix keys/values."""
    real = F.scaled_dot_product_attention
    calls = iter(prefixes)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        w = next(calls)
        groups = q.shape[1] // w["key"].shape[0]
        pk, pv = (w[n].repeat_interleave(groups, 0).expand(q.shape[0], -1, -1, -1) for n in ("key", "value"))
        if "gate" in w:
            pv = pv * torch.sigmoid((q @ w["gate"]).mean(2, keepdim=True) + w["gate_bias"])
        open_cols = attn_mask.new_ones(*attn_mask.shape[:-1], pk.shape[2])
        return real(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=torch.cat([open_cols, attn_mask], -1),
                    dropout_p=dropout_p, scale=scale, **kw)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa):
        yield


# -- adapter -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family_name, serial, parallel", [
    ("llama", "o_proj", "down_proj"),
    ("gpt2", "c_proj", "c_fc"),  # Conv1D sites: addmm with an [in, out] weight
])
def test_adapter_matches_eager_reference(family_name, serial, parallel):
    """LoRA then a serial adapter on one site (the adapter sees the LoRA-updated output), a parallel one elsewhere."""
    family = FAMILIES[family_name]
    spec = {"adapters": [
        {"method": "lora", "targets": [serial], "exclude": ["*.mlp.c_proj"], "r": 2, "alpha": 4},
        {"method": "adapter", "targets": [serial], "exclude": ["*.mlp.c_proj"], "bottleneck": 4,
         "activation": "gelu", "scale": 0.5},
        {"method": "adapter", "targets": [parallel], "placement": "parallel", "bottleneck": 5,
         "activation": "silu", "scale": 2.0},
    ]}
    model, cm = compile_family(family, spec)
    x = padded_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(logits(cm(**x)), logits(model(**x)), rtol=0, atol=0)  # B = up = 0: identity
    randomize_adapters(cm)
    lora_sites, serial_sites, parallel_sites = (r.sites for r in cm.records[:3])
    assert lora_sites == serial_sites

    def lora_then_adapter(x, y, site):
        lora = weights_of(cm, site, "lora")
        if family_name == "gpt2":  # Conv1D: peftc's A/B are [r, in] / [out, r] as for nn.Linear
            x = x.reshape(-1, x.shape[-1])
        y = y + lora_update(x, lora, 2.0).view_as(y)
        return y + adapter_update(y, weights_of(cm, site, "adapter1"), "gelu", 0.5)

    updates = {p: (lambda x, y, p=p: lora_then_adapter(x, y, p)) for p in serial_sites}
    updates.update({p: (lambda h, y, w=weights_of(cm, p, "adapter2"): y + adapter_update(h, w, "silu", 2.0))
                    for p in parallel_sites})
    with torch.no_grad(), hooks(model, updates):
        expected = logits(model(**x))
    with torch.no_grad():
        got = logits(cm(**x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # two linears per adapter (down, up), one add into the site's output
    linears = [n for n in adapter_nodes(cm.flat_graph_module, "adapter") if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 2 * (len(serial_sites) + len(parallel_sites))
    if family_name == "llama":  # merged(): LoRA folds under the adapter, which stays as graph ops
        merged = cm.merged()
        assert not adapter_nodes(merged.flat_graph_module, "lora")
        with torch.no_grad():
            torch.testing.assert_close(logits(merged(**x)), got, rtol=1e-5, atol=1e-5)


# -- prompt tuning: parity with HF PEFT --------------------------------------------------------
PROMPT_SITE = {"llama": "model.embed_tokens", "gpt2": "transformer.wte", "bert": "bert.embeddings.word_embeddings"}


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "bert"])
def test_prompt_matches_peft(family_name):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    family = FAMILIES[family_name]
    x = padded_inputs(family)
    if family_name == "bert":  # classification: [b] labels stay as they are; token types gain N zeros
        task, x["labels"] = TaskType.SEQ_CLS, torch.tensor([0, 2])
        x["token_type_ids"] = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    else:  # causal LM: [b, S] labels gain N ignored (-100) positions
        task, x["labels"] = TaskType.CAUSAL_LM, x["input_ids"].clone()
    model, cm = compile_family(family, {"adapters": [{"method": "prompt", "num_tokens": N}]}, example_kwargs=x)
    randomize_adapters(cm)
    (prompt,) = cm.adapter_state_dict().values()
    ref = get_peft_model(family.build(), PromptTuningConfig(task_type=task, num_virtual_tokens=N))
    with torch.no_grad():
        ref.prompt_encoder.default.embedding.weight.copy_(prompt)
    ref.eval()
    with torch.no_grad():
        got, expected = cm(**x), ref(**x)
    if family_name != "bert":
        assert got.logits.shape == (2, 5 + N, 128)  # the virtual positions are in the output, as in HF PEFT
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    # peft also trains BERT's classifier head (modules_to_save); the prompt counts are the same
    assert prompt.numel() == sum(p.numel() for p in ref.prompt_encoder.parameters() if p.requires_grad)
    assert cm.records[0].sites == (PROMPT_SITE[family_name],)


# -- prefix tuning: parity with HF PEFT --------------------------------------------------------
def peft_prefix_table(cm, config):
    """HF PEFT's [N, layers * 2 * kv_heads * head_dim] prefix table from peftc's per-layer tensors."""
    sd = cm.adapter_state_dict()
    layers = config.num_layers
    table = torch.empty(N, layers * 2, config.num_attention_heads, config.token_dim // config.num_attention_heads)
    keys = [k for k in sd if k.endswith("prefix.key")]
    assert len(keys) == layers
    for layer, key in enumerate(keys):
        table[:, 2 * layer] = sd[key].permute(1, 0, 2)
        table[:, 2 * layer + 1] = sd[key[: -len("key")] + "value"].permute(1, 0, 2)
    return table.view(N, -1)


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_prefix_matches_peft(family_name):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    family = FAMILIES[family_name]
    model, cm = compile_family(family, {"adapters": [{"method": "prefix", "num_tokens": N}]})
    randomize_adapters(cm, std=0.5)
    ref = get_peft_model(family.build(), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N))
    with torch.no_grad():
        ref.prompt_encoder.default.embedding.weight.copy_(peft_prefix_table(cm, ref.active_peft_config))
    ref.eval()
    x = padded_inputs(family)
    with torch.no_grad():
        got, expected, base = logits(cm(**x)), logits(ref(**x)), logits(model(**x))
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sum(t.numel() for t in cm.adapter_state_dict().values()) == sum(
        p.numel() for p in ref.parameters() if p.requires_grad)
    sdpa = [n for n in cm.flat_graph_module.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(cm.records[0].sites) == len(sdpa) == 2
    # per attention op: two cats for keys/values, one for the mask; positions shifted (llama: rotary, gpt2: wpe)
    cats = [n for n in adapter_nodes(cm.flat_graph_module, "prefix") if n.target == torch.ops.aten.cat.default]
    assert len(cats) == 3 * len(sdpa)
    assert not cm.records[0].notes


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry, message", [
    ({"method": "prefix", "num_tokens": 2}, r"adapters\[1\]\.method: 'prefix' .* attention ops"),
    ({"method": "prompt", "num_tokens": 2}, r"adapters\[1\]\.method: 'prompt' .* no embedding lookup fed by an input"),
    ({"method": "adapter", "targets": ["fc1"], "placement": "beside"}, r"adapters\[1\]\.placement: expected one of"),
    ({"method": "adapter", "targets": ["fc1"], "activation": "relu6"}, r"adapters\[1\]\.activation"),
    ({"method": "adapter", "targets": ["fc1"], "bottleneck": 0}, r"adapters\[1\]\.bottleneck"),
])
def test_spec_errors_name_the_entry(entry, message):
    family = FAMILIES["mlp"]
    spec = {"adapters": [{"method": "lora", "targets": ["fc2"], "r": 2}, entry]}
    with pytest.raises(peftc.SpecError, match=message):
        compile_family(family, spec)


def test_gated_lora_refuses_non_linear_sites():
    with pytest.raises(peftc.SpecError, match=r"adapters\[0\]\.targets: .*conv"):
        compile_family(FAMILIES["convnet"], {"adapters": [{"method": "lora", "targets": ["conv1"], "gate": True}]})


# -- hybrids -----------------------------------------------------------------------------------
def test_presets_are_valid_specs():
    mam = peftc.Spec.from_dict(presets.mam_adapter(["down_proj"], num_tokens=4))
    assert [e.method for e in mam.adapters] == ["prefix", "adapter"]
    assert mam.adapters[1].placement == "parallel"
    uni = peftc.Spec.from_dict(presets.unipelt(["q_proj"], ["down_proj"]))
    assert [(e.method, e.gate) for e in uni.adapters] == [("lora", True), ("prefix", True), ("adapter", True)]
    assert peftc.Spec.from_dict(uni.to_dict()) == uni


def test_unipelt_matches_eager_reference():
    family = FAMILIES["llama"]
    spec = presets.unipelt(["q_proj", "v_proj"], ["down_proj"], r=2, alpha=4, num_tokens=N, bottleneck=4)
    model, cm = compile_family(family, spec)
    randomize_adapters(cm, std=0.3)
    lora_sites, prefix_sites, adapter_sites = (r.sites for r in cm.records[:3])
    updates = {p: (lambda x, y, w=weights_of(cm, p, "lora"): y + lora_update(x, w, 2.0, gated=True))
               for p in lora_sites}
    updates.update({p: (lambda x, y, w=weights_of(cm, p, "adapter"): y + adapter_update(y, w, gated=True))
                    for p in adapter_sites})
    prefixes = [weights_of(cm, p, "prefix") for p in prefix_sites]
    x = padded_inputs(family)
    positions = torch.arange(N, N + 5).expand(2, -1)  # the real tokens sit after the prefix
    with torch.no_grad(), hooks(model, updates), prefixed_sdpa(prefixes):
        expected = logits(model(**x, position_ids=positions))
    with torch.no_grad():
        got = logits(cm(**x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # gates make every method input-dependent: nothing folds, and report says so
    assert {m["merge"] for m in cm.report().to_dict()["methods"]} == {"kept as graph ops"}


def test_three_method_hybrid_trains_and_reports():
    family = FAMILIES["llama"]
    spec = {"adapters": [
        {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4},
        {"method": "adapter", "targets": ["down_proj"], "bottleneck": 8},
        {"method": "prefix", "num_tokens": 4},
    ]}
    x = family.inputs(4, 6)
    x["labels"] = x["input_ids"].clone()
    model, cm = compile_family(family, spec, example_kwargs=x)
    base_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    trainable = [p for p in cm.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in cm.adapter_root.parameters()}
    opt = torch.optim.Adam(trainable, lr=1e-2)
    cm.train()
    losses = []
    for _ in range(8):
        loss = cm(**x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_before.items())
    assert all(not torch.equal(v, adapter_before[k]) for k, v in cm.adapter_state_dict().items())

    report = cm.report()
    rows = {m["method"]: m for m in report.to_dict()["methods"]}
    layers = range(2)
    assert rows["lora"]["sites"] == [f"model.layers.{i}.self_attn.{p}" for i in layers for p in ("q_proj", "v_proj")]
    assert rows["adapter"]["sites"] == [f"model.layers.{i}.mlp.down_proj" for i in layers]
    assert rows["prefix"]["sites"] == [f"model.layers.{i}.self_attn" for i in layers]
    assert rows["lora"]["params"] == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)
    assert rows["adapter"]["params"] == 2 * (8 * 64 + 8 + 64 * 8 + 64)
    assert rows["prefix"]["params"] == 2 * 2 * (2 * 4 * 16)  # layers * (key, value) * kv_heads * N * head_dim
    assert sum(r["params"] for r in rows.values()) == report.totals["trainable_params"]
    assert [rows[m]["merge"] for m in ("lora", "adapter", "prefix")] == [
        "folded into weights", "kept as graph ops", "kept as graph ops"]
    text = str(report)
    assert "model.layers.{0..1}.self_attn" in text and "kept as graph ops" in text

    # merged(): LoRA folds away, the adapter and prefix stay as graph ops, the outputs agree
    cm.eval()
    merged = cm.merged()
    gm = merged.flat_graph_module
    assert not adapter_nodes(gm, "lora")
    assert adapter_nodes(gm, "adapter") and adapter_nodes(gm, "prefix")
    with torch.no_grad():
        torch.testing.assert_close(logits(merged(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)
