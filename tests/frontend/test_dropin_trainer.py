"""transformers.Trainer on a compiled model: the same losses as on PEFT's, adapter-only checkpoints, resume."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import peftc
from families import FAMILIES, randomize_adapters
from peft_reference import peft_lora

R, ALPHA = 4, 8


def causal_rows(n=12, seq=10):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 128, (seq,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 4] = -100  # uneven label counts: Trainer's num_items_in_batch matters
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                     "text": "not a model input"})  # a column Trainer must drop by the forward's signature
    return rows


def class_rows(n=12, seq=8):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (seq,), generator=g), "labels": torch.tensor(i % 3)}
            for i in range(n)]


@functools.cache
def _compiled(name):
    """One compile per family for the whole file (a compile is seconds of torch.export; a deepcopy runs none):
    the base model and its compiled model, adapters randomized, never called or trained."""
    family = FAMILIES[name]
    model = family.build()
    cm = peftc.compile(copy.deepcopy(model), {"adapters": [{"method": "lora", "targets": list(family.targets),
                                                            "r": R, "alpha": ALPHA}]})
    randomize_adapters(cm)
    return model, cm


def pair(name):
    """A compiled model of its own (a deepcopy of the file's one compile, tested independent in
    test_dropin_module.py and test_capture_reuse.py) and PEFT's model with the same adapter weights."""
    model, compiled = _compiled(name)
    cm = copy.deepcopy(compiled)
    return cm, peft_lora(model, cm, FAMILIES[name].targets, R, ALPHA)


def train(model, rows, out, resume=None, **options):
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=1e-3, save_steps=2, report_to=[], use_cpu=True, **options)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train(resume_from_checkpoint=resume)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name, rows", [("llama", causal_rows), ("qwen2", causal_rows), ("bert", class_rows)])
def test_losses_equal_peft_under_the_same_trainer(name, rows, tmp_path):
    cm, reference = pair(name)
    ours = train(cm, rows(), tmp_path / "peftc")
    theirs = train(reference, rows(), tmp_path / "peft")
    assert len(ours) == 4
    assert ours == pytest.approx(theirs, abs=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_default_training_arguments_train_as_peft(name, tmp_path):
    """TrainingArguments' defaults (3 epochs, batch 8, linear schedule, lr 5e-5): the mean training loss."""
    cm, reference = pair(name)
    losses = []
    for model, out in ((cm, tmp_path / "peftc"), (reference, tmp_path / "peft")):
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(out), report_to=[]),
                          train_dataset=causal_rows())
        losses.append(trainer.train().training_loss)
        assert trainer.state.global_step == 6
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.parametrize("name, rows", [("llama", causal_rows), ("bert", class_rows)])
def test_evaluate_and_predict_report_peft_losses(name, rows, tmp_path):
    """Trainer finds label names in `type(model).forward` (find_labels): without them no eval loss."""
    cm, reference = pair(name)
    results = []
    for model, out in ((cm, tmp_path / "peftc"), (reference, tmp_path / "peft")):
        args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, per_device_eval_batch_size=4)
        trainer = Trainer(model=model, args=args, eval_dataset=rows())
        assert trainer.label_names == ["labels"]
        prediction = trainer.predict(rows()[:4])
        results.append((trainer.evaluate()["eval_loss"], prediction.metrics["test_loss"], prediction.label_ids))
    (ours, ours_test, labels), (theirs, theirs_test, ref_labels) = results
    assert ours == pytest.approx(theirs, abs=1e-5) and ours_test == pytest.approx(theirs_test, abs=1e-5)
    assert (labels == ref_labels).all()


def tensor_bytes(path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(path).values())


