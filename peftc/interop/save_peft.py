"""cm.save_adapter(dir, format="peft"): a directory `PeftModel.from_pretrained` loads, written atomically
(`peftc.core.files.atomic_dir`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peftc.core.distributed import any_sharded, wait_for_writer, whole, writes_files
from peftc.core.files import atomic_dir
from peftc.errors import CheckpointError
from peftc.ir import adapters

from .peft_config import peft_config_from_spec
from .peft_files import CONFIG_FILE, SAFETENSORS_FILE
from .peft_keys import peft_names, to_peft_shape
from .peft_plain_lora import as_plain_lora
from .peft_prefix import join_table
from .peft_vblora import topk_from_logits


def save_peft(cm, directory, plain_lora: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with PEFT's tensor keys; `plain_lora`: a
    PiSSA / OLoRA / CorDA adapter as plain LoRA on the original weights (peft_plain_lora.py)."""
    from safetensors.torch import save_file

    config = peft_config_from_spec(cm.spec)
    if "fan_in_fan_out" in config:
        config["fan_in_fan_out"] = any(site.layout == "in_out" for site in cm.sites
                                       if site.path in _adapted_paths(cm))  # GPT-2's Conv1D
    config["base_model_name_or_path"] = getattr(getattr(cm.compilation.source, "config", None), "_name_or_path", None) or None
    names = peft_names(cm)
    own = cm.adapter_state_dict()
    sharded = any_sharded(own.values())  # FSDP2: every rank gathers, rank 0 writes (peftc.core.distributed)
    own = {name: whole(tensor) for name, tensor in own.items()}
    tensors = join_table(names, {key: _peft_tensor(cm, n, own.get(n)) for n, key in names.items()})
    if config["peft_type"] in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"):
        _fill_prompt_config(config, cm, tensors, own)
    if config.get("save_only_topk_weights"):
        tensors = topk_from_logits(tensors, config["topk"], config["num_vectors"])
    if config["peft_type"] == "ADALORA":
        config["rank_pattern"] = _rank_pattern(cm)
    if plain_lora:
        as_plain_lora(cm, config, tensors, names)
    if writes_files(sharded):
        with atomic_dir(directory, CheckpointError) as tmp:
            save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    wait_for_writer(sharded)
    return Path(directory)


# PEFT picks the model wrapper that prepends the prompt from task_type; peftc infers it from the class name.
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def _fill_prompt_config(config: dict, cm, tensors: dict, own: dict) -> None:
    config["token_dim"] = int(tensors["prompt_embeddings"].shape[1])
    keys = [t for n, t in own.items() if n.endswith(".prefix.key")]
    if keys:  # prefix: the table is [N, layers·2·kv·d]; PEFT wants the per-layer kv width and heads
        kv, _, d = keys[0].shape
        config.update(token_dim=int(kv * d), num_attention_heads=int(kv), num_layers=len(keys))
    name = type(cm.compilation.source).__name__
    task = next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), None)
    if getattr(getattr(cm.compilation.source, "config", None), "is_encoder_decoder", False):
        task = _seq2seq_prompt(config, tensors, name)
    if task is None:
        raise NotImplementedError(f"save_adapter(format='peft'): PEFT needs a task_type for prompt tuning and "
                                  f"peftc cannot tell it for {name}; known: {sorted(set(TASK_TYPES.values()))}")
    config["task_type"] = task


def _seq2seq_prompt(config: dict, tensors: dict, name: str) -> str:
    """An encoder-decoder's prompt as PEFT's SEQ_2_SEQ_LM writes it: prompt tuning keeps a table of 2N rows
    (num_transformer_submodules 2) and prepends the first N to the encoder's embeddings, as peftc's prompt does;
    the other N, which its prompt tuning never reads, are zeros here."""
    if config["peft_type"] != "PROMPT_TUNING":
        raise NotImplementedError(f"save_adapter(format='peft'): {config['peft_type']} on the encoder-decoder {name}: "
                                  "PEFT's SEQ_2_SEQ_LM layout for it differs from peftc's (prefix keys at every "
                                  "attention op; p-tuning's encoder over 2N tokens); save peftc's format "
                                  "(cm.save_adapter(dir))")
    table = tensors["prompt_embeddings"]
    tensors["prompt_embeddings"] = torch.cat([table, torch.zeros_like(table)])
    config["num_transformer_submodules"] = 2
    return "SEQ_2_SEQ_LM"


def _rank_pattern(cm) -> dict | None:
    """PEFT's rank_pattern ({module}.lora_E -> kept ranks of init_r) once any rank is pruned, else None:
    the tensors are then saved with the kept ranks only (AdaloraWeights.to_peft)."""
    pattern = {f"{qualname.rpartition('.')[0]}.lora_E": module.init_rank_pattern()
               for qualname, module in adapters.adapter_modules(cm.adapter_root)
               if hasattr(module, "init_rank_pattern")}
    return pattern if any(not all(mask) for mask in pattern.values()) else None


def _peft_tensor(cm, name: str, value):
    """The tensor in PEFT's shape; `value` None: a non-persistent buffer (VeRA's projections), read directly."""
    owner, _, leaf = name.rpartition(".")
    try:
        module = cm.adapter_root.get_submodule(owner)
    except AttributeError:  # a base parameter trained in place
        module = None
    value = getattr(module, leaf) if value is None else value
    value = to_peft_shape(module, leaf, value.detach())
    return value.to("cpu").contiguous().clone()


def _adapted_paths(cm) -> set[str]:
    return {path for record in cm.records if record.method not in (None, "copy") for path in record.sites}
