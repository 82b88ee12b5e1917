"""Numba CPU NF4 (QLoRA) kernels: ``reference/nf4.py``'s semantics and layout, computed as follows.

    N <= config.NF4_GEMV_MAX_N   fused dequant-GEMV (and GEMVᵀ for dx): each row of W is read
                                 as 4-bit codes, y[o] = Σ_blocks absmax_b · Σ_{i in b} x_i·code[q_i]
                                 (an eighth of the bytes of a float32 W). float32 rows of whole
                                 32-code blocks on an AVX2 CPU: nf4_avx2 (byte-shuffle decode).
                                 Otherwise, rows of whole blocks of whole 4-byte groups decode a
                                 block 8 codes at a time into a small buffer and dot it with x;
                                 other layouts go element by element (dx: through the tile path).
    larger N                     dequantize NF4_TILE_ROWS rows of W (NF4_POOL_TILE_ROWS on the
                                 pool) into one buffer (rows on the pool;
                                 AVX2 shuffles where the GEMV above takes them, x's columns put in
                                 the decoder's order), then BLAS on it; the full float W never exists

A row of W is walked block segment by block segment: blocks start at even flat indices
(blocksize is even), so only a row that starts at an odd index (odd D_in) begins with a
lone low nibble, and a segment can end with a lone high nibble; everything between is
whole bytes, two codes each.
"""
import numba
import numpy as np
from numba import njit, prange

from .. import config, validate
from ..common import NF4_CODE
from . import blas, nf4_avx2, pool


# -- NF4 (QLoRA): a 4-bit frozen W ----------------------------------------------------------
@njit
def _dequantize_row(packed, absmax, code, k0, blocksize, out):
    """out (D_in,) = the row of W whose first element has flat index k0."""
    D_in, i = out.shape[0], 0
    while i < D_in:
        blk = (k0 + i) // blocksize
        stop = min(D_in, (blk + 1) * blocksize - k0)       # end of this block within the row
        a = absmax[blk]
        if (k0 + i) & 1:                                   # a row starting mid-byte
            out[i] = code[packed[(k0 + i) >> 1] & 15] * a
            i += 1
        j0, pairs = (k0 + i) >> 1, (stop - i) >> 1
        for j in range(pairs):                             # whole bytes: two codes each
            byte = packed[j0 + j]
            out[i + 2 * j] = code[byte >> 4] * a
            out[i + 2 * j + 1] = code[byte & 15] * a
        i += 2 * pairs
        if i < stop:                                       # a segment ending mid-byte
            out[i] = code[packed[(k0 + i) >> 1] >> 4] * a
            i += 1


@pool.jit(cache=True)
def _dequantize_rows(packed, absmax, code, D_in, blocksize, o0, out):
    """out[t, :] = row o0 + t of W, for t < out.shape[0]."""
    for t in prange(out.shape[0]):
        _dequantize_row(packed, absmax, code, (o0 + t) * D_in, blocksize, out[t])


@pool.jit(cache=True, fastmath=config.NUMBA_FASTMATH)
def _gemv(packed, absmax, code, x, blocksize, zero, y):
    """y[o] = Σ_i x[i]·W[o, i] (x (D_in,), y (D_out,)), any layout: element by element."""
    D_in = x.shape[0]
    for o in prange(y.shape[0]):
        k0, total, i = o * D_in, zero, 0
        while i < D_in:
            blk = (k0 + i) // blocksize
            stop = min(D_in, (blk + 1) * blocksize - k0)
            acc = zero
            while i < stop:
                k = k0 + i
                q = np.int64(packed[k >> 1])
                acc += x[i] * code[(q & 15) if k & 1 else (q >> 4)]
                i += 1
            total += acc * absmax[blk]
        y[o] = total


