"""Promise: a damaged checkpoint or PEFT folder is a CheckpointError naming the file (and the tensor);
a refused load changes nothing, in the compiled model or the user's.

Damage is drawn at random: spec.json / adapter_config.json replaced by hostile JSON or bytes,
safetensors files truncated or with a flipped header byte, a tensor in another dtype, holding
NaN or infinity, missing, extra or of another shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import peftc
from families import MLP
from model_state import ModelState
from peftc.interop.from_peft import load_adapter_dir

SPEC = {"adapters": [{"method": "lora", "targets": ["fc1", "fc2"], "r": 2}], "trainable": ["fc2.bias"]}
X = (torch.randn(3, 16),)

hostile_json = st.sampled_from([
    b"[]", b"null", b'"lora"', b"\xff\xfe{}", "{}".encode("utf-16"), b'{"adapters": [{"method": ["lora"]}]}',
    b'{"adapters": [{"method": "lora", "r": ' + b"7" * 5000 + b"}]}", b"[" * 3000, b'{"version": true}',
    b'{"adapters": [{"method": "lora", "targets": ["fc1"], "r": 1e400}]}', b"{", b"",
])
tensor_damage = st.sampled_from(["int32", "bool", "float64", "float16", "bfloat16", "nan", "inf", "missing",
                                 "extra", "shape"])
LOSSLESS = ("float64", "float16", "bfloat16")  # damage a load may accept: the values fit float32 exactly
file_damage = st.sampled_from(["truncate", "flip_header", "empty", "zeros"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = MLP()
    cm = peftc.compile(model, SPEC, example_inputs=X)
    with torch.no_grad():
        for i, t in enumerate(cm.adapter_state_dict().values()):
            t.copy_(torch.randn_like(t) * 0.1 + i)
    folder = tmp_path_factory.mktemp("ckpt") / "adapter"
    cm.save_adapter(folder)
    return model, cm, folder


def damaged_copy(folder: Path, tmp: Path) -> Path:
    target = tmp / "damaged"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    return target


def damage_tensor(weights: Path, how: str, pick: int) -> str:
    """Rewrite one tensor of a safetensors file; returns its name."""
    tensors = load_file(weights)
    name = sorted(tensors)[pick % len(tensors)]
    value = tensors[name]
    if how in ("int32", "bool", "float64", "float16", "bfloat16"):
        tensors[name] = value.to(getattr(torch, how))
    elif how in ("nan", "inf"):
        value = value.clone()
        value.view(-1)[0] = float(how)
        tensors[name] = value
    elif how == "missing":
        del tensors[name]
    elif how == "extra":
        tensors[name + ".extra"] = value.clone()
    elif how == "shape":
        tensors[name] = torch.zeros(value.numel() + 1)
    save_file(tensors, weights)
    return name


def damage_file(path: Path, how: str, at: float) -> None:
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: int(len(raw) * at)])
    elif how == "flip_header":
        i = int(8 + (min(len(raw), 200) - 9) * at)
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0x5A]) + raw[i + 1:])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\0" * len(raw))


def assert_refused(load, cm, files: tuple[str, ...], tensor: str | None = None) -> None:
    """`load()` raises CheckpointError naming one of `files` (and `tensor`), and cm's adapter is unchanged."""
    before = {n: t.clone() for n, t in cm.adapter_state_dict().items()}
    with pytest.raises(peftc.CheckpointError) as err:
        load()
    message = str(err.value)
    assert any(f in message for f in files), message
    if tensor is not None:
        assert tensor in message, message
    for name, value in cm.adapter_state_dict().items():
        assert torch.equal(value, before[name]), name


@given(hostile_json)
def test_a_damaged_spec_json_is_a_checkpoint_error_naming_the_file(saved, tmp_path_factory, raw):
    model, cm, folder = saved
    target = damaged_copy(folder, tmp_path_factory.mktemp("d"))
    (target / "spec.json").write_bytes(raw)
    before = ModelState.of(model)
    assert_refused(lambda: cm.load_adapter(target), cm, ("spec.json",))
    assert_refused(lambda: load_adapter_dir(model, target, example_inputs=X), cm, ("spec.json",))
    before.assert_same(model)


