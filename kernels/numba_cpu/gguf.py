"""Numba CPU GGUF kernels: ``reference/gguf.py``'s semantics and block layouts, computed as follows.

    N <= config.NF4_GEMV_MAX_N   gguf_matmul: a fused dequant-GEMV reads each row's blocks as they
                                 are: Q8_0/Q4_0/Q4_1 add (d · q_i) · x_i into 32 lanes and each block's
                                 offset (−8d, m) times Σ x over its 32 weights (summed once per x); Q4_K
                                 sums each sub-block pair. It reads 0.14 (Q4_0) to 0.27 (Q8_0) of the
                                 bytes of a float32 W
    larger N, and dx             dequantize NF4_TILE_ROWS rows of W (NF4_POOL_TILE_ROWS on the pool)
                                 into one float buffer, rows in parallel, then BLAS on it; the full
                                 float W never exists

Q5_0, Q5_1, Q5_K and Q6_K have no kernels here: ``reference``'s functions compute them (``_reference_for``).

The f16 scales are read through a 65536-entry float32 table (exact). Dequantized values are computed
in float32 as the reference computes them (every product is exact, so a fused multiply-add rounds
the same), then widened to the output dtype.
"""
import functools
import inspect

import numba
import numpy as np
from numba import njit, prange

from .. import config, reference, validate
from . import blas, pool

F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)   # bits -> value
_ID = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3}                                       # formats with kernels here


def _reference_for(function):
    """Decorator: a format without a kernel here (not in ``_ID``) runs ``reference``'s function of the same name."""
    signature = inspect.signature(function)

    def wrapper(*args, **kwargs):
        if validate.gguf_qtype(signature.bind(*args, **kwargs).arguments["qtype"]) not in _ID:
            return getattr(reference, function.__name__)(*args, **kwargs)
        return function(*args, **kwargs)
    return functools.wraps(function)(wrapper)


# -- GGUF: a frozen W in llama.cpp's quantized blocks -----------------------------------------
@njit(inline="always")
def _f16(row, p, f16):
    return f16[np.int64(row[p]) | (np.int64(row[p + 1]) << 8)]


@njit(inline="always")
def _k_scale(row, p, s):
    """(sc_s, mn_s), the 6-bit scale and min of sub-block s of the Q4_K block at byte p."""
    if s < 4:
        return row[p + 4 + s] & 63, row[p + 8 + s] & 63
    a, b, c = row[p + 4 + s - 4], row[p + 8 + s - 4], row[p + 12 + s - 4]
    return (c & 15) | ((a >> 6) << 4), (c >> 4) | ((b >> 6) << 4)


