"""The compiled model as a module and a callable: signature, keywords, errors, attributes, copy, pickle, .to()."""

from __future__ import annotations

import copy
import functools
import inspect
import io

import pytest
import torch

import peftc
from families import FAMILIES, randomize_adapters

LORA = {"method": "lora", "r": 4, "alpha": 8}


def compiled(name="llama"):
    family = FAMILIES[name]
    model = family.build()
    cm = peftc.compile(model, {"adapters": [{**LORA, "targets": list(family.targets)}]}).eval()
    randomize_adapters(cm)
    return family, model, cm


@functools.cache
def _uncalled_llama():
    """compiled("llama"), never called: the tests that need a compiled model of their own and never read the
    user's model take a deepcopy (which owns its weights and runs no export) instead of a compile each."""
    return compiled("llama")[2]


def own_llama():
    return FAMILIES["llama"], copy.deepcopy(_uncalled_llama())


@pytest.fixture(scope="module")
def compiled_once():
    """compiled(name), made once per module, for the tests that only read the compiled model."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = compiled(name)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def llama(compiled_once):
    return compiled_once("llama")


def full_inputs(family):
    x = family.inputs(2, 5)
    return {**x, "attention_mask": torch.ones_like(x["input_ids"])}


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit"])
def test_forward_has_the_original_signature(name, compiled_once):
    _, model, cm = compiled_once(name)
    assert inspect.signature(cm.forward) == inspect.signature(model.forward)
    assert list(inspect.signature(cm.forward).parameters)[0] == model.main_input_name


def test_positional_keyword_and_default_arguments_reach_one_graph(llama):
    family, model, cm = llama
    ids = family.inputs(2, 5)["input_ids"]
    with torch.no_grad():
        a = cm(ids).logits
        b = cm(input_ids=ids, attention_mask=None, labels=None).logits
        c = cm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(a, b) and torch.testing.assert_close(a, c)
    assert len(cm.graphs) == 1


def test_keywords_the_original_accepts_return_what_it_returns(llama):
    family, model, cm = llama
    x = full_inputs(family)
    with torch.no_grad():
        ours = cm(**x, output_hidden_states=True)
        theirs = model(**x, output_hidden_states=True, use_cache=False)
        assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
        as_tuple = cm(**x, return_dict=False)
        original_tuple = model(**x, return_dict=False)  # its cache included, as ours
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(original_tuple)
    labels = x["input_ids"]
    with torch.no_grad():
        assert cm(**x, labels=labels).loss.shape == model(**x, labels=labels).loss.shape == ()


def raised_by(call):
    with pytest.raises(Exception) as raised:
        call()
    return raised.value


@pytest.mark.parametrize("name, misspelled", [("llama", "inputs_ids"), ("vit", "pixel_valuez"),
                                              ("bert", "input_idz")])
def test_an_argument_the_original_refuses_fails_as_it_does(name, misspelled, compiled_once):
    # LLaMA's own compiled model (a copy): the shared one's graph count is asserted above, and a refused call may capture
    family, cm = own_llama() if name == "llama" else (FAMILIES[name], compiled_once(name)[2])
    value = next(iter(family.inputs(2, 5).values()))
    ours = raised_by(lambda: cm(**{misspelled: value}))
    assert not isinstance(ours, peftc.CaptureError)  # the model's own error, not an export one
    theirs = raised_by(lambda: FAMILIES[name].build()(**{misspelled: value}))
    assert type(ours) is type(theirs) and str(ours) == str(theirs)


def test_an_argument_outside_a_closed_signature_is_a_type_error():
    model = FAMILIES["mlp"].build()
    cm = peftc.compile(model, {"adapters": [{**LORA, "targets": ["fc1"]}]}, example_inputs=(torch.randn(3, 16),))
    with pytest.raises(TypeError, match="unexpected keyword argument 'y'"):
        cm(torch.randn(2, 16), y=1)
    with pytest.raises(TypeError, match="too many positional arguments"):
        cm(torch.randn(2, 16), torch.randn(2, 16))


def test_the_originals_attributes_are_there(llama):
    _, model, cm = llama
    assert cm.config.to_dict() == model.config.to_dict()
    assert cm.generation_config.to_dict() == model.generation_config.to_dict()
    assert cm.get_input_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert cm.device == torch.device("cpu") and cm.dtype == torch.float32
    assert cm.main_input_name == "input_ids" and cm.loss_type == model.loss_type
    assert cm.can_generate()
    with pytest.raises(AttributeError):
        cm.no_such_attribute
    with pytest.raises(AttributeError):
        cm._private_of_the_model  # private names are never forwarded


def test_deepcopy_is_independent_for_every_signature():
    family, cm = own_llama()
    x = full_inputs(family)
    with torch.no_grad():
        before = cm(**x).logits
    twin = copy.deepcopy(cm)
    with torch.no_grad():
        for tensor in twin.adapter_state_dict().values():
            tensor.zero_()
        twin(**x, output_hidden_states=True)  # a new signature on the copy trains the copy's adapters
        torch.testing.assert_close(cm(**x).logits, before)
        assert not torch.allclose(twin(**x).logits, before)
    loss = twin(**x, labels=x["input_ids"]).loss
    loss.backward()
    assert all(p.grad is None for p in cm.parameters())


def test_torch_save_round_trips():
    family, cm = own_llama()
    x = full_inputs(family)
    buffer = io.BytesIO()
    torch.save(cm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, cm(**x).logits)
    assert inspect.signature(loaded.forward) == inspect.signature(cm.forward)


@pytest.mark.parametrize("convert, dtype", [(lambda m: m.to(torch.float64), torch.float64),
                                            (lambda m: m.double(), torch.float64),
                                            (lambda m: m.to(torch.bfloat16), torch.bfloat16),
                                            (lambda m: m.half(), torch.float16)])
def test_dtype_changes_behave_as_on_the_original(convert, dtype):
    family, model, cm = compiled("llama")
    x = full_inputs(family)
    with torch.no_grad():
        before = cm(**x, output_hidden_states=True).logits  # a second graph, captured before the cast
    convert(cm)
    assert cm.dtype == dtype and model.dtype == torch.float32  # compiling (and casting) never changes the user's model
    if dtype == torch.float16:
        return  # CPU half matmuls are not what this checks; the cast itself is
    with torch.no_grad():
        out = cm(**x, output_hidden_states=True).logits
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), before.double(), atol=5e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=5e-2 if dtype == torch.bfloat16 else 1e-5)


def test_to_meta_moves_every_graph_like_the_original():
    family, model, cm = compiled("llama")
    cm.to("meta")
    assert cm.device.type == "meta" and model.device.type == "cpu"
    assert all(p.device.type == "meta" for p in cm.parameters())


def test_trainer_state_dict_is_the_adapter(llama):
    _, _, cm = llama
    state = cm.state_dict()
    assert set(state) == set(cm.adapter_state_dict())
    result = cm.load_state_dict({k: v * 0 for k, v in state.items()}, strict=True)
    assert not result.missing_keys and all((v == 0).all() for v in cm.adapter_state_dict().values())
    with pytest.raises(RuntimeError, match="adapter"):
        cm.load_state_dict({"model.embed_tokens.weight": torch.zeros(1)})
