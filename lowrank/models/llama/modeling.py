"""A Llama-style decoder (transformers' ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``) with hand-written backward passes; the family is the config's ``model_type``, and
its features are switches on the attention (``configuration``, ``families``).

Letters: B batch, T tokens, d = hidden_size, V = vocab_size. The module tree is transformers',
so ``named_parameters()`` gives its state-dict names (``model.embed_tokens.weight``,
``model.layers.0.self_attn.q_proj.weight``, ``model.norm.weight``, ``lm_head.weight``):

    LlamaForCausalLM
      model: LlamaModel
        embed_tokens: Embedding (V, d)
        layers: "0", "1", ...: LlamaDecoderLayer
            h = x + self_attn(input_layernorm(x))          (B, T, d)   (+ self_attn.q_norm, k_norm in Qwen3)
            y = h + mlp(post_attention_layernorm(h))       (B, T, d)
        norm: RMSNorm
      lm_head: Dense (V, d) or, when tie_word_embeddings, TiedLMHead -> model.embed_tokens.weight

A residual's backward adds the branch's dx to the skip's dy: dh = dy + dbranch(dy).

Training at a real vocabulary: ``forward(input_ids, labels=labels)`` returns the mean next-token loss
through ``LinearCrossEntropyLoss`` (the head's product and the loss a chunk of rows at a time), so the
(B·T, V) logits never exist; ``backward()`` then starts from that loss. A LoRA-adapted or otherwise
wrapped lm_head takes the logits path (``CausalLMLoss``) instead. With ``gradient_checkpointing_enable()``
a decoder layer keeps only its input (B, T, d) and redoes its forward at backward time, its dropout
generators rewound so that it draws the same masks. The backward stops at the lowest decoder layer that
holds a trainable parameter when the embedding is frozen: below it no gradient is needed.
With tied embeddings there is one Parameter, listed once (as ``model.embed_tokens.weight``,
the name transformers writes; ``lm_head.weight`` is absent from its file); lm_head's dW and the
embedding's scatter-add both accumulate into its ``.grad``.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import NamedTuple

import numpy as np

from ...nn.device import get_array_module
from ...nn.dispatch import kernels_for
from ...nn.layers import Dense, check_dtype, init_empty_weights
from ...nn.losses_lm import CausalLMLoss, LinearCrossEntropyLoss
from ...nn.module import Module, Sequential
from ...nn import Embedding, LlamaAttention, LlamaMLP, RMSNorm
from .checkpoint import from_pretrained, save_pretrained
from .configuration import LlamaConfig
from .generation import generate


def trainable(module: Module) -> bool:
    """Whether any parameter of ``module`` (or below it) is trainable."""
    return any(p.trainable for p in module.parameters())


class LayerCheckpoint(NamedTuple):
    x: object              # (B, T, d) the layer's input, the one activation it keeps
    attention_mask: object  # (B, T) or None, as given to forward
    rng_states: list       # each dropout generator's state before the forward, to draw the same masks again


class LlamaDecoderLayer(Module):
    """Pre-norm block: attention then SwiGLU MLP, each added to the residual stream."""

    def __init__(self, config: LlamaConfig, *, dtype="float32", seed=None, layer_idx: int = 0):
        super().__init__()
        s = [int(v) for v in np.random.default_rng(seed).integers(2**31, size=2)]
        c = config
        self.self_attn = LlamaAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                        rope_theta=c.rope_theta, rope_type=c.rope_type, rope_scaling=c.rope_scaling,
                                        max_position_embeddings=c.max_position_embeddings, bias=c.qkv_bias,
                                        o_bias=c.attention_bias, qk_norm=c.qk_norm, rms_norm_eps=c.rms_norm_eps,
                                        sliding_window=c.layer_window(layer_idx), dtype=dtype, seed=s[0])
        self.mlp = LlamaMLP(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype, seed=s[1])
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)

    def forward(self, x, attention_mask=None, kv_cache=None, layer: int = 0, checkpoint: bool = False):
        """x (B, T, d); with a ``kv_cache`` (inference), attention also sees the cached positions. With
        ``checkpoint``, the sublayers' caches are dropped and only x is kept; backward recomputes them."""
        if checkpoint:
            generators = self._generators()
            states = [g.bit_generator.state for g in generators]
            y = self.forward(x, attention_mask)
            self.release()
            self._cache = LayerCheckpoint(x, attention_mask, states)
            return y
        self._cache = None
        if kv_cache is not None:                                                           # inference: no backward
            a = self.self_attn.forward_cached(self.input_layernorm.forward_inference(x), kv_cache, layer)
            h = x + a                                                                      # (B, T, d)
            return h + self.mlp.forward_inference(self.post_attention_layernorm.forward_inference(h))
        h = x + self.self_attn.forward(self.input_layernorm.forward(x), attention_mask)    # (B, T, d)
        return h + self.mlp.forward(self.post_attention_layernorm.forward(h))             # (B, T, d)

    def backward(self, dy):
        if self._cache is not None:                                # checkpointed: redo the forward first
            x, attention_mask, states = self._cache
            generators = self._generators()
            now = [g.bit_generator.state for g in generators]
            for g, state in zip(generators, states):
                g.bit_generator.state = state                      # the same dropout masks as the first time
            self.forward(x, attention_mask)
            for g, state in zip(generators, now):
                g.bit_generator.state = state
        dh = dy + self.post_attention_layernorm.backward(self.mlp.backward(dy))           # (B, T, d)
        return dh + self.input_layernorm.backward(self.self_attn.backward(dh))             # (B, T, d)

    def _generators(self) -> list:
        """The random generators of the sublayers' dropout (LoRA's), in module order."""
        return [m._rng for _, m in self.named_modules() if isinstance(getattr(m, "_rng", None), np.random.Generator)]

    def release(self):
        """Drop every cache in this layer (its checkpoint included): no backward will come through it."""
        for _, m in self.named_modules():
            m._cache = None


