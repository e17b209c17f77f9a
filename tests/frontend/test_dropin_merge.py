"""merge_and_unload: the original class with adapters folded; save_pretrained round trip; the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import peftc
from families import FAMILIES, call, logits, randomize_adapters
from peftc.cli.main import main

LORA = {"method": "lora", "r": 4, "alpha": 8}


def compiled(name, adapters=None, **options):
    family = FAMILIES[name]
    model = family.build()
    spec = {"adapters": adapters or [{**LORA, "targets": list(family.targets)}], **options}
    cm = peftc.compile(model, spec).eval()
    randomize_adapters(cm)
    return family, model, cm


@pytest.fixture(scope="module")
def llama():
    """compiled("llama") for the tests that only read it (merge_and_unload makes a new model by default,
    and saving or generating leaves the compiled model's adapters as they are)."""
    return compiled("llama")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit"])
def test_unloaded_model_is_the_original_class_with_the_compiled_logits(name, tmp_path):
    family, model, cm = compiled(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = cm.merge_and_unload()
    assert type(plain) is type(model) and plain is not model
    assert plain.config.to_dict() == model.config.to_dict()
    for key, value in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(value, before[key]), key
    x = family.inputs(2, 5)
    with torch.no_grad():
        expected = logits(call(cm, family, x))
        torch.testing.assert_close(logits(plain.eval()(**x)), expected, atol=1e-5, rtol=1e-5)
        plain.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(logits(loaded(**x)), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits(model(**x)), expected, atol=1e-4)  # the adapters did something


def test_inplace_writes_into_the_users_model():
    family, model, cm = compiled("llama")
    x = family.inputs(2, 5)
    with torch.no_grad():
        expected = cm(**x).logits
    result = cm.merge_and_unload(inplace=True)
    assert type(result) is type(model)
    with torch.no_grad():  # the merged weights are written into the user's own memory
        torch.testing.assert_close(model(**x).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result(**x).logits, expected, atol=1e-5, rtol=1e-5)


def test_unloaded_causal_lm_generates(llama):
    family, model, cm = llama
    plain = cm.merge_and_unload().eval()
    ids = family.inputs(1, 4)["input_ids"]
    out = plain.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], ids)
    assert torch.equal(out, cm.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0))  # the same tokens


@pytest.mark.parametrize("adapters", [
    [{"method": "ln_tuning", "targets": ["input_layernorm"]}],  # PEFT's LN_TUNING merges: the copies replace
    [{**LORA, "targets": ["q_proj"]}, {"method": "copy", "targets": ["lm_head"]}],  # modules_to_save
])
def test_trained_copies_fold_into_the_weights_they_copy(adapters, tmp_path):
    family, model, cm = compiled("llama", adapters=adapters)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = cm.merge_and_unload()
    x = family.inputs(2, 5)
    with torch.no_grad():
        expected = cm(**x).logits
        assert not torch.allclose(model(**x).logits, expected, atol=1e-4)
        torch.testing.assert_close(plain.eval()(**x).logits, expected, atol=1e-5, rtol=1e-5)
        plain.save_pretrained(tmp_path)
        torch.testing.assert_close(type(model).from_pretrained(tmp_path).eval()(**x).logits, expected,
                                   atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_copy_of_a_tied_weight_does_not_fold_into_its_twin():
    family = FAMILIES["gpt2"]  # lm_head.weight is wte.weight
    model = family.build()
    cm = peftc.compile(model, {"adapters": [{"method": "copy", "targets": ["lm_head"]}]}).eval()
    randomize_adapters(cm)
    with pytest.raises(NotImplementedError, match="tied"):
        cm.merge_and_unload()


@pytest.mark.parametrize("adapter, named", [
    ({"method": "prefix", "num_tokens": 2}, "prefix"),
    ({"method": "prompt", "num_tokens": 2}, "prompt"),
])
def test_methods_that_cannot_fold_are_named(adapter, named):
    _, _, cm = compiled("llama", adapters=[adapter])
    with pytest.raises(peftc.SpecError, match=f"cannot be folded.*{named}"):
        cm.merge_and_unload()


def test_quantized_base_unloads_in_full_precision():
    family, model, cm = compiled("llama", quantize={"bits": 8})
    plain = cm.merge_and_unload()
    assert type(plain) is type(model)
    assert all(p.dtype == torch.float32 and 0 not in p.stride() for p in plain.parameters())
    x = family.inputs(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(**x).logits, cm(**x).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(peftc.SpecError, match="inplace=False"):
        cm.merge_and_unload(inplace=True)


def test_cli_merge_writes_a_transformers_folder(llama, tmp_path, capsys):
    family, model, cm = llama
    model.save_pretrained(tmp_path / "base")
    cm.save_adapter(tmp_path / "adapter")
    code = main(["merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = type(model).from_pretrained(tmp_path / "merged").eval()
    x = family.inputs(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, cm(**x).logits, atol=1e-5, rtol=1e-5)
    # what Trainer.save_model writes for a compiled model (its state_dict alone) merges given the spec
    from safetensors.torch import save_file

    (tmp_path / "trainer").mkdir()
    save_file({k: v.contiguous() for k, v in cm.state_dict().items()}, str(tmp_path / "trainer" / "model.safetensors"))
    cm.spec.save(tmp_path / "spec.json")
    code = main(["merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "trainer"), "--spec",
                 str(tmp_path / "spec.json"), "--out", str(tmp_path / "from_trainer")])
    assert code == 0, capsys.readouterr().err
    again = type(model).from_pretrained(tmp_path / "from_trainer").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, loaded(**x).logits, atol=0, rtol=0)


def test_cli_merge_refuses_a_model_without_save_pretrained(tmp_path, capsys):
    mlp = peftc.compile(FAMILIES["mlp"].build(), {"adapters": [{**LORA, "targets": ["fc1"]}]},
                        example_inputs=(torch.randn(3, 16),))
    mlp.save_adapter(tmp_path / "adapter")
    code = main(["merge", "cli_factories:tiny_mlp", "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert code == 2 and "save_pretrained" in err and not (tmp_path / "merged").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "peftc", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_python_m_peftc_merge_writes_what_auto_model_loads_and_generates(llama, tmp_path):
    """The real entry point, on a folder that cm.save_pretrained wrote (peftc and PEFT files side by side)."""
    from transformers import AutoModelForCausalLM

    family, model, cm = llama
    model.save_pretrained(tmp_path / "base")
    cm.save_pretrained(tmp_path / "adapter")
    done = run_cli("merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                   "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(loaded) is type(model)
    x = family.inputs(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, cm(**x).logits, atol=1e-5, rtol=1e-5)
        out = loaded.generate(x["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
        expected = cm.merge_and_unload().eval().generate(x["input_ids"], max_new_tokens=4, do_sample=False,
                                                         pad_token_id=0)
    assert torch.equal(out, expected) and out.shape == (2, 9)


def test_cli_merge_reads_an_adapter_peft_saved(llama, tmp_path, capsys):
    from peft_reference import peft_lora

    family, model, cm = llama
    model.save_pretrained(tmp_path / "base")
    peft_lora(model, cm, family.targets, 4, 8).save_pretrained(tmp_path / "peft")
    code = main(["merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft"), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    x = family.inputs(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, cm(**x).logits, atol=1e-5, rtol=1e-5)


def test_cli_merge_names_a_missing_adapter(llama, tmp_path, capsys):
    _, model, _ = llama
    model.save_pretrained(tmp_path / "base")
    code = main(["merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
