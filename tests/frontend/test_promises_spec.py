"""Promise: any spec dict or spec file compiles or raises SpecError naming the field; the model never changes.

Specs are drawn from the method table (peftc.spec.methods.METHODS) and each config
dataclass's own fields, so a new method is attacked without touching this file. Values are
plausible ones (from the field's default) or hostile ones: wrong types, NaN/inf, huge ints,
unicode, nested containers, bools for ints, unknown keys.
HYPOTHESIS_PROFILE=long runs many more examples (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import peftc
from families import MLP
from model_state import ModelState, mixed_modes
from peftc.spec.methods import METHODS, QUANTIZE_CONFIG
from peftc.spec.parse import Spec

# A SpecError names the field it is about: a path into the spec, such as adapters[0].r or quantize.bits.
FIELD_PATH = re.compile(r"^(spec\b|adapters\[\d+\]|quantize\b|trainable\b|spec file )")
TARGETS = ["fc1", "fc2", "fc*", "re:fc[12]", "act", "nothing"]

hostile = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**31, max_value=10**400),
    st.sampled_from([10**400, -10**400, 2**63, float("nan"), float("inf"), -float("inf"), -0.0, 1e308 * 10]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.text(alphabet="é漢🙂\x00\ud7ff", max_size=4),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.lists(st.lists(st.none(), max_size=2), max_size=2), st.frozensets(st.integers(), max_size=2),
    st.tuples(st.text(max_size=2)), st.binary(max_size=4),
)


def plausible(field: dataclasses.Field) -> st.SearchStrategy:
    """Values near the field's default, of its type, so that many drawn specs compile."""
    default = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
    if field.name in ("targets", "target_modules"):
        return st.lists(st.sampled_from(TARGETS), min_size=1, max_size=2)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.one_of(st.just(default), st.integers(min_value=0, max_value=9))
    if isinstance(default, float):
        return st.one_of(st.just(default), st.floats(min_value=0.0, max_value=4.0))
    if isinstance(default, (tuple, list)):
        return st.one_of(st.just(list(default)), st.lists(st.sampled_from(TARGETS), max_size=2))
    if isinstance(default, dict):
        return st.one_of(st.just({}), st.dictionaries(st.sampled_from(TARGETS[:2]), st.integers(1, 4), max_size=1))
    return st.just(default)


@st.composite
def entry_for(draw, method: str) -> dict:
    """One adapters[] entry: each of the method's fields absent, plausible or hostile."""
    entry: dict = {"method": method}
    for field in dataclasses.fields(METHODS[method].config):
        if not field.init:
            continue
        choice = draw(st.sampled_from(["absent", "plausible", "plausible", "hostile"]))
        if choice == "plausible":
            entry[field.name] = draw(plausible(field))
        elif choice == "hostile":
            entry[field.name] = draw(hostile)
    if "targets" in entry or draw(st.booleans()):
        entry.setdefault("targets", draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=2)))
    if draw(st.integers(0, 9)) == 0:
        entry[draw(st.text(max_size=6))] = draw(hostile)  # an unknown key
    return entry


methods = st.sampled_from(sorted(METHODS))
entries = methods.flatmap(entry_for)
bad_methods = st.one_of(hostile, st.text(max_size=6), st.just(["lora"]), st.just({"lora": 1}))


@st.composite
def quantize_section(draw) -> dict | None:
    if draw(st.booleans()):
        return None
    section = {}
    for field in dataclasses.fields(QUANTIZE_CONFIG):
        if field.init and draw(st.booleans()):
            section[field.name] = draw(st.one_of(plausible(field), hostile))
    return section


@st.composite
def spec_dicts(draw) -> dict:
    spec: dict = {"adapters": draw(st.lists(entries, min_size=0, max_size=2))}
    if draw(st.integers(0, 7)) == 0:
        spec["adapters"].append({"method": draw(bad_methods)})
    if draw(st.booleans()):
        spec["trainable"] = draw(st.one_of(st.lists(st.sampled_from(["*.bias", "fc2.weight", "[", "re:("]),
                                                    max_size=2), hostile))
    if draw(st.integers(0, 3)) == 0:
        spec["quantize"] = draw(quantize_section())
    if draw(st.integers(0, 5)) == 0:
        spec["version"] = draw(st.one_of(st.just(1), hostile))
    if draw(st.integers(0, 9)) == 0:
        spec[draw(st.text(max_size=6))] = draw(hostile)
    return spec


def assert_names_the_field(err: peftc.SpecError) -> None:
    assert FIELD_PATH.match(str(err)), f"SpecError does not name its field: {err}"
    assert "\n" not in str(err)[:200] and len(str(err)) < 2000


