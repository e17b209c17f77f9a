"""The compiled model's module tree is the one owner of the base weights (peftc.runtime.module_tree.share_parameters):
the source later call signatures are captured from reads its parameters from the tree, so a parameter the tree
swaps (as FSDP2's fully_shard does) is what every later capture sees, and nothing else keeps the old one alive."""

from __future__ import annotations

import copy
import gc

import torch

import peftc
from families import FAMILIES, randomize_adapters
from peftc.inspect.reachable import reachable_storage_bytes

PATH = "model.layers.0.self_attn.q_proj"
LORA = {"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}


def compiled(spec=None):
    model = FAMILIES["llama"].build()
    cm = peftc.compile(model, spec or {"adapters": [LORA]}).eval()
    randomize_adapters(cm)
    return model, cm


def ids(batch=2, seq=6):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(3))


def test_the_source_reads_the_trees_parameters_and_the_users_model_keeps_its_own():
    model, cm = compiled()
    tree, source, user = cm.get_submodule(PATH), cm.compilation.source.get_submodule(PATH), model.get_submodule(PATH)
    assert source._parameters is tree._parameters
    assert user._parameters is not tree._parameters and type(user.weight) is torch.nn.Parameter
    assert user.weight.data_ptr() == tree.weight.data_ptr()  # the user's memory, not a copy
    assert user.bias is None and source.bias is None and "bias" not in dict(tree.named_parameters())


def test_a_parameter_swapped_in_the_tree_is_what_a_later_capture_reads():
    """What FSDP2 does to a module's parameter dict: the next captured signature computes with the new tensor."""
    _, cm = compiled()
    tree = cm.get_submodule(PATH)
    replacement = torch.nn.Parameter(torch.randn_like(tree.weight), requires_grad=False)
    tree._parameters["weight"] = replacement
    assert cm.compilation.source.get_parameter(PATH + ".weight") is replacement
    x = ids()
    expected = cm.merge_and_unload()(input_ids=x).logits  # built now, from the source: it folds the new weight
    got = cm(input_ids=x, attention_mask=torch.ones_like(x)).logits  # a signature first met now: captured
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert cm.merge_and_unload().get_parameter(PATH + ".weight").shape == replacement.shape


def test_a_deep_copy_reads_its_own_tree():
    _, cm = compiled()
    twin = copy.deepcopy(cm)
    assert twin.compilation.source.get_submodule(PATH)._parameters is twin.get_submodule(PATH)._parameters
    assert twin.get_submodule(PATH).weight is not cm.get_submodule(PATH).weight
    x = ids()
    torch.testing.assert_close(twin(input_ids=x).logits, cm(input_ids=x).logits, rtol=0, atol=0)


def test_a_quantized_base_keeps_no_full_precision_weight_once_the_user_drops_the_model():
    """Only the packed weights and the unquantized parameters stay (derived graphs' guards hold no model)."""
    model, cm = compiled({"adapters": [{**LORA, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}],
                          "quantize": {"bits": 8}})
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    gc.collect()
    cm(input_ids=ids(), labels=ids())  # a derived graph (the superset's), with its input guards
    parameters = sum(p.numel() * p.element_size() for p in cm.parameters())
    packed = sum(b.numel() * b.element_size() for name, b in cm.named_buffers() if name.startswith("quantized."))
    assert packed > 0 and parameters < whole
    assert reachable_storage_bytes(cm) <= parameters + packed + 4 * 1024
