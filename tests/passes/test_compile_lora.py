"""compile + LoRA end to end on every model family: parity with `peft`, merge, training, mode."""

import pytest
import torch
from families import FAMILIES, call, compile_family, logits, randomize_adapters
from peft_reference import peft_lora, trainable_count

import peftc

R, ALPHA = 4, 8
ALL = list(FAMILIES)


def lora_spec(family, **extra):
    return {"adapters": [{"method": "lora", "targets": list(family.targets), "r": R, "alpha": ALPHA, **extra}]}


@pytest.fixture(scope="module", params=ALL)
def compiled(request):
    family = FAMILIES[request.param]
    model, cm = compile_family(family, lora_spec(family))
    randomize_adapters(cm)
    return family, model, cm


def test_outputs_equal_peft_in_eval_and_train(compiled):
    family, model, cm = compiled
    reference = peft_lora(model, cm, family.targets, R, ALPHA)
    assert trainable_count(cm) == trainable_count(reference)
    inputs = family.inputs(3, 5)
    cm.eval(), reference.eval()
    with torch.no_grad():
        ours, theirs = logits(call(cm, family, inputs)), logits(call(reference, family, inputs))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # Train mode: the same random stream drives dropout in the base model on both sides.
    cm.train(), reference.train()
    torch.manual_seed(123)
    ours = logits(call(cm, family, inputs))
    torch.manual_seed(123)
    theirs = logits(call(reference, family, inputs))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    cm.eval()


def test_merged_matches_and_has_no_adapter_nodes(compiled):
    family, _, cm = compiled
    merged = cm.merged()
    inputs = family.inputs(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(logits(call(merged, family, inputs)), logits(call(cm, family, inputs)),
                                   rtol=0, atol=1e-5)
    gm = merged.graph_module
    assert not any("peftc" in n.meta for n in gm.graph.nodes)
    assert not hasattr(gm, "peftc")
    assert sum(p.numel() for p in merged.parameters()) < sum(p.numel() for p in cm.parameters())


def test_other_batch_and_sequence_sizes(compiled):
    family, _, cm = compiled
    for batch, seq in [(1, 3), (4, 11)]:
        out = logits(call(cm, family, family.inputs(batch, seq)))
        assert out.shape[0] == batch


def test_base_weights_are_shared_not_copied(compiled):
    family, model, cm = compiled
    for name, param in model.named_parameters():
        own = cm.graph_module.get_parameter(name)  # its own Parameter over the user's memory
        assert own is not param and own.data_ptr() == param.data_ptr() and not own.requires_grad
        assert param.requires_grad  # the user's flag: compile froze its own view, not the user's tensor


def test_save_load_reproduces_outputs_exactly(compiled, tmp_path):
    family, model, cm = compiled
    cm.save_adapter(tmp_path / "adapter")
    other = peftc.compile(model, cm.spec, **({} if family.hf else {"example_inputs": family.example_inputs()}))
    inputs = family.inputs(2, 4)
    with torch.no_grad():
        before = logits(call(other, family, inputs))
        other.load_adapter(tmp_path / "adapter")
        after, expected = logits(call(other, family, inputs)), logits(call(cm, family, inputs))
    assert not torch.equal(before, expected)  # fresh adapters start at B = 0, so loading matters
    assert torch.equal(after, expected)


def test_report_lists_every_site(compiled):
    family, _, cm = compiled
    report = cm.report()
    record = next(r for r in cm.records if r.name == "insert_lora")
    assert len(report.sites) == len(set(record.sites)) > 0
    assert report.totals["trainable_params"] == trainable_count(cm)
    assert sum(s["adapter_params"] for s in report.sites) == sum(record.params_added.values())
    assert "insert_lora" in str(report)


def test_training_reduces_loss_and_changes_only_adapters():
    family = FAMILIES["llama"]
    model, cm = compile_family(family, lora_spec(family))
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapters_before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    opt = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    ids = family.inputs(4, 12)["input_ids"]
    cm.train()
    losses = []
    for _ in range(6):
        loss = cm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for name, p in model.named_parameters():
        assert torch.equal(p, base[name]), name
        assert p.grad is None, name
    after = cm.adapter_state_dict()
    assert all(not torch.equal(after[k], adapters_before[k]) for k in after if k.endswith(".B"))


def test_adapter_dropout_follows_train_and_eval():
    family = FAMILIES["mlp"]
    _, cm = compile_family(family, lora_spec(family, dropout=0.5))
    randomize_adapters(cm)
    x = torch.randn(8, 16)
    cm.train()
    assert not torch.equal(cm(x), cm(x))
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    torch.testing.assert_close(cm(x), cm.merged()(x), rtol=0, atol=1e-5)


def test_model_output_structure_and_loss_are_kept():
    family = FAMILIES["llama"]
    model, cm = compile_family(family, lora_spec(family))
    ids = family.inputs(2, 5)["input_ids"]
    out, ref = cm(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids, use_cache=False)
    assert type(out) is type(ref)
    torch.testing.assert_close(out.loss, ref.loss)  # B starts at zero: same function as the base


def test_layer_called_twice_shares_one_adapter_and_merges():
    from torch import nn

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    model = Twice().eval()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["fc"], "r": 2}]},
                       example_inputs=(torch.randn(3, 8),))
    randomize_adapters(cm)
    assert set(cm.adapter_state_dict()) == {"fc.lora.A", "fc.lora.B"}
    x = torch.randn(5, 8)
    torch.testing.assert_close(cm.merged()(x), cm(x), rtol=0, atol=1e-5)
