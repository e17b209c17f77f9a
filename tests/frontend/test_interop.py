"""HF PEFT interop: adapters saved by `peft` load into peftc with equal outputs, and back."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from families import FAMILIES, call, logits

import peftc
from peftc import CheckpointError, SpecError
from peftc.interop.from_peft import load_adapter_dir

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)

# One PEFT config per family, together covering every LoRA option peftc maps.
CASES = {
    "llama": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
                  alpha_pattern={"q_proj": 16}, modules_to_save=["lm_head"]),
    "gpt2": dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="all", use_rslora=True),
    "bert": dict(target_modules=r".*\.(query|value)", modules_to_save=["classifier"], bias="lora_only"),
    "vit": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], lora_dropout=0.1),
}


@torch.no_grad()
def randomize_trainable(module, seed: int = 0) -> None:
    """Non-zero values for everything PEFT trains (adapters, copies, biases)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in module.named_parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_adapter(family, tmp_path, seed=0, **config):
    model = get_peft_model(family.build(), LoraConfig(r=4, lora_alpha=8, **config))
    randomize_trainable(model, seed)
    model.eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_from_peft_and_back_match_peft(name, tmp_path):
    family = FAMILIES[name]
    inputs = family.inputs(2, 6)
    trained = peft_adapter(family, tmp_path / "peft", **CASES[name])
    expected = logits(PeftModel.from_pretrained(family.build(), tmp_path / "peft").eval()(**inputs))
    torch.testing.assert_close(expected, logits(trained(**inputs)), **TOL)
    base = family.build()
    assert not torch.allclose(expected, logits(base(**inputs)), **TOL)  # the adapter does something

    cm = peftc.from_peft(base, tmp_path / "peft", example_kwargs=inputs).eval()
    torch.testing.assert_close(logits(call(cm, family, inputs)), expected, **TOL)
    untouched = family.build()
    for (n, p), (_, q) in zip(base.named_parameters(), untouched.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad, n  # copies train; the model is never changed

    cm.save_adapter(tmp_path / "out", format="peft")
    reloaded = PeftModel.from_pretrained(family.build(), tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded(**inputs)), expected, **TOL)


def test_native_spec_saves_for_peft(tmp_path):
    """A spec written for peftc (globs, a regex, trainable biases, rank_pattern) round-trips through PEFT."""
    family = FAMILIES["bert"]
    inputs = family.inputs(2, 5)
    spec = {"adapters": [{"method": "lora", "targets": ["query", "re:.*layer\\.1\\..*value"], "r": 4, "alpha": 6,
                          "rank_pattern": {"bert.encoder.layer.0.*": 2}, "alpha_pattern": {"value": 3}},
                         {"method": "copy", "targets": ["classifier"]}],
            "trainable": ["*.bias"]}
    model = family.build()
    cm = peftc.compile(model, spec, example_kwargs=inputs).eval()
    randomize_trainable(cm)
    assert cm.adapter_state_dict()["bert.encoder.layer.0.attention.self.query.lora.A"].shape == (2, 48)
    expected = logits(cm(**inputs))
    cm.save_adapter(tmp_path / "out", format="peft")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["bias"] == "all" and saved["modules_to_save"] == ["classifier"]
    reloaded = PeftModel.from_pretrained(family.build(), tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded(**inputs)), expected, **TOL)


def test_conv_and_linear_on_a_plain_torch_model(tmp_path):
    family = FAMILIES["convnet"]
    (x,) = family.example_inputs()
    reference = peft_adapter(family, tmp_path / "peft", target_modules=["conv1", "conv2", "head"])
    cm = peftc.from_peft(family.build(), tmp_path / "peft", example_inputs=(x,)).eval()
    torch.testing.assert_close(cm(x), reference(x), **TOL)
    assert cm.adapter_state_dict()["conv1.lora.A"].shape == (4, 3, 3, 3)


# -- configs ---------------------------------------------------------------------------------

