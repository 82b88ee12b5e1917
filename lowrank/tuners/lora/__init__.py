"""LoRA as PEFT lays it out: config, layer, model (LoraModel, get_lora_model), modules_to_save,
and the variants that share its layer: DoRA, QLoRA, LoRA+."""
