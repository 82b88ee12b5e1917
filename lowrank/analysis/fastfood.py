"""Fastfood: a random D × d projection applied in O(L log L) time and O(L) memory.

Letters: d the subspace dimension, D the number of model parameters (d ≤ D), and
L = 2^⌈log₂ D⌉, the size D is padded to. As in Li et al. (2018), "Measuring the
Intrinsic Dimension of Objective Landscapes", after Le, Sarlós & Smola (2013):

    M = H G Π H B / √(L · ‖G‖²)                                      (L, L)
        H   the Walsh–Hadamard matrix (Sylvester order, entries ±1; H Hᵀ = L·I)
        B   diag of random signs ±1        Π  a random permutation
        G   diag of N(0, 1) draws
    P = √(L / D) · M[:D, :d]                                          (D, d)

so P z pads z with zeros to length L, applies M, keeps the first D entries and rescales.

What this makes true (tested in tests/analysis/test_fastfood.py):
- every row and every column of M has unit norm exactly (H/√L is orthogonal, B and Π
  are signed permutations, and the only scaling, G, is divided out by ‖G‖);
- E_G[PᵀP] = I_d: each entry of M has mean square 1/L, so a column of P has unit norm on
  average, and distinct columns are orthogonal on average, as for the dense projection
  with unit-norm Gaussian columns. P is orthogonal-like, not orthogonal;
- the backward pass is the transpose, Pᵀ v = (M[:D, :d])ᵀ v · √(L/D) with
  Mᵀ = B H Πᵀ G H / √(L‖G‖²) (H and the diagonals are symmetric), also O(L log L).

The Walsh–Hadamard transform ``fwht`` uses H_L = H_{L/32} ⊗ H₃₂: the five finest levels are
one (L/32, 32) @ (32, 32) product (BLAS; short strided butterflies are slow in NumPy), the
other log₂(L/32) levels are in-place butterflies on contiguous rows, two levels per pass.
For a fixed block of 32 that is still O(L log L).
"""
from __future__ import annotations

import numpy as np

from ..nn.device import get_array_module

FINE = 32            # fwht does its finest log₂ 32 = 5 levels as one product with H₃₂ (BLAS)


def _butterflies(Y, start: int = 1):
    """In place: Y (n, m) ← (H_{n/start} ⊗ I_start) Y, the levels h = start, 2·start, … of H_n
    (Sylvester order); n and start powers of 2, Y contiguous.

    Two levels per pass (radix 4): for quarters a, b, c, d of each block of 4h rows,
    H₄ (a, b, c, d) = (a+b+c+d, a−b+c−d, a+b−c−d, a−b−c+d); one last radix-2 level when
    log₂(n / start) is odd. Half the passes over memory of one level at a time.
    """
    xp = get_array_module(Y)
    n, m = Y.shape
    h = start
    while 4 * h <= n:
        v = Y.reshape(n // (4 * h), 4, h * m)        # rows q·4h + s·h + t, for s = 0..3
        a, b, c, d = v[:, 0], v[:, 1], v[:, 2], v[:, 3]
        s1, d1, s2, d2 = a + b, a - b, c + d, c - d
        xp.add(s1, s2, out=a)
        xp.add(d1, d2, out=b)
        xp.subtract(s1, s2, out=c)
        xp.subtract(d1, d2, out=d)
        h *= 4
    if 2 * h == n:
        top, bottom = Y[:h], Y[h:]
        diff = top - bottom
        top += bottom
        bottom[...] = diff


def fwht(x):
    """H x along axis 0 for x (L,) or (L, k), L a power of 2; unnormalised (H Hᵀ = L·I)."""
    L = x.shape[0]
    if L < 1 or L & (L - 1):
        raise ValueError(f"fwht: the length along axis 0 must be a power of 2, got {L}")
    xp = get_array_module(x)
    m = min(FINE, L)
    k = int(np.prod(x.shape[1:], dtype=np.int64))
    X = x.reshape(L // m, m, k).transpose(0, 2, 1).reshape(L // m * k, m)      # row (q, c): x[q·m + t, c]
    H = xp.asarray(_hadamard(m), dtype=x.dtype)
    Y = xp.ascontiguousarray((X @ H).reshape(L // m, k, m).transpose(0, 2, 1))  # H_m on t: (L/m·k, m) @ (m, m)
    Y = Y.reshape(L, k)
    _butterflies(Y, start=m)                                                   # H_{L/m} on q
    return Y.reshape(x.shape)


def _hadamard(m: int):
    """The Sylvester-ordered Hadamard matrix H_m (m, m), entries ±1."""
    H = np.ones((1, 1))
    while H.shape[0] < m:
        H = np.block([[H, H], [H, -H]])
    return H


class Fastfood:
    """P (D, d) = √(L/D) · (H G Π H B / √(L‖G‖²))[:D, :d]; see the module docstring.

    Parameters
    ----------
    D, d : int          the parameter count and the subspace dimension, 1 ≤ d ≤ D
    seed : int          draws B, Π and G
    dtype, xp           the dtype and array module (numpy or cupy) of the vectors it maps
    """

    def __init__(self, D: int, d: int, seed: int = 0, dtype=np.float32, xp=np):
        if not 1 <= d <= D:
            raise ValueError(f"Fastfood: need 1 <= d <= D, got d={d}, D={D}")
        self.D, self.d = int(D), int(d)
        self.L = 1 << max(self.D - 1, 0).bit_length()                # 2^⌈log₂ D⌉
        rng = np.random.default_rng(seed)
        signs = rng.integers(0, 2, self.L) * 2 - 1
        self.perm = xp.asarray(rng.permutation(self.L))
        gauss = rng.standard_normal(self.L)
        self.B, self.G = xp.asarray(signs, dtype=dtype), xp.asarray(gauss, dtype=dtype)
        self.norm = float(np.sqrt(self.L * (gauss ** 2).sum()))          # √(L‖G‖²)
        self.row_scale = float(np.sqrt(self.L / self.D))                # √(L/D)
        self.dtype, self.xp = np.dtype(dtype), xp

    @property
    def shape(self) -> tuple:
        return (self.D, self.d)

    def matvec(self, z):
        """P z (D,) for z (d,)."""
        if z.shape != (self.d,):
            raise ValueError(f"Fastfood.matvec: z must have shape ({self.d},), got {tuple(z.shape)}")
        u = self.xp.zeros(self.L, self.dtype)
        u[:self.d] = z                                   # pad to L
        u = fwht(self.B * u)                             # H B z
        u = self.G * u[self.perm]                        # G Π H B z
        u = fwht(u)                                      # H G Π H B z
        return u[:self.D] * (self.row_scale / self.norm)

    def rmatvec(self, v):
        """Pᵀ v (d,) for v (D,): the backward of ``matvec``."""
        if v.shape != (self.D,):
            raise ValueError(f"Fastfood.rmatvec: v must have shape ({self.D},), got {tuple(v.shape)}")
        u = self.xp.zeros(self.L, self.dtype)
        u[:self.D] = v                                   # pad to L
        u = self.G * fwht(u)                             # G H v
        w = self.xp.empty_like(u)
        w[self.perm] = u                                 # Πᵀ G H v
        u = self.B * fwht(w)                             # B H Πᵀ G H v
        return u[:self.d] * (self.row_scale / self.norm)