@settings(max_examples=settings().max_examples * 25)
@given(spec_dicts())
def test_any_spec_dict_parses_or_names_the_field(data):
    try:
        spec = Spec.from_dict(data)
    except peftc.SpecError as err:
        assert_names_the_field(err)
        return
    assert Spec.from_dict(spec.to_dict()) == spec  # what parses round-trips


@given(spec_dicts())
def test_any_spec_compiles_or_names_the_field_and_the_model_never_changes(data):
    model = mixed_modes(MLP())
    model.fc1.register_forward_hook(lambda module, args, out: out)
    model.fc2.weight.requires_grad_(False)
    before = ModelState.of(model)
    try:
        cm = peftc.compile(model, data, example_inputs=(torch.randn(3, 16),))
    except peftc.SpecError as err:
        assert_names_the_field(err)
    else:
        assert cm(torch.randn(2, 16)).shape == (2, 4)
    before.assert_same(model)


def encodings(data: dict) -> st.SearchStrategy:
    text = json.dumps(data, default=repr)
    return st.sampled_from([text.encode("utf-8"), text.encode("utf-16"), text.encode("utf-8")[:-3],
                            yaml.safe_dump(json.loads(text)).encode("utf-8"), b"\xff\xfe\x00garbage",
                            b"[" * 1200, b'{"adapters": [{"method": "lora", "r": ' + b"9" * 5000 + b"}]}",
                            b"!!python/object/apply:os.system ['true']", b"null", b"[]"])


@settings(max_examples=settings().max_examples * 5)
@given(spec_dicts().flatmap(encodings), st.sampled_from([".json", ".yaml", ".yml"]))
def test_any_spec_file_loads_or_raises_spec_error(tmp_path_factory, raw, suffix):
    path = tmp_path_factory.mktemp("spec") / f"spec{suffix}"
    path.write_bytes(raw)
    try:
        spec = Spec.load(path)
    except peftc.SpecError as err:
        assert_names_the_field(err)
        return
    saved = spec.save(path.with_name("again" + suffix))
    assert Spec.load(saved) == spec


@pytest.mark.parametrize("data, field", [
    ({"adapters": [{"method": []}]}, "adapters[0].method"),
    ({"adapters": [{"method": {"lora": 1}}]}, "adapters[0].method"),
    ({"adapters": [{"method": "lora", "targets": ["fc1"], "alpha": 10**400}]}, "adapters[0].alpha"),
    ({"adapters": [{"method": "lora", "targets": ["fc1"], "alpha_pattern": {"fc1": 10**400}}]},
     "adapters[0].alpha_pattern"),
    ({"adapters": [{"method": "adapter", "targets": ["fc1"], "scale": 10**400}]}, "adapters[0].scale"),
    ({"adapters": [{"method": "vera", "targets": ["fc1"], "d_initial": 10**400}]}, "adapters[0].d_initial"),
    ({"adapters": [{"method": "lora", "targets": ["fc1"], "r": 2**31}]}, "adapters[0].r"),
    ({"adapters": [{"method": "lora", "targets": ["fc1"], "rank_pattern": {"fc1": 10**30}}]},
     "adapters[0].rank_pattern"),
    ({"adapters": [{"method": "adapter", "targets": ["fc1"], "bottleneck": 2**21}]}, "adapters[0].bottleneck"),
    ({"adapters": [{"method": "prompt", "num_tokens": 2**21}]}, "adapters[0].num_tokens"),
    ({"version": True, "trainable": ["*.bias"]}, "spec.version"),
    ({"version": 1.0, "trainable": ["*.bias"]}, "spec.version"),
    ({"trainable": ["*.bias"], "quantize": {"bits": 4.0}}, "quantize.bits"),
    ({"trainable": ["*.bias"], "quantize": {"bits": True}}, "quantize.bits"),
])
def test_the_reported_specs_are_spec_errors(data, field):
    with pytest.raises(peftc.SpecError) as err:
        Spec.from_dict(data)
    assert str(err.value).startswith(field), err.value


@pytest.mark.parametrize("raw", ["{}".encode("utf-16"), b'{"adapters": "\xff\xfe"}', "é: 1".encode("latin-1")])
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_spec_files_that_are_not_utf8_are_spec_errors(tmp_path, raw, suffix):
    path = tmp_path / f"spec{suffix}"
    path.write_bytes(raw)
    with pytest.raises(peftc.SpecError, match="not UTF-8 text"):
        Spec.load(path)
