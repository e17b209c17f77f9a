"""Interoperation with the HF PEFT checkpoint format, both ways.

    cm = peftc.from_peft(model, "path/to/peft-adapter")     # adapter_config.json + adapter_model.safetensors
    cm.save_adapter("out", format="peft")                   # PeftModel.from_pretrained loads it
    spec = peftc.Spec.from_peft_config(lora_config); spec.to_peft_config()

Modules: peft_files (file names), peft_targets / peft_rows / peft_config (configs: the spec
layer's mapping, a row per peft_type), peft_keys / peft_prefix (tensor names and layouts),
save_peft (write), from_peft (read and compile). This __init__ imports nothing, so the spec
layer can use the config mapping without pulling in the compiler.
"""