@njit
def _dequantize_row(fmt, row, f16, out):
    """out (D_in,) = the row of W held in ``row`` (its blocks' bytes), values in float32."""
    if fmt == 3:                                                     # Q4_K
        for b in range(out.shape[0] // 256):
            p, k = 144 * b, 256 * b
            d, dmin = _f16(row, p, f16), _f16(row, p + 2, f16)
            for g in range(4):
                sc0, mn0 = _k_scale(row, p, 2 * g)
                sc1, mn1 = _k_scale(row, p, 2 * g + 1)
                s0, m0 = d * np.float32(sc0), dmin * np.float32(mn0)
                s1, m1 = d * np.float32(sc1), dmin * np.float32(mn1)
                for j in range(32):
                    q = row[p + 16 + 32 * g + j]
                    out[k + 64 * g + j] = s0 * np.float32(q & 15) - m0
                    out[k + 64 * g + 32 + j] = s1 * np.float32(q >> 4) - m1
        return
    S = (34, 18, 20)[fmt]
    for b in range(out.shape[0] // 32):
        p, k = S * b, 32 * b
        d = _f16(row, p, f16)
        if fmt == 0:                                                 # Q8_0
            for j in range(32):
                out[k + j] = d * np.float32(np.int8(row[p + 2 + j]))
        elif fmt == 1:                                               # Q4_0
            for j in range(16):
                q = row[p + 2 + j]
                out[k + j] = d * (np.float32(q & 15) - np.float32(8))
                out[k + 16 + j] = d * (np.float32(q >> 4) - np.float32(8))
        else:                                                        # Q4_1
            m = _f16(row, p + 2, f16)
            for j in range(16):
                q = row[p + 4 + j]
                out[k + j] = d * np.float32(q & 15) + m
                out[k + 16 + j] = d * np.float32(q >> 4) + m


@pool.jit(cache=True)
def _dequantize_rows(blocks, fmt, f16, o0, out):
    """out[t, :] = row o0 + t of W, for t < out.shape[0]."""
    for t in prange(out.shape[0]):
        _dequantize_row(fmt, blocks[o0 + t], f16, out[t])


GEMV_ROWS = 64              # rows of W per chunk of the GEMV's row loop (one accumulator per chunk)


@pool.jit(cache=True, fastmath=config.NUMBA_FASTMATH)
def _gemv(blocks, qs, fmt, f16, x, sx, y):
    """y[o] = Σ_i x[i]·W[o, i] (x (D_in,), y (D_out,)), reading each row's blocks directly; ``qs`` is ``blocks``
    as int8 (Q8_0's codes), sx (D_in / 32,) the sums of x over each 32 weights; Q8_0, Q4_0 and Q4_1 (fmt 0-2).
    Each block adds (scale · code) · x into an accumulator of 32 lanes, lane by lane (no sum per block), and
    the offsets (Q4_0's −8d, Q4_1's m) once per 32 weights as offset · sx. Codes go through int32 before
    float32: Numba widens integer arithmetic to int64, and the narrow cast lets LLVM convert 8 lanes at once."""
    D_in, D_out = x.shape[0], y.shape[0]
    for c in prange((D_out + GEMV_ROWS - 1) // GEMV_ROWS):
        acc = np.zeros(32, x.dtype)                                  # lanes: a block's 32 weights
        for o in range(c * GEMV_ROWS, min((c + 1) * GEMV_ROWS, D_out)):
            row, codes = blocks[o], qs[o]
            acc[:] = 0
            off = acc[0]
            if fmt == 0:                                             # Q8_0
                for b in range(D_in // 32):
                    p, k = 34 * b, 32 * b
                    d = _f16(row, p, f16)
                    for j in range(32):
                        acc[j] += (d * np.float32(np.int32(codes[p + 2 + j]))) * x[k + j]
            else:                                                    # Q4_0, Q4_1: nibbles after 2 or 4 bytes
                S, at = (18, 2) if fmt == 1 else (20, 4)
                for b in range(D_in // 32):
                    p, k = S * b, 32 * b
                    d = _f16(row, p, f16)
                    off += (_f16(row, p + 2, f16) if fmt == 2 else np.float32(-8) * d) * sx[b]
                    for j in range(16):
                        q = row[p + at + j]
                        acc[j] += (d * np.float32(np.int32(q & 15))) * x[k + j]
                        acc[16 + j] += (d * np.float32(np.int32(q >> 4))) * x[k + 16 + j]
            y[o] = acc.sum() + off


@pool.jit(cache=True, fastmath=config.NUMBA_FASTMATH)
def _gemv_q4_k(blocks, f16, x, y):
    """As ``_gemv`` for Q4_K, summing each pair of sub-blocks of 32 (measured faster here than lanes):
    y[o] = Σ_blocks d · (sc₀ · Σ x·q + sc₁ · Σ x·q) − dmin · (mn₀ · Σ x + mn₁ · Σ x)."""
    D_in = x.shape[0]
    zero = x[0] * 0
    for o in prange(y.shape[0]):
        row, total = blocks[o], zero
        for b in range(D_in // 256):
            p, k = 144 * b, 256 * b
            d, dmin = _f16(row, p, f16), _f16(row, p + 2, f16)
            for g in range(4):
                sc0, mn0 = _k_scale(row, p, 2 * g)
                sc1, mn1 = _k_scale(row, p, 2 * g + 1)
                q0 = q1 = x0 = x1 = zero
                for j in range(32):
                    q = row[p + 16 + 32 * g + j]
                    xa, xb = x[k + 64 * g + j], x[k + 64 * g + 32 + j]
                    q0 += xa * (q & 15)
                    q1 += xb * (q >> 4)
                    x0 += xa
                    x1 += xb
                total += d * (sc0 * q0 + sc1 * q1) - dmin * (mn0 * x0 + mn1 * x1)
        y[o] = total


@_reference_for
def gguf_dequantize(blocks, qtype, shape, dtype="float32"):
    """All rows at once, in parallel (prange over rows of W)."""
    name, D_out, D_in = validate.gguf(blocks, qtype, shape)
    W = np.empty((D_out, D_in), validate.gguf_dtype(dtype))
    _dequantize_rows(np.ascontiguousarray(blocks), _ID[name], F16, 0, W)
    return W


def _tile_rows(D_out):
    """Rows of W per tile: config.NF4_POOL_TILE_ROWS on the pool, config.NF4_TILE_ROWS otherwise; at most D_out."""
    return min(config.NF4_POOL_TILE_ROWS if pool.threads() > 1 else config.NF4_TILE_ROWS, D_out)


@_reference_for
def gguf_matmul(x, blocks, qtype, shape, bias=None):
    """Fused dequant-GEMV for tiny N, else tiles of W and BLAS."""
    name, D_out, D_in = validate.gguf(blocks, qtype, shape)
    validate.gguf_operand("x", x, D_in, bias, D_out)
    blocks, fmt, N = np.ascontiguousarray(blocks), _ID[name], x.shape[0]
    y = np.empty((N, D_out), x.dtype)
    if N <= config.NF4_GEMV_MAX_N:
        x = np.ascontiguousarray(x)
        sx = x.reshape(N, D_in // 32, 32).sum(axis=2)                # (N, D_in / 32)
        for n in range(N):
            if fmt == 3:
                _gemv_q4_k(blocks, F16, x[n], y[n])
            else:
                _gemv(blocks, blocks.view(np.int8), fmt, F16, x[n], sx[n], y[n])
    else:
        T = _tile_rows(D_out)
        buf = np.empty((T, D_in), x.dtype)                 # the only float copy of W: one tile
        for o0 in range(0, D_out, T):
            t = min(T, D_out - o0)
            _dequantize_rows(blocks, fmt, F16, o0, buf[:t])
            y[:, o0:o0 + t] = blas.matmul(x, buf[:t].T)      # (N, D_in) @ (D_in, t)
    if bias is not None:
        y += bias
    return y


@_reference_for
def gguf_matmul_dx(dy, blocks, qtype, shape):
    """Tiles of W and BLAS."""
    name, D_out, D_in = validate.gguf(blocks, qtype, shape)
    validate.gguf_operand("dy", dy, D_out)
    blocks, fmt = np.ascontiguousarray(blocks), _ID[name]
    dx = np.zeros((dy.shape[0], D_in), dy.dtype)
    T = _tile_rows(D_out)
    buf = np.empty((T, D_in), dy.dtype)
    for o0 in range(0, D_out, T):
        t = min(T, D_out - o0)
        _dequantize_rows(blocks, fmt, F16, o0, buf[:t])
        dx += blas.matmul(dy[:, o0:o0 + t], buf[:t])         # (N, t) @ (t, D_in)
    return dx

