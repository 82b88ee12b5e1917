"""Per-row KV-cache slots and the decode step over them: each row at its own position.

Letters: L layers, S slots (the batch bound), B running rows (slots 0..B−1), H_kv key/value heads,
G = H / H_kv query heads per key head, h = head_dim, T_max positions a slot holds, K = the longest
row's length + 1 (the keys one decode step reads), d = hidden_size, V = vocab_size.

``models.llama.generation`` keeps one ``length`` for the whole batch, so a prompt can only join at
the start. Here slot b holds row b's keys and values at its own positions 0 .. len_b − 1, exactly
where ``generate`` puts them when the row runs alone; a decode step feeds each row's last token at
position len_b:

    q_b, k_b, v_b = projections of row b's token (through row b's adapter: BGMV)
    q_b, k_b      = RoPE at position len_b                         (cos, sin)[len_b]  (B, h)
    slot b[len_b] = k_b, v_b
    P_b = softmax(q_b · keys of slot b / sqrt(h)) over keys j <= len_b (and j > len_b − W in a
          sliding-window layer); keys beyond a row's length are masked to an exact 0
    out_b = P_b · values of slot b

so every row sees the positions, keys and mask it sees alone; only the batching of the products
differs (rounding). The prompts that join at one step are prefilled together (``prefill``): right-padded
into one (J, T) batch, one cached forward of the model into an ``nn.kv_cache.KVCache``, each row's
first len_j positions copied into its free slot (``put``). Attention is causal, so the padding after
a prompt changes none of its positions; the head runs on each prompt's last position only.

Memory: ``nbytes`` = 2 · L · S · H_kv · T_max · h · itemsize.
"""
from __future__ import annotations

import numpy as np

from ..kernels.common import host
from ..nn.device import get_array_module
from ..nn.dispatch import kernels_for
from ..nn.kv_cache import KVCache


