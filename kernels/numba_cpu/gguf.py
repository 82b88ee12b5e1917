"""Numba CPU GGUF kernels: ``reference/gguf.py``'s semantics and block layouts, computed as follows.

    N <= config.NF4_GEMV_MAX_N   gguf_matmul: a fused dequant-GEMV reads each row's blocks as they
                                 are, y[o] = Σ_blocks d_b · Σ_{i in b} x_i·q_i (+ the block's offset
                                 times Σ x_i for Q4_1 and Q4_K): 0.14 (Q4_0) to 0.27 (Q8_0) of the
                                 bytes of a float32 W
    larger N, and dx             dequantize NF4_TILE_ROWS rows of W (NF4_POOL_TILE_ROWS on the pool)
                                 into one float buffer, rows in parallel, then BLAS on it; the full
                                 float W never exists

The f16 scales are read through a 65536-entry float32 table (exact). Dequantized values are computed
in float32 as the reference computes them (every product is exact, so a fused multiply-add rounds
the same), then widened to the output dtype.
"""
import numba
import numpy as np
from numba import njit, prange

from .. import config, validate
from . import blas, pool

F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)   # bits -> value
_ID = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3}


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


@pool.jit(cache=True, fastmath=config.NUMBA_FASTMATH)
def _gemv(blocks, fmt, f16, x, y):
    """y[o] = Σ_i x[i]·W[o, i] (x (D_in,), y (D_out,)), reading each row's blocks directly."""
    D_in = x.shape[0]
    zero = x[0] * 0
    for o in prange(y.shape[0]):
        row, total = blocks[o], zero
        if fmt == 3:                                                 # Q4_K: 8 sub-blocks of 32 per block
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
        elif fmt == 0:                                               # Q8_0
            for b in range(D_in // 32):
                p, k, acc = 34 * b, 32 * b, zero
                for j in range(32):
                    acc += x[k + j] * np.int8(row[p + 2 + j])
                total += _f16(row, p, f16) * acc
        else:                                                        # Q4_0, Q4_1: nibbles after 2 or 4 bytes
            S, at = (18, 2) if fmt == 1 else (20, 4)
            for b in range(D_in // 32):
                p, k, acc, sx = S * b, 32 * b, zero, zero
                for j in range(16):
                    q = row[p + at + j]
                    xa, xb = x[k + j], x[k + 16 + j]
                    acc += xa * (q & 15) + xb * (q >> 4)
                    sx += xa + xb
                d = _f16(row, p, f16)
                total += d * acc + (_f16(row, p + 2, f16) if fmt == 2 else np.float32(-8) * d) * sx
        y[o] = total


def gguf_dequantize(blocks, qtype, shape, dtype="float32"):
    """All rows at once, in parallel (prange over rows of W)."""
    name, D_out, D_in = validate.gguf(blocks, qtype, shape)
    W = np.empty((D_out, D_in), validate.gguf_dtype(dtype))
    _dequantize_rows(np.ascontiguousarray(blocks), _ID[name], F16, 0, W)
    return W


def _tile_rows(D_out):
    """Rows of W per tile: config.NF4_POOL_TILE_ROWS on the pool, config.NF4_TILE_ROWS otherwise; at most D_out."""
    return min(config.NF4_POOL_TILE_ROWS if pool.threads() > 1 else config.NF4_TILE_ROWS, D_out)


def gguf_matmul(x, blocks, qtype, shape, bias=None):
    """Fused dequant-GEMV for tiny N, else tiles of W and BLAS."""
    name, D_out, D_in = validate.gguf(blocks, qtype, shape)
    validate.gguf_operand("x", x, D_in, bias, D_out)
    blocks, fmt, N = np.ascontiguousarray(blocks), _ID[name], x.shape[0]
    y = np.empty((N, D_out), x.dtype)
    if N <= config.NF4_GEMV_MAX_N:
        x = np.ascontiguousarray(x)
        for n in range(N):
            _gemv(blocks, fmt, F16, x[n], y[n])
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

