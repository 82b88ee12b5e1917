"""LoraEmbedding: a frozen token embedding plus low-rank adapters, in PEFT's embedding layout.

Letters: N tokens (B·T, the ids flattened), V = num_embeddings, d = embedding_dim, r rank.
An embedding is the linear map one-hot(id) (V,) ↦ Wᵀ one-hot(id) (d,), so its adapter is LoRA
on that map with D_in = V and D_out = d, under PEFT's names:

    lora_embedding_A[name] (r, V)    lora_embedding_B[name] (d, r)    scaling[name] = alpha / r
                                                                       (alpha / √r with rsLoRA)

    forward   h = A[:, ids]ᵀ                 (N, r)    = one-hot(ids) Aᵀ, a column gather
              y = W[ids] + s · h Bᵀ          (N, d)
    backward  dh = s · dy B                  (N, r)
              dB = s · dyᵀ h                 (d, r)
              dA[:, v] = Σ_{i: ids_i = v} dh_i   (r, V)   a scatter-add into columns (``add.at``)

The ids get no gradient, and W (frozen) none either. Init as PEFT's (after loralib): A = 0 and
B ~ N(0, 1), the reverse of a linear layer, so the adapted model still starts at the base;
``init_lora_weights=False`` draws both from N(0, 1); "gaussian" is the default here, as in PEFT.
``lora_dropout`` is recorded but not applied: PEFT's Embedding builds the dropout and never calls it.

Merge: W ← W + (s·B·A)ᵀ (V, d). ``delta_weight`` returns s·B·A (d, V), the update of the map
above in (D_out, D_in) layout, like LoraLinear's (PEFT's ``get_delta_weight`` returns its transpose).
With tied word embeddings W is also the output head's weight: merging would change the head too,
so a layer injected over a tied W refuses to merge (``tied_to``) and its adapter stays on the input side.
The layer answers to ``lora_A``/``lora_B`` as well (read-only aliases of the embedding tables), so
LoraModel's adapter management and the analysis code treat it as any LoRA layer.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...nn.device import get_array_module
from ...nn.dispatch import kernels_for
from ...nn.embedding import Embedding
from ...nn.module import Module
from .layer import AdapterTables
from .mixed import BASE, rows_for


class AdapterTokens(NamedTuple):
    name: str              # the adapter these tokens use
    rows: object           # (n,) positions among the N flattened tokens, None = all of them
    ids: object            # (n,) their token ids, for dA
    h: object              # (n, r) = A[:, ids]ᵀ, for dB


class LoraEmbeddingCache(NamedTuple):
    groups: list           # AdapterTokens per adapter whose factors get gradients
    shape: tuple           # (..., d) of y, to check dy


class LoraEmbedding(AdapterTables):
    """An Embedding base (frozen) with LoRA adapters; the math: the module docstring. ``row_adapters``
    (AdapterTables) holds one name per sequence or per token."""

    factor_names = ("lora_embedding_A", "lora_embedding_B")
    tied_to: tuple = ()    # other layers sharing W (a tied lm_head), set at injection: merging is refused
    backend = None         # the kernel backend of its rank-r products (None: the global setting; see nn.dispatch)

    def __init__(self, base: Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, *, adapter_name: str = "default", seed=None):
        if not isinstance(base, Embedding):
            raise TypeError(f"LoraEmbedding: base must be an Embedding, got {type(base).__name__}")
        super().__init__(base, adapter_name, seed)
        self._add_first_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    # -- the surface LoraModel and the analysis code use ------------------------------
    num_embeddings = property(lambda self: self.base_layer.num_embeddings)
    embedding_dim = property(lambda self: self.base_layer.embedding_dim)
    weight = property(lambda self: self.base_layer.weight)
    bias = None                                     # an embedding has none (bias "lora_only" finds nothing)
    lora_A = property(lambda self: self.lora_embedding_A)       # (r, V) per adapter
    lora_B = property(lambda self: self.lora_embedding_B)       # (d, r) per adapter
    _fusable = True                                 # a dense weight: merge_and_unload folds it in place

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights=True):
        """Add adapter ``adapter_name``; validates everything first."""
        V, d = self.num_embeddings, self.embedding_dim
        where, r = self._check_adapter(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights,
                                       (True, False, "gaussian"),
                                       " for an embedding (PiSSA is defined for linear layers)")
        self._warn_rank(where, r, "min(V, d)", min(V, d))
        W = self.weight
        xp, dtype = get_array_module(W.data), W.dtype
        A = (np.zeros((r, V), dtype) if init_lora_weights is not False
             else self._rng.standard_normal((r, V)).astype(dtype))
        B = self._rng.standard_normal((d, r)).astype(dtype)
        self._record(adapter_name, xp.asarray(A), xp.asarray(B), r, lora_alpha, lora_dropout,
                     self._scaling(r, lora_alpha, use_rslora))

    def merge(self, adapter_names=None):
        """W ← W + (s·B·A)ᵀ for each adapter (default: the active one)."""
        names = [self.active_adapter] if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n is not None and n not in self.lora_embedding_A]
        if unknown:
            raise ValueError(f"{self.label}: no adapter {unknown[0]!r}; it has {list(self.lora_embedding_A)}")
        if self.tied_to and any(n is not None for n in names):
            raise ValueError(f"{self.label}: its weight is shared with {list(self.tied_to)} (tied word embeddings); "
                             f"merging s·(B·A)ᵀ into it would change that layer's output too, while the unmerged "
                             f"adapter changes the input embedding only; keep the adapter unmerged")
        W = self.weight
        for name in names:
            if name is None or name in self.merged_adapters:
                continue
            W.data = W.data + self.delta_weight(name).T.astype(W.dtype)     # (V, d)
            self.merged_adapters.append(name)

    def unmerge(self):
        """Undo every merge (W comes back to rounding, as for LoraLinear)."""
        W = self.weight
        while self.merged_adapters:
            W.data = W.data - self.delta_weight(self.merged_adapters.pop()).T.astype(W.dtype)

    # -- forward / backward -------------------------------------------------------------
    def forward(self, ids):
        """y (..., d) for integer ids (...); adapters per token as ``active_adapter``/``row_adapters`` say."""
        y = self.base_layer.forward(ids)                     # W[ids], merged adapters included; checks ids
        flat = ids.reshape(-1)                               # (N,)
        y2, groups = y.reshape(-1, self.embedding_dim).copy(), []     # (N, d), ours to add into
        k = kernels_for(y2, self.backend)
        for name, rows in self._token_groups(ids):
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            merged = name in self.merged_adapters
            learns = self.training and (A.trainable or B.trainable)
            if merged and not learns:
                continue
            t = flat if rows is None else flat[rows]         # (n,) the ids of this adapter's tokens
            h = A.data.T[t]                                  # (n, r) = A[:, ids]ᵀ
            if not merged:
                y2[slice(None) if rows is None else rows] += self.scaling[name] * k.matmul(h, B.data.T)   # (n, r) @ (r, d)
            if learns:
                groups.append(AdapterTokens(name, rows, t, h))
        self._cache = LoraEmbeddingCache(groups, y.shape)
        return y2.reshape(y.shape)

    def backward(self, dy):
        groups, shape = self._need_cache()
        self._check_dy(dy, shape)
        self._cache = None
        self.base_layer.backward(dy)                         # dW only if the base was made trainable
        xp, dy2 = get_array_module(dy), dy.reshape(-1, self.embedding_dim)   # (N, d)
        k = kernels_for(dy2, self.backend)
        for name, rows, t, h in groups:
            A, B, s = self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name]
            g = dy2 if rows is None else dy2[rows]           # (n, d)
            if B.trainable:
                B.accumulate(s * k.matmul(g.T, h))           # dB = s · dyᵀ h: (d, n) @ (n, r)
            if A.trainable:
                dh = s * k.matmul(g, B.data)                 # (n, d) @ (d, r)
                dAT = xp.zeros((self.num_embeddings, dh.shape[1]), dh.dtype)   # (V, r)
                xp.add.at(dAT, t, dh)                        # row ids_i += dh_i: every repeat counts
                A.accumulate(dAT.T)                          # (r, V)
        return None                                          # the ids get no gradient

    def _token_groups(self, ids):
        """[(adapter, positions among the N tokens or None for all)] for this forward."""
        if self.row_adapters is None:
            a = self.active_adapter
            return [] if a is None else [(a, None)]
        names, N = list(self.row_adapters), ids.size
        rows = ids.shape[0] if ids.ndim else 1
        if len(names) == rows:                               # one adapter per sequence: each covers N/rows tokens
            names = rows_for(names, N, self.label)
        elif len(names) != N:
            raise ValueError(f"{self.label}: adapter_names has {len(self.row_adapters)} entries for ids of shape "
                             f"{tuple(ids.shape)} (expected one per sequence, {rows}, or per token, {N})")
        if self.merged_adapters:
            raise ValueError(f"{self.label}: mixed-adapter batches need unmerged adapters; "
                             f"merged: {self.merged_adapters}")
        xp, per_token = get_array_module(ids), np.array(names, dtype=object)
        return [(n, xp.asarray(np.flatnonzero(per_token == n))) for n in dict.fromkeys(names)
                if n != BASE and n in self.lora_embedding_A]  # others: the base alone, as LoraLinear

    def extra_repr(self):
        ads = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}" for n in self.lora_embedding_A)
        return (f"{self.num_embeddings}, {self.embedding_dim}, adapters {{{ads}}}, "
                f"active={self.active_adapter!r}")