class LlamaModel(Module):
    """Token ids (B, T) -> final hidden states (B, T, d)."""

    def __init__(self, config: LlamaConfig, *, dtype="float32", seed=None):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, seed=int(rng.integers(2**31)))
        self.layers = Sequential(*[LlamaDecoderLayer(config, dtype=dtype, seed=int(rng.integers(2**31)), layer_idx=i)
                                   for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.gradient_checkpointing = False          # transformers' name; set by gradient_checkpointing_enable

    def forward(self, input_ids, attention_mask=None, kv_cache=None):
        """With a ``kv_cache`` (nn.kv_cache.KVCache, inference only): input_ids (B, T_new) follow the cached
        positions, ``attention_mask`` (B, T_new) covers the new tokens only, and the cache grows by T_new."""
        if not hasattr(input_ids, "shape") or input_ids.ndim != 2:
            raise ValueError(f"{self.label} expects input_ids of shape (B, T), "
                             f"got {tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}")
        T = input_ids.shape[1] + (0 if kv_cache is None else kv_cache.length)
        if T > self.config.max_position_embeddings:
            raise ValueError(f"{self.label}: sequence length T={T} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings} (RoPE positions beyond it were never trained)")
        if kv_cache is not None:
            kv_cache.start(attention_mask, input_ids.shape[1])
        checkpoint = self.gradient_checkpointing and self.training and kv_cache is None
        embed = self.embed_tokens.forward if kv_cache is None else self.embed_tokens.forward_inference
        h = embed(input_ids)                                                   # (B, T, d)
        for i in range(len(self.layers)):
            h = self.layers[i].forward(h, attention_mask, kv_cache, i, checkpoint)   # (B, T, d)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
            return self.norm.forward_inference(h)                              # (B, T, d), nothing kept
        return self.norm.forward(h)                                            # (B, T, d)

    def backward(self, dy):
        dh = self.norm.backward(dy)                                            # (B, T, d)
        n, embedding = len(self.layers), trainable(self.embed_tokens)
        stop = 0 if embedding else next((i for i in range(n) if trainable(self.layers[i])), n)
        for i in reversed(range(stop, n)):
            dh = self.layers[i].backward(dh)
        for i in range(stop):                                  # nothing trainable in layers 0..stop-1
            self.layers[i].release()
        if not embedding:                                      # a frozen embedding needs no gradient
            for _, m in self.embed_tokens.named_modules():
                m._cache = None
            return None
        return self.embed_tokens.backward(dh)                                  # None: ids get no gradient


class TiedLMHeadCache(NamedTuple):
    h: object          # (N, d) hidden states, kept only when the shared weight is trainable
    rows: int          # N, to check dy


class TiedLMHead(Module):
    """logits = h Wᵀ with W = the embedding's weight (V, d); owns no Parameter, so nothing is listed twice."""

    backend = None         # the kernel backend of its products (None: the global setting; see nn.dispatch)

    def __init__(self, embedding: Embedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)          # a reference, not a child: no second name

    @property
    def weight(self):
        return self.embedding.weight

    def forward(self, h):
        W = self.weight
        self._check_input(h, W.shape[1], W.dtype)
        self._cache = TiedLMHeadCache(h if W.trainable else None, h.shape[0])
        return kernels_for(h, self.backend).dense_forward(h, W.data)          # (N, d) @ (d, V)

    def backward(self, dy):
        h, rows = self._need_cache()
        W = self.weight
        self._check_dy(dy, (rows, W.shape[0]))
        self._cache = None
        dx, dW, _ = kernels_for(dy, self.backend).dense_backward(dy, h, W.data, need_dW=h is not None, need_db=False)
        if dW is not None:
            W.accumulate(dW)                                                   # (V, N) @ (N, d)
        return dx                                                              # (N, V) @ (V, d)

    def extra_repr(self):
        return f"tied to {self.embedding.label}"


class CausalLMCache(NamedTuple):
    B: int
    T: int
    loss: object       # the LinearCrossEntropyLoss or CausalLMLoss of a forward given labels, else None
    kept: int = 0      # logits_to_keep of a forward without labels: its logits are the last ``kept`` positions'


class LlamaForCausalLM(Module):
    """Token ids (B, T) [+ padding mask (B, T)] -> logits (B, T, V), and ``backward(dlogits)`` fills ``.grad``;
    with ``labels`` (B, T) -> the mean next-token loss (no logits), and ``backward()`` fills ``.grad``."""

    def __init__(self, config: LlamaConfig, *, dtype="float32", seed=None, init_weights: bool = True):
        super().__init__()
        check_dtype("LlamaForCausalLM", dtype)                   # float32 or float64; files in 16 bits are upcast
        rng = np.random.default_rng(seed)
        self.config = config
        with contextlib.nullcontext() if init_weights else init_empty_weights():   # else a file's weights follow
            self.model = LlamaModel(config, dtype=dtype, seed=int(rng.integers(2**31)))
            if config.tie_word_embeddings:
                self.lm_head = TiedLMHead(self.model.embed_tokens)
            else:
                self.lm_head = Dense(config.hidden_size, config.vocab_size, False, dtype=dtype)
        if init_weights:                                    # transformers' init, then one block (decoding streams it)
            for name, p in self.named_parameters():
                if p.data.ndim == 2:
                    p.data = (rng.standard_normal(p.shape) * config.initializer_range).astype(p.dtype)
                elif name.endswith(".bias"):
                    p.data = np.zeros_like(p.data)
            self.flatten_parameters()

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Keep only each decoder layer's input in training forwards and recompute the rest in backward."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def _head_weight(self):
        """The head's weight (V, d) when the head is the plain product h Wᵀ (tied or a bias-free Dense), else
        None: an adapted or wrapped lm_head (LoRA, modules_to_save) computes its own logits."""
        head = self.lm_head
        if type(head) is TiedLMHead or (type(head) is Dense and head.bias is None):
            return head.weight
        return None

    def forward(self, input_ids, attention_mask=None, kv_cache=None, labels=None, logits_to_keep: int = 0):
        """Logits (B, T, V), or the loss given ``labels``. ``logits_to_keep`` (transformers' name): k > 0 gives
        only the last k positions' logits (B, k, V), as a prefill needs the last one; 0 gives all."""
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, numbers.Integral) or logits_to_keep < 0:
            raise ValueError(f"{self.label}: logits_to_keep must be an int >= 0 (0: every position), "
                             f"got {logits_to_keep!r}")
        if logits_to_keep and labels is not None:
            raise ValueError(f"{self.label}: logits_to_keep and labels do not go together (the loss needs every "
                             f"position's logits)")
        h = self.model.forward(input_ids, attention_mask, kv_cache)            # (B, T, d)
        B, T, d = h.shape
        if labels is not None:
            if kv_cache is not None:
                raise ValueError(f"{self.label}: labels (training) and kv_cache (inference) do not go together")
            weight = self._head_weight()
            if weight is not None:                                             # no (B·T, V) logits
                loss_fn = LinearCrossEntropyLoss()
                loss = loss_fn.forward(h, weight, labels, need_grad=self.training)
            else:
                loss_fn = CausalLMLoss()
                loss = loss_fn.forward(self.lm_head.forward(h.reshape(B * T, d)).reshape(B, T, -1), labels)
            self._cache = CausalLMCache(B, T, loss_fn)
            return loss
        kept = min(logits_to_keep, T) or T
        logits = self.lm_head.forward(h[:, T - kept:].reshape(B * kept, d))    # (B·k, V)
        self._cache = CausalLMCache(B, T, None, kept) if kv_cache is None else None   # a cached forward: no backward
        return logits.reshape(B, kept, -1)                                     # (B, k, V)

    def generate(self, input_ids, max_new_tokens: int = 20, **kwargs):
        """Hugging Face's ``generate``: prompt ids (B, T) -> ids (B, T + new); see ``generation``."""
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def backward(self, dlogits=None):
        """From dlogits (B, k, V) after a forward without labels (k = T, or its logits_to_keep); from the loss (no
        argument) after one with."""
        B, T, loss_fn, kept = self._need_cache()
        if (loss_fn is None) != (dlogits is not None):
            raise ValueError(f"{self.label}: backward takes dlogits (B, T, V) after a forward without labels and "
                             f"nothing after one with labels; got {'nothing' if dlogits is None else 'dlogits'} "
                             f"after a forward {'without' if loss_fn is None else 'with'} labels")
        if loss_fn is None:
            self._check_dy(dlogits, (B, kept, self.config.vocab_size))
        self._cache = None
        if isinstance(loss_fn, LinearCrossEntropyLoss):
            self.model.backward(loss_fn.backward())                            # (B, T, d)
            return
        if loss_fn is not None:
            dlogits, kept = loss_fn.backward(), T                              # (B, T, V)
        dh = self.lm_head.backward(dlogits.reshape(B * kept, -1)).reshape(B, kept, -1)   # (B, k, d)
        if kept < T:                                                           # the positions without logits: 0
            xp = get_array_module(dh)
            dh = xp.concatenate([xp.zeros((B, T - kept, dh.shape[-1]), dh.dtype), dh], axis=1)   # (B, T, d)
        self.model.backward(dh)

    @classmethod
    def from_pretrained(cls, path, *, dtype="float32", allow_nonfinite: bool = False, keep_quantized: bool = False,
                        q8_activations: bool = False) -> "LlamaForCausalLM":
        """Load a folder written by transformers' ``save_pretrained``, or a llama.cpp GGUF file (``keep_quantized``:
        its quantized matrices stay blocks; ``q8_activations``: multiplied as llama.cpp does; see ``checkpoint``)."""
        return from_pretrained(cls, path, dtype=dtype, allow_nonfinite=allow_nonfinite, keep_quantized=keep_quantized,
                               q8_activations=q8_activations)

    def save_pretrained(self, path, *, overwrite: bool = False, dtype: str | None = None, **kwargs):
        """Write ``config.json`` + ``model.safetensors`` that transformers loads (``dtype`` "bfloat16"
        etc. to store in another float type; see ``checkpoint.save_pretrained``)."""
        save_pretrained(self, path, overwrite=overwrite, dtype=dtype, **kwargs)