def test_spec_from_and_to_peft_config():
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True,
                        rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 4},
                        exclude_modules=["lm_head"], lora_dropout=0.05)
    spec = peftc.Spec.from_peft_config(config)
    lora = spec.adapters[0]
    assert (lora.targets, lora.r, lora.alpha, lora.rslora, lora.dropout) == (("q_proj", "v_proj"), 4, 16, True, 0.05)
    assert lora.r_at("model.layers.0.self_attn.q_proj") == 2 and lora.r_at("model.layers.1.self_attn.q_proj") == 4
    assert lora.alpha_at("model.layers.1.self_attn.v_proj") == 4
    back = spec.to_peft_config()
    for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "lora_dropout"):
        assert back[field] == getattr(config, field), field
    assert back["target_modules"] == ["q_proj", "v_proj"] and back["exclude_modules"] == ["lm_head"]
    assert peftc.Spec.from_peft_config(back).to_dict() == spec.to_dict()
    LoraConfig(**{k: v for k, v in back.items() if k != "peft_type"})  # PEFT accepts what we write


def test_layers_to_transform_follows_peft_matching():
    spec = peftc.Spec.from_peft_config({"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": [1],
                                        "layers_pattern": "layers"})
    from peftc.core.targets import matches

    (pattern,) = spec.adapters[0].targets
    assert matches(pattern, "model.layers.1.self_attn.q_proj")
    assert not matches(pattern, "model.layers.0.self_attn.q_proj")
    assert not matches(pattern, "model.layers.1.self_attn.k_proj")


@pytest.mark.parametrize("spec, field", [
    ({"adapters": [{"method": "lora", "targets": ["q"]}, {"method": "lora", "targets": ["v"]}]}, "adapters"),
    ({"adapters": [{"method": "lora", "targets": ["q"]}], "trainable": ["*.weight"]}, "trainable"),
    ({"adapters": [{"method": "lora", "targets": ["q"]}, {"method": "copy", "targets": ["x"], "params": ["weight"]}]},
     "adapters[1].params"),
    ({"adapters": [{"method": "lora", "targets": ["q"]}, {"method": "copy", "targets": ["re:a|b"]}]},
     "adapters[1].targets"),
])
def test_to_peft_config_names_what_peft_cannot_express(spec, field):
    with pytest.raises(SpecError, match=rf"^{field.replace('[', '.').replace(']', '.')}"):
        peftc.Spec.from_dict(spec).to_peft_config()


@pytest.mark.parametrize("config, match", [
    ({"peft_type": "POLY", "target_modules": ["q"]}, r"peft_type: 'POLY' is not supported; supported: \['LORA'"),
    ({"peft_type": "LORA", "target_modules": ["q"], "use_qalora": True}, "use_qalora"),
    ({"peft_type": "LORA", "target_modules": ["q"], "init_lora_weights": "orthogonal"}, "init_lora_weights"),
    ({"peft_type": "LORA", "target_modules": "all-linear"}, "all-linear"),
    ({"peft_type": "LORA"}, "target_modules"),
])
def test_unsupported_configs_name_the_field(config, match):
    with pytest.raises(SpecError, match=match):
        peftc.Spec.from_peft_config(config)


def test_unsupported_types_name_type_and_supported_list():
    from peftc.interop.peft_rows import supported_types

    assert supported_types()[:7] == ["LORA", "IA3", "LOHA", "LOKR", "VERA", "PROMPT_TUNING", "PREFIX_TUNING"]
    assert {"OFT", "BOFT", "HRA", "SHIRA"} <= set(supported_types())
    assert {"ADALORA", "FOURIERFT", "VBLORA", "P_TUNING"} <= set(supported_types())
    with pytest.raises(SpecError, match=r"'POLY' is not supported; supported: \['LORA', 'IA3'"):
        peftc.Spec.from_peft_config({"peft_type": "POLY", "target_modules": ["q"]})


# -- files and errors (small models, so they stay fast) -----------------------------------