@given(tensor_damage, st.integers(0, 7))
def test_a_damaged_tensor_is_refused_by_name_or_loads_exactly(saved, tmp_path_factory, how, pick):
    model, cm, folder = saved
    target = damaged_copy(folder, tmp_path_factory.mktemp("d"))
    name = damage_tensor(target / "adapter.safetensors", how, pick)
    if how in LOSSLESS:  # float32 <- float64 of float32 values, float16, bfloat16: every value survives
        cm.load_adapter(target)
        assert torch.equal(cm.adapter_state_dict()[name], load_file(target / "adapter.safetensors")[name].float())
        return
    assert_refused(lambda: cm.load_adapter(target), cm, (str(target),), tensor=name)


@given(file_damage, st.floats(0.0, 0.99))
def test_a_damaged_weights_file_is_a_checkpoint_error_naming_it(saved, tmp_path_factory, how, at):
    model, cm, folder = saved
    target = damaged_copy(folder, tmp_path_factory.mktemp("d"))
    damage_file(target / "adapter.safetensors", how, at)
    try:
        load_file(target / "adapter.safetensors")
    except Exception:  # noqa: BLE001 - damage safetensors itself notices
        assert_refused(lambda: cm.load_adapter(target), cm, ("adapter.safetensors",))
    else:  # a flip that still parses: it may change values, never raise another error type
        try:
            cm.load_adapter(target)
        except peftc.CheckpointError as err:
            assert str(target) in str(err)


# -- PEFT folders ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    reference = get_peft_model(MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"]))
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    reference.save_pretrained(folder)
    return folder


hostile_value = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(allow_nan=True),
                          st.text(max_size=4), st.lists(st.integers(), max_size=2),
                          st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
config_fields = st.sampled_from(["r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora",
                                 "peft_type", "rank_pattern", "modules_to_save", "init_lora_weights", "layers_to_transform"])


@given(st.one_of(st.tuples(config_fields, hostile_value), hostile_json))
def test_a_damaged_peft_config_is_refused_naming_the_file(peft_folder, tmp_path_factory, damage):
    target = damaged_copy(peft_folder, tmp_path_factory.mktemp("d"))
    config_file = target / "adapter_config.json"
    if isinstance(damage, bytes):
        config_file.write_bytes(damage)
    else:
        config = json.loads(config_file.read_text())
        config[damage[0]] = damage[1]
        config_file.write_text(json.dumps(config))
    model = MLP()
    before = ModelState.of(model)
    try:
        peftc.from_peft(model, target, example_inputs=X)
    except peftc.CheckpointError as err:
        assert "adapter_config.json" in str(err) or str(target) in str(err), err
    except peftc.SpecError as err:  # a readable config that does not fit this model names the field
        assert str(err).startswith(("adapters[", "spec", "trainable")), err
    before.assert_same(model)


@given(st.one_of(tensor_damage, file_damage), st.integers(0, 3), st.floats(0.0, 0.99))
def test_damaged_peft_weights_are_refused_naming_the_file(peft_folder, tmp_path_factory, how, pick, at):
    target = damaged_copy(peft_folder, tmp_path_factory.mktemp("d"))
    weights = target / "adapter_model.safetensors"
    if how in ("truncate", "flip_header", "empty", "zeros"):
        damage_file(weights, how, at)
    else:
        damage_tensor(weights, how, pick)
    model = MLP()
    before = ModelState.of(model)
    try:
        peftc.from_peft(model, target, example_inputs=X)
    except peftc.CheckpointError as err:
        assert "adapter_model.safetensors" in str(err) or str(target) in str(err), err
    else:
        assert how in (*LOSSLESS, "flip_header"), how  # lossless, or a flip safetensors cannot see
    before.assert_same(model)
