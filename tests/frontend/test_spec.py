"""Spec parsing: round trips, file formats, and errors that name the field."""

import json

import pytest

import peftc
from peftc import Spec, SpecError

LORA = {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 8, "alpha": 16, "dropout": 0.05}


def test_round_trip_is_exact():
    spec = Spec.from_dict({"adapters": [LORA], "trainable": ["*.bias"]})
    d = spec.to_dict()
    assert Spec.from_dict(d) == spec
    assert Spec.from_dict(d).to_dict() == d
    assert d["adapters"][0] == {**LORA, "rslora": False, "init": "default", "exclude": [], "rank_pattern": {},
                                "alpha_pattern": {}, "gate": False, "target_parameters": [], "lora_bias": False,
                                "pissa_niter": 0, "loftq_bits": 4, "loftq_iter": 1, "corda_method": "ipm",
                                "eva_rho": 1.0}


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_save_and_load(tmp_path, suffix):
    spec = Spec.from_dict({"adapters": [{**LORA, "rslora": True, "init": "gaussian"}]})
    path = spec.save(tmp_path / f"spec{suffix}")
    assert Spec.load(path) == spec


def test_rslora_scale():
    plain = Spec.from_dict({"adapters": [LORA]}).adapters[0]
    rs = Spec.from_dict({"adapters": [{**LORA, "rslora": True}]}).adapters[0]
    assert plain.scale == pytest.approx(16 / 8)
    assert rs.scale == pytest.approx(16 / 8 ** 0.5)


BAD_SPECS = [
    ({"adapters": [{**LORA, "r": 0}]}, "adapters[0].r: expected a positive integer, got 0"),
    ({"adapters": [{**LORA, "r": 2.5}]}, "adapters[0].r: expected a positive integer"),
    ({"adapters": [{**LORA, "r": True}]}, "adapters[0].r: expected a positive integer"),
    ({"adapters": [{**LORA, "alpha": -1}]}, "adapters[0].alpha: expected a positive number"),
    ({"adapters": [{**LORA, "dropout": 1.0}]}, "adapters[0].dropout: expected a number in [0, 1)"),
    ({"adapters": [{**LORA, "rslora": "yes"}]}, "adapters[0].rslora: expected true or false"),
    ({"adapters": [{**LORA, "init": "kaiming"}]}, "adapters[0].init: expected one of ['default', 'gaussian', 'pissa', 'olora', 'corda', 'loftq', 'eva']"),
    ({"adapters": [{**LORA, "rank": 4}]}, "adapters[0].rank: unknown field"),
    ({"adapters": [{**LORA, "targets": []}]}, "adapters[0].targets: expected a non-empty list"),
    ({"adapters": [{**LORA, "targets": ["q_proj", 3]}]}, "adapters[0].targets[1]: expected a non-empty string"),
    ({"adapters": [{**LORA, "targets": ["re:(unclosed"]}]}, "adapters[0].targets[0]: invalid regular expression"),
    ({"adapters": [{"method": "lorra", "targets": ["q_proj"]}]}, "adapters[0].method: expected one of"),
    ({"adapters": [{"targets": ["q_proj"]}]}, "adapters[0].method: expected one of"),
    ({"adapters": [{"method": "lora"}]}, "adapters[0].targets: expected a non-empty list"),  # or target_parameters
    ({"adapters": [{"method": "adapter"}]}, "adapters[0].targets: required field is missing"),
    ({"adapters": {"method": "lora"}}, "spec.adapters: expected a list"),
    ({"adapters": [LORA], "trainable": "*.bias*"}, None),  # a single string is accepted as one pattern
    ({"adapters": [LORA], "trainable": [""]}, "spec.trainable[0]: expected a non-empty string"),
    ({"adapters": [LORA], "adaptors": []}, "spec.adaptors: unknown field"),
    ({"adapters": [LORA], "version": 2}, "spec.version: expected 1"),
    ({"adapters": []}, "spec: trains nothing"),
    (["lora"], "spec: expected a mapping"),
]


@pytest.mark.parametrize("data,message", BAD_SPECS)
def test_bad_specs_name_the_field(data, message):
    if message is None:
        Spec.from_dict(data)
        return
    with pytest.raises(SpecError) as err:
        Spec.from_dict(data)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_field_suggests_the_near_name():
    with pytest.raises(SpecError, match="did you mean 'alpha'"):
        Spec.from_dict({"adapters": [{**LORA, "alpah": 16}]})


def test_bad_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        Spec.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        Spec.load(bad)
    txt = tmp_path / "spec.txt"
    txt.write_text(json.dumps({"adapters": [LORA]}))
    with pytest.raises(SpecError, match="expected a .json, .yaml or .yml"):
        Spec.load(txt)


def test_compile_accepts_dict_and_path(tmp_path):
    from families import FAMILIES, compile_family

    path = Spec.from_dict({"adapters": [{"method": "lora", "targets": ["fc1"]}]}).save(tmp_path / "s.yaml")
    _, cm = compile_family(FAMILIES["mlp"], path)
    assert isinstance(cm, peftc.CompiledModel)
    assert cm.spec == Spec.load(path)
