"""DoRA (Liu et al. 2024): LoRA with each output unit's magnitude split off and trained apart.

Letters: N rows, D_in, D_out, r rank. For a DoRA adapter (``LoraConfig(use_dora=True)``):

    V = W + s·B·A                            (D_out, D_in)  the LoRA-updated weight
    n = ‖V‖_row                              (D_out,)       one norm per output unit
    c = m / n                                (D_out,)       m = lora_magnitude_vector[name]
    z = x Wᵀ + s·((x ⊙ mask) Aᵀ) Bᵀ          (N, D_out)     the plain LoRA product, bias left out
    y = c ⊙ z + b                            (N, D_out)     = x (c ⊙ V)ᵀ + b without dropout

m starts at n, so at initialisation DoRA equals the LoRA layer it extends (the base when B = 0).
Dropout touches only the LoRA branch's input, as everywhere in lowrank (PEFT, training
with dropout, also feeds the dropped-out x to the rescaled base term).

Cheap norm. n² = ‖W‖²_row + 2s·⟨W, B A⟩_row + s²·‖B A‖²_row, with
    ⟨W, B A⟩_row = rowsum((W Aᵀ) ⊙ B)        (D_out, r)
    ‖B A‖²_row   = rowsum((B (A Aᵀ)) ⊙ B)    (D_out, r) @ (r, r)
reads W twice (for ‖W‖² and W Aᵀ) and forms no (D_out, D_in) temporary; PEFT's
‖W + s·B·A‖ forms B A, adds W, squares and sums: about five passes over D_out·D_in
(``python -m benchmarks.dora`` times both). W Aᵀ and A Aᵀ are kept for the exact backward.
Its rounding is relative to ‖W‖² + s²‖B A‖² rather than to n², so it loses digits only in
a row where s·B A nearly cancels W (n ≪ ‖W‖).

Backward, with g = Σ_N dy ⊙ z (D_out,):
    dm = g / n                                  (D_out,)
    dz = c ⊙ dy  → dx, dA, dB by the LoRA kernels' lora_backward
    db = Σ_N dy                                 (the bias sits outside the scale)
    dW = dzᵀ x                                  (only when W is trainable)
That is the detached-norm gradient: n held constant, as the paper and PEFT do. The
exact gradient (``exact_norm_grad=True``) adds n's dependence on A and B (and W), through
∂n/∂V = V / n:
    κ  = −m ⊙ g / n³                            (D_out,)   (= ∂L/∂n ⊘ n)
    dA += s·(κ ⊙ B)ᵀ V = s·(κ⊙B)ᵀ W + s²·((κ⊙B)ᵀ B) A        (r, D_in)
    dB += s·κ ⊙ (V Aᵀ) = s·κ ⊙ (W Aᵀ + s·B (A Aᵀ))          (D_out, r)
    dW += κ ⊙ V                                 (only when W is trainable)
So exact − detached = s·(κ⊙B)ᵀ V for dA and s·κ ⊙ (V Aᵀ) for dB, and nothing for dx, dm
and db. Without dropout, z_o = x·V_o and g_o = G_o·V_o with G_o = Σ_N dy_o x, so row o of
∂L/∂V is c_o (I − V̂_o V̂_oᵀ) G_o exactly and c_o G_o detached: the detached gradient keeps
the component along V_o that the exact one projects out (the paper's gradient analysis).

Mixed batches. The parent's BGMV kernels compute z + b for every row at once; the rows of
each DoRA adapter are then rescaled by its c (and dy by c before the parent's backward),
so DoRA and plain adapters share one batch, which PEFT refuses.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

from ...nn.device import get_array_module
from ...nn.dispatch import kernels_for
from ...nn.layers import Dense
from .layer import LoraCache, LoraLinear, MixedCache
from ...nn.module import Module, Parameter, ParameterDict


class DoraNorm(NamedTuple):
    n: object              # (D_out,) ‖W + s·B·A‖ per row
    WA: object             # (D_out, r) W Aᵀ
    AA: object             # (r, r) A Aᵀ


def rowdot(P, Q):
    """rowsum(P ⊙ Q) (rows,) as a batch of (1, k) @ (k, 1) products: no temporary, fast on NumPy and CuPy."""
    return (P[:, None, :] @ Q[:, :, None])[:, 0, 0]


def dora_norm(W, A, B, scaling, matmul=operator.matmul) -> DoraNorm:
    """‖W + s·B·A‖ per row without forming W + s·B·A; W (D_out, D_in), A (r, D_in), B (D_out, r).
    ``matmul``: the layer's kernel backend's (so its products run where its other products do)."""
    xp = get_array_module(W)
    WA = matmul(W, A.T)                             # (D_out, D_in) @ (D_in, r)
    AA = matmul(A, A.T)                             # (r, D_in) @ (D_in, r)
    sq = rowdot(W, W) + (2 * scaling) * rowdot(WA, B) + scaling**2 * rowdot(matmul(B, AA), B)   # (D_out,)
    return DoraNorm(xp.sqrt(xp.maximum(sq, 0)), WA, AA)


def dora_norm_materialised(W, A, B, scaling):
    """‖W + s·B·A‖ per row the direct way (PEFT's get_weight_norm): the benchmark's baseline."""
    return get_array_module(W).linalg.norm(W + scaling * (B @ A), axis=1)   # (D_out,)


class DoraCache(NamedTuple):
    x: object              # (N, D_in)
    h: object              # (N, r) = (x ⊙ mask) Aᵀ
    z: object              # (N, D_out) = x Wᵀ + s·h Bᵀ, for g = Σ dy ⊙ z
    mask: object           # (N, D_in) or None
    adapter: str
    norm: DoraNorm


class DoraRows(NamedTuple):
    adapter: str           # one DoRA adapter's rows in a mixed batch
    rows: object           # (n_k,) row indices
    z: object              # (n_k, D_out)
    norm: DoraNorm


class DoraMixedCache(NamedTuple):
    mixed: MixedCache      # what the parent's BGMV backward needs
    groups: list           # DoraRows per DoRA adapter in the batch


def _check_dense(base, where: str):
    if not isinstance(base, Dense):
        raise TypeError(f"{where}: DoRA needs a Dense base layer (it reads W's row norms), "
                        f"got {type(base).__name__}")


class DoraLinear(LoraLinear):
    """A LoraLinear whose adapters may be DoRA adapters: those with a ``lora_magnitude_vector``.

    ``use_dora`` makes the first adapter a DoRA one; ``update_layer(..., use_dora=True)``
    adds more. ``exact_norm_grad`` differentiates through n (see the module docstring).
    A merged DoRA adapter is folded into W, magnitude included: the layer then runs the base
    alone and gives that adapter no gradients (as PEFT does when merged).
    """

    def __init__(self, base: Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, *, adapter_name: str = "default",
                 seed=None, backend: str | None = None, use_dora: bool = True, exact_norm_grad: bool = False):
        _check_dense(base, "DoraLinear")
        super().__init__(base, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                         adapter_name=adapter_name, seed=seed, backend=backend)
        self._init_dora(exact_norm_grad)
        if use_dora:
            self._add_magnitude(adapter_name)

    def _init_dora(self, exact_norm_grad: bool):
        self.lora_magnitude_vector = ParameterDict()
        self.exact_norm_grad = exact_norm_grad
        self._merge_scale = {}             # adapter -> c it was merged with, for unmerge

    @classmethod
    def from_lora(cls, layer: LoraLinear, exact_norm_grad: bool = False) -> "DoraLinear":
        """A DoraLinear taking over ``layer``'s base and adapters (to add a DoRA adapter to it).

        It shares the base and the adapters' Parameters but copies the tables that hold them,
        so adding to it leaves ``layer`` as it was (add_adapter puts ``layer`` back on failure).
        """
        _check_dense(layer.base_layer, layer.label)
        new = cls.__new__(cls)
        Module.__init__(new)
        for key, value in vars(layer).items():
            if key in ("_parameters", "_modules"):
                continue
            if isinstance(value, ParameterDict):         # lora_A, lora_B: a new dict of the same Parameters
                value, table = ParameterDict(), value
                for name in table:
                    value[name] = table[name]
            elif isinstance(value, (dict, list)):        # r, lora_alpha, scaling, lora_dropout, merged_adapters
                value = type(value)(value)
            setattr(new, key, value)                     # registers base_layer, lora_A, lora_B
        new._init_dora(exact_norm_grad)
        return new

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights=True, use_dora: bool = False):
        """LoraLinear.update_layer, plus a magnitude vector when ``use_dora`` (PEFT's signature)."""
        if use_dora and self.merged:
            raise ValueError(f"{self.label} adapter {adapter_name!r}: add DoRA adapters to an unmerged layer "
                             f"(m starts at the row norms of the base W); merged: {self.merged_adapters}")
        super().update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        if use_dora:
            self._add_magnitude(adapter_name)

    def _add_magnitude(self, name: str):
        """m = ‖W + s·B·A‖_row, so that the adapter starts at c = 1."""
        self.lora_magnitude_vector[name] = Parameter(self.get_weight_norm(name))

    def get_weight_norm(self, name: str):
        """n = ‖W + s·B·A‖ per row (D_out,) for adapter ``name`` (PEFT's name)."""
        return self._norm(name).n

    def _norm(self, name: str) -> DoraNorm:
        """n and its parts; a row with n = 0 would make c = m / n = 0 / 0 (PEFT returns NaN): an error."""
        W = self.weight.data
        norm = dora_norm(W, self.lora_A[name].data, self.lora_B[name].data, self.scaling[name],
                         kernels_for(W, self.backend).matmul)
        if not norm.n.all():
            rows = [int(i) for i in get_array_module(norm.n).flatnonzero(norm.n == 0)[:10]]
            raise ValueError(f"{self.label} adapter {name!r}: rows {rows} of W + s·B·A have norm 0 (an all-zero "
                             f"output unit), so DoRA's scale m / ‖W + s·B·A‖ would be 0/0 = NaN; leave that "
                             f"layer out of target_modules or use plain LoRA (use_dora=False)")
        return norm

    def delete_adapter(self, name: str):
        super().delete_adapter(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    # -- merging: W ← c ⊙ (W + s·B·A), undone with the same c --------------------------
    def _merge_one(self, name: str):
        if name not in self.lora_magnitude_vector:
            return super()._merge_one(name)
        W = self.weight
        c = self.lora_magnitude_vector[name].data / self.get_weight_norm(name)      # (D_out,)
        self._merge_scale[name] = c
        W.data = (c[:, None] * (W.data + self.delta_weight(name))).astype(W.dtype)

    def _unmerge_one(self, name: str):
        if name not in self._merge_scale:
            return super()._unmerge_one(name)
        W, c = self.weight, self._merge_scale.pop(name)
        W.data = (W.data / c[:, None] - self.delta_weight(name)).astype(W.dtype)

    # -- forward / backward ------------------------------------------------------------
    def forward(self, x, adapter_names=None):
        """y (N, D_out); see the module docstring. Plain adapters and mixed batches go through LoraLinear."""
        a = self.active_adapter
        mixed = (self.row_adapters if adapter_names is None else adapter_names) is not None
        if mixed or a not in self.lora_magnitude_vector:
            return super().forward(x, adapter_names)
        self._check_input(x, self.in_features, self.weight.dtype)
        if a in self.merged_adapters:
            self._cache = LoraCache(None, None, None, None, fused=False, rows=x.shape[0])   # dx through the base only
            return self.base_layer.forward(x)
        mask = self._dropout_mask(x, a)
        norm = self._norm(a)
        z, h = kernels_for(x, self.backend).lora_forward(x, self.weight.data, self.lora_A[a].data,
                                                         self.lora_B[a].data, self.scaling[a], None, mask)
        self._cache = DoraCache(x, h, z, mask, a, norm)
        y = z * (self.lora_magnitude_vector[a].data / norm.n)             # (N, D_out) ⊙ (D_out,)
        return y + self.bias.data if self.bias is not None else y

    def backward(self, dy):
        cache = self._need_cache()
        if isinstance(cache, DoraMixedCache):
            return self._backward_mixed_dora(dy, cache)
        if not isinstance(cache, DoraCache):
            return super().backward(dy)
        self._cache = None
        k, a = kernels_for(dy, self.backend), cache.adapter
        dz = self._scale_backward(a, dy, cache.z, cache.norm)
        dx, dA, dB = k.lora_backward(dz, cache.x, cache.h, self.weight.data, self.lora_A[a].data,
                                     self.lora_B[a].data, self.scaling[a], True, cache.mask)
        self.lora_A[a].accumulate(dA)
        self.lora_B[a].accumulate(dB)
        self._base_param_grads(k, dz, cache.x)
        self._bias_outside_scale(dy, dz)
        return dx

    def _scale_backward(self, name: str, dy, z, norm: DoraNorm):
        """dz = c ⊙ dy; accumulates dm = g / n and, in the exact mode, n's share of dA, dB (dW)."""
        m = self.lora_magnitude_vector[name]
        g = get_array_module(dy).einsum("ij,ij->j", dy, z)              # (D_out,) Σ_N dy ⊙ z
        m.accumulate(g / norm.n)
        if self.exact_norm_grad:
            self._norm_backward(name, -m.data * g / norm.n**3, norm)
        return dy * (m.data / norm.n)

    def _norm_backward(self, name: str, kappa, norm: DoraNorm):
        """dA += s·(κ⊙B)ᵀ V, dB += s·κ ⊙ (V Aᵀ), dW += κ ⊙ V, without forming V = W + s·B·A for dA, dB."""
        W, A, B, s = self.weight.data, self.lora_A[name].data, self.lora_B[name].data, self.scaling[name]
        mm = kernels_for(W, self.backend).matmul
        kB = kappa[:, None] * B                                          # (D_out, r)
        self.lora_A[name].accumulate(s * mm(kB.T, W) + s * s * mm(mm(kB.T, B), A))   # (r, D_out) @ (D_out, D_in)
        self.lora_B[name].accumulate(s * kappa[:, None] * (norm.WA + s * mm(B, norm.AA)))   # (D_out, r)
        if self.weight.trainable:
            self.weight.accumulate(kappa[:, None] * (W + self.delta_weight(name)))    # (D_out, D_in)

    def _bias_outside_scale(self, dy, dz):
        """The base gradients were taken with dz; b is added after the scale, so db = Σ dy: add Σ (dy − dz)."""
        if self.bias is not None and self.bias.trainable:
            self.bias.accumulate((dy - dz).sum(axis=0))

    # -- mixed batches: the parent's BGMV for z + b, then c on each DoRA adapter's rows ---
    def _forward_mixed(self, x, adapter_names, strict: bool):
        y = super()._forward_mixed(x, adapter_names, strict)             # (N, D_out) = z + b on every row
        mixed, groups = self._cache, []
        xp = get_array_module(x)
        b = self.bias.data if self.bias is not None else 0
        for i, name in enumerate(mixed.names):
            if name not in self.lora_magnitude_vector:
                continue
            rows = xp.nonzero(mixed.index == i)[0]
            norm = self._norm(name)
            z = y[rows] - b                                              # (n_k, D_out)
            y[rows] = z * (self.lora_magnitude_vector[name].data / norm.n) + b
            groups.append(DoraRows(name, rows, z, norm))
        self._cache = DoraMixedCache(mixed, groups)
        return y

    def _backward_mixed_dora(self, dy, cache: DoraMixedCache):
        self._cache = None
        dz = dy.copy()
        for g in cache.groups:
            dz[g.rows] = self._scale_backward(g.adapter, dy[g.rows], g.z, g.norm)
        dx = self._backward_mixed(dz, cache.mixed)
        self._bias_outside_scale(dy, dz)
        return dx

    def extra_repr(self):
        return f"{super().extra_repr()}, dora={list(self.lora_magnitude_vector)}, exact_norm_grad={self.exact_norm_grad}"


def set_exact_norm_grad(model: Module, exact: bool = True) -> Module:
    """Switch every DoraLinear in ``model`` to the exact (True) or detached (False) norm gradient."""
    for _, m in model.named_modules():
        if isinstance(m, DoraLinear):
            m.exact_norm_grad = exact
    return model