@pytest.fixture(scope="module")
def mlp_adapter(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mlp")
    family = FAMILIES["mlp"]
    reference = peft_adapter(family, directory, target_modules=["fc1", "fc2"], modules_to_save=None)
    return directory, reference


def test_all_linear_and_load_adapter_dir_both_formats(mlp_adapter, tmp_path):
    directory, reference = mlp_adapter
    family = FAMILIES["mlp"]
    (x,) = family.example_inputs()
    cm = load_adapter_dir(family.build(), directory, example_inputs=(x,)).eval()
    torch.testing.assert_close(cm(x), reference(x), **TOL)
    cm.save_adapter(tmp_path / "native")
    again = load_adapter_dir(family.build(), tmp_path / "native", example_inputs=(x,)).eval()
    torch.testing.assert_close(again(x), reference(x), **TOL)
    config = json.loads((directory / "adapter_config.json").read_text())
    every_linear = peftc.from_peft(family.build(), {**config, "target_modules": "all-linear"}, example_inputs=(x,))
    assert {r.split(".")[0] for r in every_linear.adapter_state_dict()} == {"fc1", "fc2"}
    with pytest.raises(CheckpointError, match="neither a peftc checkpoint"):
        load_adapter_dir(family.build(), tmp_path)
    assert peftc.Spec.from_peft_config(directory) == peftc.Spec.from_peft_config(LoraConfig(**{
        k: v for k, v in config.items() if k != "peft_type"}))
    fresh = peftc.from_peft(family.build(), LoraConfig(r=2, target_modules=["fc2"]), example_inputs=(x,)).eval()
    torch.testing.assert_close(fresh(x), family.build()(x))  # a config alone: new adapters, B = 0


def test_pickle_is_refused_unless_allowed(mlp_adapter, tmp_path):
    directory, reference = mlp_adapter
    from safetensors.torch import load_file

    (tmp_path / "adapter_config.json").write_text((directory / "adapter_config.json").read_text())
    torch.save(load_file(str(directory / "adapter_model.safetensors")), tmp_path / "adapter_model.bin")
    family = FAMILIES["mlp"]
    (x,) = family.example_inputs()
    with pytest.raises(CheckpointError, match="pickle.*allow_pickle=True"):
        peftc.from_peft(family.build(), tmp_path, example_inputs=(x,))
    cm = peftc.from_peft(family.build(), tmp_path, allow_pickle=True, example_inputs=(x,)).eval()
    torch.testing.assert_close(cm(x), reference(x), **TOL)


def test_missing_truncated_and_mismatched_files(mlp_adapter, tmp_path):
    directory, _ = mlp_adapter
    family = FAMILIES["mlp"]
    example = dict(example_inputs=family.example_inputs())
    with pytest.raises(CheckpointError, match="does not exist"):
        peftc.from_peft(family.build(), tmp_path / "nowhere", **example)
    config = json.loads((directory / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has no adapter_model.safetensors"):
        peftc.from_peft(family.build(), tmp_path, **example)
    data = (directory / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        peftc.from_peft(family.build(), tmp_path, **example)
    (tmp_path / "adapter_model.safetensors").write_bytes(data)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(CheckpointError, match=r"'base_model\.model\.fc\d\.lora_[AB]\.weight'.*\(4, .*\) != .*3"):
        peftc.from_peft(family.build(), tmp_path, **example)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["fc3"]}))
    with pytest.raises(SpecError, match="'fc3' matches no module path"):
        peftc.from_peft(family.build(), tmp_path, **example)


def test_copies_train_merge_and_round_trip(tmp_path):
    family = FAMILIES["mlp"]
    (x,) = family.example_inputs()
    reference = peft_adapter(family, tmp_path / "peft", target_modules=["fc1"], modules_to_save=["fc2"], bias="all")
    model = family.build()
    cm = peftc.from_peft(model, tmp_path / "peft", example_inputs=(x,)).eval()
    torch.testing.assert_close(cm(x), reference(x), **TOL)
    torch.testing.assert_close(cm.merged()(x), reference(x), **TOL)
    assert "copy" in str(cm.report())
    cm.train()
    cm(x).sum().backward()
    copies = {n: p for n, p in cm.named_parameters() if ".copy" in n}
    assert copies and all(p.grad is not None for p in copies.values())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # the user's flags, untouched
    config = cm.spec.to_peft_config()
    assert (config["modules_to_save"], config["bias"], config["exclude_modules"]) == (["fc2"], "all", None)


def test_a_checkpoint_that_changes_a_base_weight_gets_a_copy(mlp_adapter, tmp_path):
    """PEFT would load such a weight into the model; peftc copies it and leaves the model alone."""
    directory, reference = mlp_adapter
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    new_weight = torch.randn(4, 32)
    save_file({**tensors, "base_model.model.fc2.weight": new_weight}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text((directory / "adapter_config.json").read_text())
    family = FAMILIES["mlp"]
    (x,) = family.example_inputs()
    model = family.build()
    cm = peftc.from_peft(model, tmp_path, example_inputs=(x,)).eval()
    expected = copy.deepcopy(reference)  # the fixture is shared: change a copy of it
    with torch.no_grad():
        expected.base_model.model.fc2.base_layer.weight.copy_(new_weight)
    torch.testing.assert_close(cm(x), expected(x), **TOL)
    assert torch.equal(model.fc2.weight, family.build().fc2.weight)


def test_copy_pass_node_counts_and_no_op():
    family = FAMILIES["mlp"]
    (x,) = family.example_inputs()
    cm = peftc.compile(family.build(), {"adapters": [{"method": "copy", "targets": ["fc2"]}]}, example_inputs=(x,))
    reads = [n.target for n in cm.graph_module.graph.nodes if n.op == "get_attr"]
    assert sorted(t for t in reads if t.startswith("peftc.")) == ["peftc.fc2.copy.bias", "peftc.fc2.copy.weight"]
    assert "fc2.weight" not in reads and cm.records[0].modified
    noop = peftc.compile(family.build(), {"adapters": [{"method": "copy", "targets": ["fc2"], "params": ["scale"]}]},
                         example_inputs=(x,))
    assert not noop.records[0].modified and noop.adapter_state_dict() == {}


# -- non-LoRA PEFT types on every HF family: adapters saved by `peft`, loaded by peftc -------

# Per family: attention targets, one feed-forward module (IA3 scales its input), the task type.
TYPE_TARGETS = {
    "llama": (["q_proj", "v_proj"], "down_proj", "CAUSAL_LM"),
    "gpt2": (["c_attn"], "mlp.c_proj", "CAUSAL_LM"),  # Conv1D layers (fan_in_fan_out)
    "bert": (["query", "value"], "output.dense", "SEQ_CLS"),
    "vit": (["q_proj", "v_proj"], "fc2", None),
}
TYPES = ["ia3", "loha", "lokr", "dora", "vera", "prompt", "prefix"]
# Cases PEFT itself does not support are not generated:
#  - BERT prefix tuning: BERT takes no past_key_values in this transformers, so PEFT cannot inject a prefix.
#  - ViT prompt/prefix tuning: ViT has no token embedding input (pixel_values), PEFT's virtual tokens do not apply.
NOT_IN_PEFT = {("bert", "prefix"), ("vit", "prompt"), ("vit", "prefix")}
TYPE_CASES = [(f, k) for f in TYPE_TARGETS for k in TYPES if (f, k) not in NOT_IN_PEFT]


def _peft_type_config(family: str, kind: str):
    from peft import (
        IA3Config,
        LoHaConfig,
        LoKrConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        VeraConfig,
    )

    attention, feedforward, task = TYPE_TARGETS[family]
    # PEFT's LoHa/LoKr take Linear and Conv layers only, not GPT-2's Conv1D: on GPT-2 they adapt the
    # (Linear, tied) lm_head instead.
    loha = ["lm_head"] if family == "gpt2" else attention
    lokr = ["lm_head"] if family == "gpt2" else attention + [feedforward]
    return {
        "ia3": lambda: IA3Config(target_modules=attention + [feedforward], feedforward_modules=[feedforward]),
        "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=loha),
        "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=lokr),
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=attention, use_dora=True),
        "vera": lambda: VeraConfig(r=8, target_modules=attention, projection_prng_key=3),
        "prompt": lambda: PromptTuningConfig(task_type=task, num_virtual_tokens=3),
        "prefix": lambda: PrefixTuningConfig(task_type=task, num_virtual_tokens=3),
    }[kind]()


@pytest.mark.parametrize("name, kind", TYPE_CASES)
def test_from_peft_matches_peft_for_non_lora_types(name, kind, tmp_path):
    family = FAMILIES[name]
    inputs = family.inputs(2, 6)
    model = get_peft_model(family.build(), _peft_type_config(name, kind))
    randomize_trainable(model, seed=1)
    model.eval().save_pretrained(tmp_path / "peft")
    expected = logits(PeftModel.from_pretrained(family.build(), tmp_path / "peft").eval()(**inputs))
    plain = logits(family.build()(**inputs))
    tail = expected[:, -plain.shape[1]:] if expected.dim() == 3 else expected
    assert not torch.allclose(tail, plain, **TOL)  # the adapter does something

    cm = peftc.from_peft(family.build(), tmp_path / "peft", example_kwargs=inputs).eval()
    torch.testing.assert_close(logits(call(cm, family, inputs)), expected, **TOL)

    cm.save_adapter(tmp_path / "out", format="peft")
    reloaded = PeftModel.from_pretrained(family.build(), tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded(**inputs)), expected, **TOL)
