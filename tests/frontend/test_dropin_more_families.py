"""The drop-in workflow on families beyond the shared table (families.MORE_FAMILIES), against real PEFT.

A user swaps `get_peft_model` for `peftc.compile` in a script that, per family here: compares logits
with `PeftModel.from_pretrained` on `cm.save_adapter(dir, format="peft")`, generates greedily from a
padded batch, merges and round-trips `save_pretrained`, and trains a few steps under transformers'
Trainer with default TrainingArguments. What each family adds: Qwen3's q/k norms, Gemma 2/3's
soft-capping, sliding and global layers, tied and scaled embeddings, Phi-3's fused qkv_proj and
gate_up_proj, Mistral's sliding window (4, shorter than the sequences), OPT's mask-derived positions,
GPT-NeoX's fused interleaved query_key_value, T5 and BART as encoder-decoders. One compile per family
(module-scoped); LoRA on every linear layer of the blocks. Beside the workflow, what these families
broke once: a cached forward on sliding-window models and OPT, Seq2SeqTrainer's predict_with_generate,
targets "all-linear", an encoder-decoder's prompt tuning saved for PEFT (prefix tuning on a sliding window:
test_prefix_sliding_window.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

import peftc
from families import MORE_FAMILIES, randomize_adapters

R, ALPHA = 4, 8
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module", params=list(MORE_FAMILIES))
def pair(request, tmp_path_factory):
    """(family, user's model, compiled model, PEFT's model loaded from the compiled model's PEFT folder)."""
    from peft import PeftModel

    family = MORE_FAMILIES[request.param]
    model = family.build()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": list(family.all_linear), "r": R,
                                             "alpha": ALPHA}]}).eval()
    randomize_adapters(cm)
    folder = tmp_path_factory.mktemp(family.name)
    cm.save_adapter(folder, format="peft")
    reference = PeftModel.from_pretrained(copy.deepcopy(model), folder, is_trainable=True).eval()
    return family, model, cm, reference


def encoder_decoder(model) -> bool:
    return bool(model.config.is_encoder_decoder)


def forward_inputs(family) -> dict:
    inputs = family.inputs(2, 7)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def test_logits_equal_peft_from_the_saved_folder(pair):
    family, model, cm, reference = pair
    inputs = forward_inputs(family)
    with torch.no_grad():
        ours = cm(**inputs).logits
        torch.testing.assert_close(ours, reference(**inputs).logits, **TOL)
        assert not torch.allclose(ours, model(**inputs).logits, atol=1e-3)  # the adapters do something