class SlotCache:
    """k, v (L, S, H_kv, T_max, h) and each slot's length (S,); running rows occupy slots 0..B−1."""

    def __init__(self, config, slots: int, max_length: int, dtype="float32", xp=np):
        shape = (config.num_hidden_layers, slots, config.num_key_value_heads, max_length, config.head_dim)
        self.k = xp.zeros(shape, dtype)                  # (L, S, H_kv, T_max, h)
        self.v = xp.zeros(shape, dtype)                  # (L, S, H_kv, T_max, h)
        self.lengths = np.zeros(slots, np.int64)         # (S,) positions filled per slot
        self.max_length = max_length

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def put(self, slot: int, kv_cache, row: int = 0, length: int | None = None):
        """Copy the first ``length`` positions (default: all) of a prefilled KVCache's row ``row`` into ``slot``."""
        n = kv_cache.length if length is None else length
        if n > self.max_length:
            raise ValueError(f"SlotCache: a prefill of {n} positions exceeds the slots' max_length {self.max_length}")
        self.k[:, slot, :, :n] = kv_cache.k[:, row, :, :n]
        self.v[:, slot, :, :n] = kv_cache.v[:, row, :, :n]
        self.lengths[slot] = n

    def move(self, src: int, dst: int):
        """Slot ``src``'s row moves to ``dst`` (keeps the running rows in slots 0..B−1)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n


def prefill(llama, cache: SlotCache, prompts, slots) -> np.ndarray:
    """Prompts (J lists of ids) prefilled as one right-padded (J, T) batch into slots ``slots`` (J,)
    -> logits (J, V) at each prompt's last token, on the host.

    ``llama`` as in ``decode_step`` (``row_adapters``: one name per prompt). T = the longest prompt.
    """
    xp = get_array_module(cache.k)
    lengths = np.array([len(p) for p in prompts], np.int64)                # (J,)
    J, T = len(prompts), int(lengths.max())
    ids = np.zeros((J, T), np.int64)                                       # right-padded with id 0
    for j, p in enumerate(prompts):
        ids[j, :len(p)] = p
    kv = KVCache.for_model(llama.config, J, T, cache.k.dtype, xp)
    h = llama.model.forward(xp.asarray(ids), None, kv)                     # (J, T, d) causal: padding is unseen
    last = h[xp.arange(J), xp.asarray(lengths - 1)]                        # (J, d) each prompt's last position
    logits = llama.lm_head.forward(last)                                   # (J, V)
    for j, slot in enumerate(slots):
        cache.put(slot, kv, j, int(lengths[j]))
    return host(logits)


def decode_step(llama, cache: SlotCache, tokens) -> np.ndarray:
    """Feed token b (B,) at position ``cache.lengths[b]`` to row b of slots 0..B−1 -> logits (B, V) on the host.

    ``llama``: a LlamaForCausalLM (with the LoRA layers' ``row_adapters`` set by the caller for a
    mixed batch). Each slot's length grows by one.
    """
    tokens = np.asarray(tokens, np.int64)
    B = len(tokens)
    positions = cache.lengths[:B].copy()                                  # (B,) each row's new position
    if (positions >= cache.max_length).any():
        raise ValueError(f"decode_step: a row is full ({cache.max_length} positions, the slots' max_length)")
    xp = get_array_module(cache.k)
    m = llama.model
    x = m.embed_tokens.forward(xp.asarray(tokens[:, None]))               # (B, 1, d)
    for i in range(len(m.layers)):
        layer = m.layers[i]
        a = _attend(layer.self_attn, layer.input_layernorm.forward_inference(x), cache, i, positions)
        x = x + a                                                          # (B, 1, d)
        x = x + layer.mlp.forward_inference(layer.post_attention_layernorm.forward_inference(x))
    x = m.norm.forward_inference(x)                                        # (B, 1, d)
    logits = llama.lm_head.forward(x.reshape(B, -1))                       # (B, V)
    cache.lengths[:B] += 1
    return host(logits)


def _attend(attn, x, cache: SlotCache, layer: int, positions):
    """One token per row, x (B, 1, d), row b at position positions[b] of slot b -> (B, 1, d)."""
    xp = get_array_module(x)
    B, _, d = x.shape
    H_kv, G, h = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim
    K = int(positions.max()) + 1
    kern = kernels_for(x, attn.backend)
    cos, sin = attn.rotary.tables(K, x.dtype, xp)
    pos = xp.asarray(positions)
    cos, sin = cos[pos], sin[pos]                                          # (B, h): row b's position
    q, k, v = attn.projections(kern, x.reshape(B, d), inference=True)     # (B, ·) each
    q, k = q.reshape(B, 1, H_kv, G, h), k.reshape(B, 1, H_kv, h)
    if attn.qk_norm:
        q, k = attn.q_norm.forward_inference(q), attn.k_norm.forward_inference(k)
    q = kern.rope_forward(q.reshape(B, H_kv, G, h).transpose(1, 2, 0, 3), cos, sin)   # (H_kv, G, B, h): B as T
    q *= attn.scaling
    k = kern.rope_forward(k.reshape(B, H_kv, h).transpose(1, 0, 2), cos, sin)         # (H_kv, B, h)
    v = v.reshape(B, H_kv, h)
    rows = xp.arange(B)
    cache.k[layer, rows, :, pos] = k.transpose(1, 0, 2)                    # (B, H_kv, h) at each row's position
    cache.v[layer, rows, :, pos] = v
    keys, values = cache.k[layer, :B], cache.v[layer, :B]                  # (B, H_kv, T_max, h), read in place:
    q = q.transpose(2, 0, 1, 3)[:, :, :, None, :]                          # the query at K − 1 sees none past K
    j = np.arange(keys.shape[2])[None, :]
    visible = j <= positions[:, None]                                      # (B, T_max): the row's own keys
    if attn.sliding_window is not None:
        visible &= j > positions[:, None] - attn.sliding_window
    O = kern.causal_attention(q, keys, values, xp.asarray(visible), K - 1)   # (B, H_kv, G, 1, h); the one query
    O2 = O.transpose(0, 3, 1, 2, 4).reshape(B, H_kv * G * h)               # sits at K − 1: the mask is the rest
    return attn.o_proj.forward_inference(O2).reshape(B, 1, d)              # (B, 1, d)
