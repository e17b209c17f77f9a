"""TRL's SFTTrainer on a compiled causal LM: the same losses as on PEFT's model under the same trainer.

SFTTrainer patches the model's forward with a fused LM head that calls `model.base_model(...)` for
the hidden states; on a compiled model that call runs through a compiled graph with the adapters
(peftc.runtime.model_methods). SFTConfig's defaults are kept: gradient checkpointing on and bf16
autocast, even on CPU. The losses agree exactly; they once differed by ~2e-4 under bf16 because the
fused LoRA shrink rounded its input gradient to bfloat16 once over all ranks, where PEFT rounds once
per adapter and sums in float32 (peftc.ir.packed_shrink now does as PEFT does under autocast).
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftc
from families import FAMILIES, randomize_adapters
from peft_reference import peft_lora

trl = pytest.importorskip("trl")  # in the test extras (pyproject.toml)
datasets = pytest.importorskip("datasets")


def word_tokenizer():
    """A 128-token word-level tokenizer built here (nothing downloaded): SFTTrainer requires one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 127)}, "</s>": 127}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>")


def rows():
    g = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_list([{"input_ids": torch.randint(1, 127, (6 + i % 5,), generator=g).tolist()}
                                       for i in range(12)])


def sft_losses(model, out) -> list[float]:
    args = trl.SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                         learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no")
    assert args.bf16 and args.gradient_checkpointing  # SFTConfig's defaults
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows(), processing_class=word_tokenizer())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_losses_equal_peft(tmp_path):
    family = FAMILIES["llama"]
    model = family.build()
    cm = peftc.compile(copy.deepcopy(model), {"adapters": [{"method": "lora", "targets": list(family.targets),
                                                            "r": 4, "alpha": 8}]})
    randomize_adapters(cm)
    reference = peft_lora(model, cm, family.targets, 4, 8)
    before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    ours = sft_losses(cm, tmp_path / "peftc")
    theirs = sft_losses(reference, tmp_path / "peft")
    assert len(ours) == 3
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert any(not torch.equal(before[k], v) for k, v in cm.adapter_state_dict().items())  # the adapters trained


def test_base_model_call_runs_the_adapters():
    family = FAMILIES["llama"]
    model = family.build()
    cm = peftc.compile(copy.deepcopy(model), {"adapters": [{"method": "lora", "targets": list(family.targets),
                                                            "r": 4, "alpha": 8}]}).eval()
    randomize_adapters(cm)
    reference = peft_lora(model, cm, family.targets, 4, 8).eval()
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = cm.base_model(input_ids=ids, use_cache=False).last_hidden_state
        theirs = reference.get_base_model().base_model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert cm.base_model.layers is cm.compilation.source.base_model.layers  # other attributes: the model's own
