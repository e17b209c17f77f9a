"""Target names as PEFT matches them: a spec PEFT accepts selects exactly PEFT's modules in peftc."""

from __future__ import annotations

import re

import pytest
from export_counter import counted_exports
from families import FAMILIES

import peftc
from peftc import SpecError
from peftc.core.targets import matches

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

# Per family: target_modules lists using dotted names (suffixes of module paths), as PEFT users write them.
DOTTED = {
    "llama": [["self_attn.q_proj", "mlp.down_proj"], ["layers.1.self_attn.v_proj", "o_proj"]],
    "gpt2": [["attn.c_attn", "mlp.c_proj"], ["h.0.attn.c_proj"]],
    "bert": [["attention.self.query", "output.dense"], ["layer.1.attention.output.dense"]],
    "vit": [["attention.q_proj", "mlp.fc2"], ["layers.0.attention.v_proj", "layers.1.mlp.fc1"]],
    "mlp": [["fc1"]],
}
CASES = [(family, i) for family, lists in DOTTED.items() for i in range(len(lists))]


def peft_modules(family, targets) -> set[str]:
    model = get_peft_model(family.build(), LoraConfig(r=2, target_modules=targets))
    prefix = "base_model.model."
    return {name[len(prefix):] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def peftc_modules(cm) -> set[str]:
    return {path for record in cm.records if record.method == "lora" for path in record.sites}


def _compile(family, spec_or_config, via_peft: bool):
    kwargs = {} if family.hf else {"example_inputs": family.example_inputs()}
    if via_peft:
        return peftc.from_peft(family.build(), spec_or_config, **kwargs)
    return peftc.compile(family.build(), spec_or_config, **kwargs)


@pytest.mark.parametrize("name, case", CASES)
def test_dotted_names_select_peft_modules(name, case):
    family = FAMILIES[name]
    targets = DOTTED[name][case]
    expected = peft_modules(family, targets)
    assert expected
    native = _compile(family, {"adapters": [{"method": "lora", "targets": targets, "r": 2}]}, via_peft=False)
    assert peftc_modules(native) == expected
    config = LoraConfig(r=2, target_modules=targets)
    assert peftc_modules(_compile(family, config, via_peft=True)) == expected


def test_suffix_is_on_whole_components():
    assert matches("to_out.0", "down.attn1.to_out.0")
    assert matches("to_out.0", "to_out.0")
    assert not matches("to_out.0", "down.attn1.xto_out.0")
    assert not matches("to_out.0", "down.attn1.to_out.0.dropout")
    assert not matches("proj", "model.q_proj")
    # globs and regexes are unchanged: whole-path matches
    assert matches("*.to_out.0", "a.to_out.0") and not matches("to_out.*", "a.to_out.0")
    assert matches("re:.*attn1\\.to_out\\.0", "down.attn1.to_out.0")
    assert not matches("re:to_out\\.0", "down.attn1.to_out.0")


def test_a_dotted_name_that_matches_nothing_names_the_nearest_path():
    family = FAMILIES["llama"]
    with pytest.raises(SpecError, match=r"adapters\[0\]\.targets\[0\]: 'attn.q_proj' matches no module path"):
        _compile(family, {"adapters": [{"method": "lora", "targets": ["attn.q_proj"]}]}, via_peft=False)


@pytest.mark.parametrize("spec, message, nearest", [
    ({"adapters": [{"method": "lora", "targets": ["q_prj"]}]},
     "adapters[0].targets[0]: 'q_prj' matches no module path; nearest: ", "'model.layers.0.self_attn.q_proj'"),
    ({"adapters": [{"method": "lora", "targets": ["q_proj"]}, {"method": "ia3", "targets": ["*.dwon_proj"]}]},
     "adapters[1].targets[0]: '*.dwon_proj' matches no module path; nearest: ", "'model.layers.0.mlp.down_proj'"),
    ({"adapters": [{"method": "lora", "target_parameters": ["up_proj.wieght"]}]},
     "adapters[0].target_parameters[0]: 'up_proj.wieght' matches no parameter a site reads; nearest: ",
     "'model.layers.0.mlp.up_proj.weight'"),
    ({"adapters": [{"method": "ln_tuning", "targets": ["input_layrnorm"]}]},
     "adapters[0].targets[0]: 'input_layrnorm' matches no module path; nearest: ", "'model.layers.0.input_layernorm'"),
    ({"adapters": [{"method": "lora", "targets": ["q_proj"]}], "quantize": {"bits": 8, "targets": ["o_prj"]}},
     "quantize.targets[0]: 'o_prj' matches no module path; nearest: ", "'model.layers.0.self_attn.o_proj'"),
    ({"adapters": [{"method": "lora", "targets": ["q_proj"]}], "trainable": ["*.bais"]},
     "trainable[0]: '*.bais' matches no parameter name; nearest: ", "'model.layers.0.self_attn.q_proj.weight'"),
])
def test_a_target_naming_nothing_in_the_model_fails_before_the_capture(spec, message, nearest):
    """The model's module and parameter names are all a site's path can be made of: a pattern matching none
    of them is refused before torch.export runs, with the error (and nearest real paths) the passes give."""
    with counted_exports() as exports, pytest.raises(SpecError) as err:
        peftc.compile(FAMILIES["llama"].build(), spec)
    assert message in str(err.value)
    assert nearest in str(err.value).split("nearest: ")[1]
    assert exports == []


def test_a_target_naming_modules_without_sites_is_refused_on_the_graph():
    """An activation module exists in the model but runs no site op: only the captured graph tells, and it does."""
    with counted_exports() as exports, pytest.raises(SpecError, match=r"'re:.*act' matches no module path"):
        peftc.compile(FAMILIES["mlp"].build(), {"adapters": [{"method": "lora", "targets": ["re:.*act"]}]},
                      example_inputs=FAMILIES["mlp"].example_inputs())
    assert len(exports) == 1


def test_dotted_rank_pattern_keys_round_trip_literally():
    spec = peftc.Spec.from_dict({"adapters": [{"method": "lora", "targets": ["q_proj"], "r": 4,
                                               "rank_pattern": {"layers.0.self_attn.q_proj": 2}}]})
    key = next(iter(spec.to_peft_config()["rank_pattern"]))
    # PEFT's rule: re.match(rf"(.*\.)?({key})$", name); the dots stay literal
    assert re.match(rf"(.*\.)?({key})$", "model.layers.0.self_attn.q_proj")
    assert not re.match(rf"(.*\.)?({key})$", "model.layers.0xself_attn.q_proj")
