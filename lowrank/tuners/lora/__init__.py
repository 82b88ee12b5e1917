"""LoRA as PEFT lays it out: config, layer (LoRALinear), embedding (LoRAEmbedding: PEFT's lora_embedding_A/B),
inject (what may be wrapped, "all-linear" without the output head), model (LoraModel, get_lora_model),
modules_to_save, and the variants that share its layer: DoRA, QLoRA, LoRA+."""
