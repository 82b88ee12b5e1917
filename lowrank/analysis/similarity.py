"""The LoRA paper's subspace similarity (Hu et al., 2021, Section 7.2 and Figure 3).

Take two adapters' matrices M₁, M₂ (e.g. lora_A of rank 8 and of rank 64, both (r, D_in);
or two ΔW = s·B·A). Let U₁ (D, k₁) and U₂ (D, k₂) hold their top singular directions
(right singular vectors for ``side="right"``, the input space of lora_A; left ones for
``side="left"``). The similarity of the top-i directions of one and the top-j of the other is

    φ(M₁, M₂, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖_F² / min(i, j)      ∈ [0, 1]

which is 1 when one span contains the other and 0 when they are orthogonal. With
G = U₁ᵀ U₂ (k₁, k₂) computed once, the whole grid is a 2-D cumulative sum of G ⊙ G.
"""
from __future__ import annotations

import numpy as np

from ..nn.device import get_array_module


def top_directions(M, k: int | None = None, side: str = "right"):
    """Orthonormal (D, k) basis of ``M``'s top-k singular directions, float64.

    side="right": columns of V (D = M.shape[1]); "left": columns of U (D = M.shape[0]).
    """
    if side not in ("right", "left"):
        raise ValueError(f"top_directions: side must be 'right' or 'left', got {side!r}")
    if getattr(M, "ndim", None) != 2:
        raise ValueError(f"top_directions: expected a 2-D matrix, got shape {tuple(getattr(M, 'shape', ()))}")
    kmax = min(M.shape)
    k = kmax if k is None else k
    if not 1 <= k <= kmax:
        raise ValueError(f"top_directions: k must lie in [1, {kmax}] for a matrix of shape {tuple(M.shape)}, got {k}")
    xp = get_array_module(M)
    U, _, Vt = xp.linalg.svd(xp.asarray(M, dtype=np.float64), full_matrices=False)
    return Vt[:k].T if side == "right" else U[:, :k]          # (D_in, k) or (D_out, k)


def subspace_similarity(U1, U2) -> float:
    """‖U₁ᵀU₂‖_F² / min(k₁, k₂) for orthonormal bases U₁ (D, k₁), U₂ (D, k₂)."""
    if U1.ndim != 2 or U2.ndim != 2 or U1.shape[0] != U2.shape[0]:
        raise ValueError(f"subspace_similarity: bases must be (D, k) with the same D, got "
                         f"{tuple(U1.shape)} and {tuple(U2.shape)}")
    G = U1.T @ U2                                              # (k1, D) @ (D, k2)
    return float((G * G).sum() / min(U1.shape[1], U2.shape[1]))


def similarity_grid(M1, M2, i_max: int | None = None, j_max: int | None = None, side: str = "right"):
    """(i_max, j_max) NumPy grid of φ(M₁, M₂, i, j) for i = 1..i_max, j = 1..j_max."""
    U1 = top_directions(M1, i_max, side)                        # (D, i_max)
    U2 = top_directions(M2, j_max, side)                        # (D, j_max)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"similarity_grid: the {side} singular vectors live in different spaces "
                         f"({U1.shape[0]} vs {U2.shape[0]}) for shapes {tuple(M1.shape)} and {tuple(M2.shape)}")
    G = U1.T @ U2                                               # (i_max, D) @ (D, j_max)
    G = np.asarray(G.get() if hasattr(G, "get") else G)
    overlap = np.cumsum(np.cumsum(G * G, axis=0), axis=1)       # [i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖_F²
    i = np.arange(1, G.shape[0] + 1)[:, None]
    j = np.arange(1, G.shape[1] + 1)[None, :]
    return np.clip(overlap / np.minimum(i, j), 0.0, 1.0)
