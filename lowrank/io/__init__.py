"""Files: safetensors tensors (any float dtype, bfloat16 included), all-or-nothing commits,
base-model files and PEFT adapter files, as functions that take the model."""