@pool.jit(cache=True, fastmath=config.NUMBA_FASTMATH)
def _gemv_aligned(packed, absmax, code, x, blocksize, zero, y, chunks):
    """As _gemv when every row is whole blocks of whole 4-byte groups (D_in % blocksize == 0,
    blocksize % 8 == 0): decode a block's codes 8 at a time into a small buffer, then a SIMD dot."""
    D_in, D_out = x.shape[0], y.shape[0]
    per_row, half = D_in // blocksize, blocksize // 2
    for c in prange(chunks):
        buf = np.empty(blocksize, code.dtype)
        for o in range(c * D_out // chunks, (c + 1) * D_out // chunks):
            total = zero
            for b in range(per_row):
                p = (o * D_in + b * blocksize) >> 1
                for j in range(0, half, 4):                # 4 bytes = 8 codes per step
                    b0, b1, b2, b3 = packed[p + j], packed[p + j + 1], packed[p + j + 2], packed[p + j + 3]
                    buf[2 * j], buf[2 * j + 1] = code[b0 >> 4], code[b0 & 15]
                    buf[2 * j + 2], buf[2 * j + 3] = code[b1 >> 4], code[b1 & 15]
                    buf[2 * j + 4], buf[2 * j + 5] = code[b2 >> 4], code[b2 & 15]
                    buf[2 * j + 6], buf[2 * j + 7] = code[b3 >> 4], code[b3 & 15]
                acc = zero
                for i in range(blocksize):
                    acc += x[b * blocksize + i] * buf[i]
                total += acc * absmax[o * per_row + b]
            y[o] = total


@pool.jit(cache=True, fastmath=config.NUMBA_FASTMATH)
def _gemv_t_aligned(packed, absmax, code, dy, blocksize, partial):
    """partial[c] = Σ_{o in chunk c} dy[o]·W[o, :] (dy (D_out,), partial (chunks, D_in)), same layout
    as _gemv_aligned; dx = Σ_c partial[c]."""
    chunks, D_in = partial.shape
    D_out, per_row, half = dy.shape[0], D_in // blocksize, blocksize // 2
    for c in prange(chunks):
        buf = np.empty(blocksize, code.dtype)
        for o in range(c * D_out // chunks, (c + 1) * D_out // chunks):
            for b in range(per_row):
                p = (o * D_in + b * blocksize) >> 1
                for j in range(half):
                    byte = packed[p + j]
                    buf[2 * j], buf[2 * j + 1] = code[byte >> 4], code[byte & 15]
                g = dy[o] * absmax[o * per_row + b]
                for i in range(blocksize):
                    partial[c, b * blocksize + i] += g * buf[i]


def nf4_dequantize(packed, absmax, shape, blocksize=64, dtype="float32"):
    """All rows at once, in parallel (prange over rows of W)."""
    D_out, D_in = validate.nf4(packed, absmax, shape, blocksize)
    if np.dtype(dtype) not in validate.NF4_FLOATS:
        raise TypeError(f"NF4: dtype must be float32 or float64, got {np.dtype(dtype)}")
    W = np.empty((D_out, D_in), dtype)
    _dequantize_rows(packed, absmax, NF4_CODE.astype(dtype), D_in, int(blocksize), 0, W)
    return W


def _tile_rows(D_out):
    """Rows of W per tile: config.NF4_POOL_TILE_ROWS on the pool (each tile's product is cut over the
    threads), config.NF4_TILE_ROWS otherwise; at most D_out."""
    return min(config.NF4_POOL_TILE_ROWS if pool.threads() > 1 else config.NF4_TILE_ROWS, D_out)


def _tile(avx2, packed, absmax, code, D_in, blocksize, o0, out):
    """Rows o0 .. o0 + len(out) of W into out, rows in parallel on the pool: AVX2 shuffles (columns
    permuted) or lookups."""
    if avx2:
        nf4_avx2.dequantize_tile(packed, absmax, D_in, blocksize, o0, out)
    else:
        _dequantize_rows(packed, absmax, code, D_in, blocksize, o0, out)


def nf4_matmul(x, packed, absmax, shape, blocksize=64, bias=None):
    """Fused dequant-GEMV for tiny N, else tiles of W and BLAS."""
    D_out, D_in = validate.nf4(packed, absmax, shape, blocksize)
    validate.nf4_operand("x", x, D_in, bias, D_out)
    N, bs, code = x.shape[0], int(blocksize), NF4_CODE.astype(x.dtype)
    avx2 = config.NF4_AVX2 and nf4_avx2.usable(x.dtype, D_in, bs)
    x = nf4_avx2.permute(x) if avx2 else np.ascontiguousarray(x)    # the AVX2 decoder's column order
    y = np.empty((N, D_out), x.dtype)
    if N <= config.NF4_GEMV_MAX_N:
        zero, chunks = x.dtype.type(0), 4 * numba.get_num_threads()
        for n in range(N):
            if avx2:
                nf4_avx2.gemv(packed, absmax, x[n], bs, y[n], chunks)
            elif D_in % bs == 0 and bs % 8 == 0:
                _gemv_aligned(packed, absmax, code, x[n], bs, zero, y[n], chunks)
            else:
                _gemv(packed, absmax, code, x[n], bs, zero, y[n])
    else:
        T = _tile_rows(D_out)
        buf = np.empty((T, D_in), x.dtype)                 # the only float copy of W: one tile
        for o0 in range(0, D_out, T):
            t = min(T, D_out - o0)
            _tile(avx2, packed, absmax, code, D_in, bs, o0, buf[:t])
            y[:, o0:o0 + t] = blas.matmul(x, buf[:t].T)      # (N, D_in) @ (D_in, t)
    if bias is not None:
        y += bias
    return y


def nf4_matmul_dx(dy, packed, absmax, shape, blocksize=64):
    """Fused GEMVᵀ for tiny N over rows of whole blocks, else tiles of W and BLAS."""
    D_out, D_in = validate.nf4(packed, absmax, shape, blocksize)
    validate.nf4_operand("dy", dy, D_out)
    N, bs, code = dy.shape[0], int(blocksize), NF4_CODE.astype(dy.dtype)
    avx2 = config.NF4_AVX2 and nf4_avx2.usable(dy.dtype, D_in, bs)
    dx = np.zeros((N, D_in), dy.dtype)                    # columns in the AVX2 decoder's order if avx2
    if N <= config.NF4_GEMV_MAX_N and D_in % bs == 0 and bs % 8 == 0:
        dy = np.ascontiguousarray(dy)
        for n in range(N):
            partial = np.zeros((min(numba.get_num_threads(), D_out), D_in), dy.dtype)
            if avx2:
                nf4_avx2.gemv_t(packed, absmax, dy[n], bs, partial)
            else:
                _gemv_t_aligned(packed, absmax, code, dy[n], bs, partial)
            dx[n] = partial.sum(axis=0)
    else:
        T = _tile_rows(D_out)
        buf = np.empty((T, D_in), dy.dtype)
        for o0 in range(0, D_out, T):
            t = min(T, D_out - o0)
            _tile(avx2, packed, absmax, code, D_in, bs, o0, buf[:t])
            dx += blas.matmul(dy[:, o0:o0 + t], buf[:t])     # (N, t) @ (t, D_in)
    return nf4_avx2.unpermute(dx) if avx2 else dx
