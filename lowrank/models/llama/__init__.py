"""A Llama decoder with hand-written backward passes, loading and saving transformers checkpoints."""
from .configuration import LlamaConfig
from .modeling import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

__all__ = ["LlamaConfig", "LlamaDecoderLayer", "LlamaForCausalLM", "LlamaModel"]
