"""Engine layers for transformer decoders: each with its backward written under its forward."""
from .activations import SiLU
from .attention import LlamaAttention
from .embedding import Embedding
from .layers import init_empty_weights
from .losses_lm import CausalLMLoss
from .mlp import LlamaMLP
from .norm import RMSNorm
from .rotary import RotaryEmbedding, rope_tables

__all__ = ["CausalLMLoss", "Embedding", "LlamaAttention", "LlamaMLP", "RMSNorm", "RotaryEmbedding", "SiLU",
           "init_empty_weights", "rope_tables"]