def test_checkpoints_hold_as_many_tensor_bytes_as_peft_checkpoints(tmp_path):
    cm, reference = pair("llama")
    train(cm, causal_rows(), tmp_path / "peftc")
    train(reference, causal_rows(), tmp_path / "peft")
    ours, theirs = tmp_path / "peftc" / "checkpoint-2", tmp_path / "peft" / "checkpoint-2"
    # PEFT's: adapter_model.safetensors + adapter_config.json + README.md; ours: model.safetensors
    assert tensor_bytes(ours / "model.safetensors") == tensor_bytes(theirs / "adapter_model.safetensors") > 0
    same = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
    assert {p.name for p in ours.iterdir()} == same | {"model.safetensors"}
    assert same <= {p.name for p in theirs.iterdir()}


def test_load_adapter_reads_what_trainer_save_model_wrote(tmp_path):
    cm, _ = pair("llama")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             learning_rate=1e-2, save_strategy="no")
    trainer = Trainer(model=cm, args=args, train_dataset=causal_rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))  # a state_dict file: Trainer saves any non-PreTrainedModel so
    fresh, _ = pair("llama")
    fresh.load_adapter(tmp_path / "final")
    for key, value in cm.adapter_state_dict().items():
        torch.testing.assert_close(fresh.adapter_state_dict()[key], value)
    with pytest.raises(peftc.CheckpointError, match="no adapter.safetensors.*save_adapter"):
        fresh.load_adapter(tmp_path)  # a folder with neither file
    trainer_folder_converts_to_what_peft_reads(cm, tmp_path / "final")


def trainer_folder_converts_to_what_peft_reads(cm, folder):
    """Trainer calls save_pretrained only on a PreTrainedModel or PeftModel, so its folder holds model.safetensors
    alone, which PeftModel.from_pretrained cannot read; peftc says what it is and how to load and convert it."""
    from peft import PeftModel

    from peftc.interop.from_peft import load_adapter_dir

    base = FAMILIES["llama"].build()
    with pytest.raises(ValueError):  # PEFT's own error: no adapter_config.json
        PeftModel.from_pretrained(copy.deepcopy(base), folder)
    message = r"model\.safetensors alone, what transformers' Trainer\.save_model writes.*load_adapter.*--spec SPEC"
    with pytest.raises(peftc.CheckpointError, match=message):
        peftc.from_peft(copy.deepcopy(base), folder)
    with pytest.raises(peftc.CheckpointError, match=message):
        load_adapter_dir(copy.deepcopy(base), folder)  # the CLI's --adapter without --spec
    converted = load_adapter_dir(copy.deepcopy(base), folder, spec=cm.spec)  # ... and with it
    converted.save_pretrained(folder.with_name("peft"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.with_name("peft").iterdir()}
    reference = PeftModel.from_pretrained(copy.deepcopy(base), folder.with_name("peft")).eval()
    ids = FAMILIES["llama"].inputs(2, 6)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, cm.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_checkpoints_hold_the_adapter_and_resume_continues_exactly(tmp_path):
    cm, _ = pair("llama")
    fresh = copy.deepcopy(cm.adapter_state_dict())
    straight = train(cm, causal_rows(), tmp_path / "straight")
    saved = load_file(tmp_path / "straight" / "checkpoint-2" / "model.safetensors")
    assert set(saved) == set(cm.adapter_state_dict())  # the adapter only, no base tensor
    final = {k: v.clone() for k, v in cm.adapter_state_dict().items()}

    again, _ = pair("llama")
    again.load_state_dict(fresh)
    resumed = train(again, causal_rows(), tmp_path / "straight", resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert resumed[-2:] == pytest.approx(straight[2:], abs=1e-6)  # steps 3 and 4, logged after the resume
    for key, value in again.adapter_state_dict().items():
        torch.testing.assert_close(value, final[key])


def test_gradient_checkpointing_argument_trains_the_same(tmp_path):
    cm, _ = pair("llama")
    checkpointed, _ = pair("llama")
    plain = train(cm, causal_rows(), tmp_path / "plain")
    recomputed = train(checkpointed, causal_rows(), tmp_path / "ckpt", gradient_checkpointing=True)
    assert checkpointed.is_gradient_checkpointing
    assert recomputed == pytest.approx(plain, abs=1e-5)
