"""Interoperation with the HF PEFT checkpoint format, both ways.

    cm = peftc.from_peft(model, "path/to/peft-adapter")     # adapter_config.json + adapter_model.safetensors
    cm.save_adapter("out", format="peft")                   # PeftModel.from_pretrained loads it
    spec = peftc.Spec.from_peft_config(lora_config); spec.to_peft_config()

peft_config.py maps configs through a row per peft_type (peft_rows.py), peft_keys.py maps
tensor names, from_peft.py reads, save_peft.py writes.
"""

from .from_peft import from_peft, load_adapter_dir
from .peft_config import peft_config_from_spec, spec_dict_from_peft, supported_types
from .save_peft import save_peft

__all__ = ["from_peft", "load_adapter_dir", "save_peft", "spec_dict_from_peft", "peft_config_from_spec",
           "supported_types"]
