"""A Llama-style decoder with hand-written backward passes (Llama, Mistral, Qwen2, Qwen3: ``families``),
loading and saving transformers checkpoints."""
from .configuration import LlamaConfig
from .modeling import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

__all__ = ["LlamaConfig", "LlamaDecoderLayer", "LlamaForCausalLM", "LlamaModel"]
