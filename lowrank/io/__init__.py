"""Files, format-generic: safetensors tensors (any float dtype, bfloat16 included), all-or-nothing
commits and base-model files, as functions that take the model. PEFT's adapter files, which read a
LoRA model, are the tuner's: ``lowrank.tuners.lora.save_and_load``."""
