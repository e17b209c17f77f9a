"""alias_attribute_owners: parameter reads one lookup deep, the same outputs, the module tree untouched."""

from __future__ import annotations

import torch
from families import FAMILIES, randomize_adapters
from torch import nn

import peftc
from peftc.ir.attribute_owners import alias_attribute_owners


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))
        self.register_buffer("offset", torch.arange(3.0))

    def forward(self, x):
        return self.block(x) + self.offset


def exported() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return torch.export.export(Nested(), (torch.randn(2, 4),)).module()


def test_outputs_state_and_tree_are_unchanged_and_reads_are_one_lookup_deep():
    gm, x = exported(), torch.randn(2, 4)
    expected, state = gm(x), {k: v.clone() for k, v in gm.state_dict().items()}
    modules = [name for name, _ in gm.named_modules()]
    alias_attribute_owners(gm)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    assert [name for name, _ in gm.named_modules()] == modules
    assert gm.state_dict().keys() == state.keys()
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert sorted(targets) == ["_owner_0.bias", "_owner_0.weight", "_owner_1.bias", "_owner_1.weight", "offset"]


def test_a_parameter_replaced_on_its_module_is_the_one_read():
    gm, x = exported(), torch.randn(2, 4)
    alias_attribute_owners(gm)
    last = gm.get_submodule("block.2.0")
    last.weight = nn.Parameter(torch.zeros_like(last.weight))
    last.bias = nn.Parameter(torch.zeros_like(last.bias))
    torch.testing.assert_close(gm(x), gm.offset.expand(2, 3), rtol=0, atol=0)


def test_generation_graphs_read_parameters_through_aliases_and_generate_what_peft_does(tmp_path):
    from peft import PeftModel

    family = FAMILIES["llama"]
    cm = peftc.compile(family.build(), {"adapters": [{"method": "lora", "targets": list(family.targets), "r": 4}]})
    randomize_adapters(cm)
    cm.save_adapter(tmp_path, format="peft")
    reference = PeftModel.from_pretrained(family.build(), tmp_path).eval()
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    options = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False}
    assert torch.equal(cm.generate(ids, **options), reference.generate(input_ids=ids, pad_token_id=0, **options))
    (graphs,) = cm._generator.graphs.values()
    targets = [n.target for n in graphs.decode.graph.nodes if n.op == "get_attr"]
    assert targets and all(t.count(".") <= 1 for t in targets)  # root constants: no dot