def padded_prompts(model):
    """Two prompts, the second 3 tokens shorter: padded on the left for a decoder-only model (as transformers
    expects), on the right for an encoder-decoder's encoder."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id or 0
    padding = slice(-3, None) if encoder_decoder(model) else slice(0, 3)
    ids[1, padding], mask[1, padding] = pad, 0
    return ids, mask


def test_greedy_generate_from_a_padded_batch_equals_peft(pair):
    _, model, cm, reference = pair
    ids, mask = padded_prompts(model)
    ours = cm.generate(ids, attention_mask=mask, max_new_tokens=8)
    with torch.no_grad():
        theirs = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_merge_and_unload_then_save_pretrained_keeps_the_logits(pair, tmp_path):
    family, model, cm, _ = pair
    inputs = forward_inputs(family)
    plain = cm.merge_and_unload()
    assert type(plain) is type(model) and plain is not model
    with torch.no_grad():
        expected = cm(**inputs).logits
        torch.testing.assert_close(plain.eval()(**inputs).logits, expected, **TOL)
        plain.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, **TOL)


# Sliding window 4, shorter than the prompt, so a cache or mask that ignored it would give other logits; OPT
# slices its mask-derived positions at [:, past:], sizes export cannot relate (guards a prompt or one new token broke).
CACHED = ["gemma2", "gemma3", "mistral", "opt"]


@pytest.mark.parametrize("pair", CACHED, indirect=True)
def test_a_cached_forward_continues_as_peft(pair):
    """cm(ids, use_cache=True), then one and two more tokens on its cache: PEFT's logits at every call."""
    family, model, cm, reference = pair
    inputs = forward_inputs(family)
    step = {"input_ids": torch.tensor([[5], [9]]), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with torch.no_grad():
        ours, theirs = cm(**inputs, use_cache=True), reference(**inputs, use_cache=True)
        torch.testing.assert_close(ours.logits, theirs.logits, **TOL)
        ours = cm(**step, past_key_values=ours.past_key_values, use_cache=True)
        theirs = reference(**step, past_key_values=theirs.past_key_values, use_cache=True)
        torch.testing.assert_close(ours.logits, theirs.logits, **TOL)
        two = {"input_ids": torch.tensor([[7, 8], [3, 4]]), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
        ours = cm(**two, past_key_values=ours.past_key_values, use_cache=True)
        theirs = reference(**two, past_key_values=theirs.past_key_values, use_cache=True)
        torch.testing.assert_close(ours.logits, theirs.logits, **TOL)
        again = cm(**inputs, use_cache=True)  # a second prompt: the graph the first one found
        torch.testing.assert_close(again.logits, reference(**inputs, use_cache=True).logits, **TOL)
        # a cache the caller made empty (sliding layers where the model slides), filled by the prompt, continued
        from transformers import DynamicCache

        ours, theirs = DynamicCache(config=model.config), DynamicCache(config=model.config)
        cm(**inputs, past_key_values=ours, use_cache=True), reference(**inputs, past_key_values=theirs, use_cache=True)
        torch.testing.assert_close(cm(**step, past_key_values=ours, use_cache=True).logits,
                                   reference(**step, past_key_values=theirs, use_cache=True).logits, **TOL)



@pytest.mark.parametrize("pair", ["t5"], indirect=True)
def test_seq2seq_trainer_predicts_with_generate_as_peft(pair, tmp_path):
    """Seq2SeqTrainer(predict_with_generate=True) calls generate with labels and synced_gpus beside the inputs."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    _, model, cm, reference = pair
    predictions = []
    for module, out in ((cm, tmp_path / "peftc"), (reference, tmp_path / "peft")):
        args = Seq2SeqTrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, predict_with_generate=True,
                                        per_device_eval_batch_size=4, generation_max_length=8)
        predictions.append(Seq2SeqTrainer(model=module, args=args).predict(training_rows(model)[:4]).predictions)
    assert predictions[0].shape[0] == 4
    assert (predictions[0] == predictions[1]).all()

def training_rows(model, n: int = 8, seq: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 128, (seq,), generator=g)
        if encoder_decoder(model):
            labels = torch.randint(3, 128, (6,), generator=g)
        else:
            labels = ids.clone()
            labels[: 1 + i % 4] = -100  # uneven label counts: Trainer's num_items_in_batch matters
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def trainer_losses(model, rows, out) -> list[float]:
    """TrainingArguments' defaults (batch 8, 3 epochs, lr 5e-5, linear decay), each step's loss logged."""
    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_losses_equal_peft_under_default_arguments(pair, tmp_path):
    """Last: it trains the module's compiled model (and PEFT's) in place."""
    _, model, cm, reference = pair
    ours = trainer_losses(cm, training_rows(model), tmp_path / "peftc")
    theirs = trainer_losses(reference, training_rows(model), tmp_path / "peft")
    assert len(ours) == 3
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours[0] != ours[-1]  # the adapters moved


def test_all_linear_targets_the_modules_peft_targets():
    """PEFT's target_modules="all-linear" in a spec: the linear modules but the LM head, PEFT's own selection."""
    from peft import LoraConfig, get_peft_model

    from peft_reference import copy_lora_weights

    family = MORE_FAMILIES["phi3"]
    model = family.build()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": "all-linear", "r": R, "alpha": ALPHA}]})
    randomize_adapters(cm.eval())
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
    assert copy_lora_weights(cm, reference.eval()) == 8  # 2 layers x qkv_proj, o_proj, gate_up_proj, down_proj
    assert "lm_head" not in cm.spec.adapters[0].targets
    inputs = forward_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(cm(**inputs).logits, reference(**inputs).logits, **TOL)


@pytest.mark.parametrize("name", ["bart"])  # T5 takes the same path; BART compiles faster
def test_encoder_decoder_prompt_tuning_round_trips_through_peft(name, tmp_path):
    """PEFT's SEQ_2_SEQ_LM prompt tuning: a table of 2N rows, the first N prepended at the encoder, as peftc's prompt."""
    from peft import PeftModel

    family = MORE_FAMILIES[name]
    model = family.build()
    cm = peftc.compile(model, {"adapters": [{"method": "prompt", "num_tokens": 3}]}).eval()
    randomize_adapters(cm, std=1.0)
    cm.save_adapter(tmp_path, format="peft")
    reference = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert reference.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    inputs = forward_inputs(family)
    with torch.no_grad():
        ours = cm(**inputs).logits
        torch.testing.assert_close(ours, reference(**inputs).logits, **TOL)
        assert not torch.allclose(ours, model(**inputs).logits, atol=1e-3)
        loaded = peftc.from_peft(copy.deepcopy(model), tmp_path).eval()
        torch.testing.assert_close(loaded(**inputs).logits, ours, **TOL)
    ids, mask = padded_prompts(model)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6),
                       reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False))

