"""Numba CPU GGUF kernels: ``reference/gguf.py``'s semantics and block layouts, computed as follows.

    N <= config.NF4_GEMV_MAX_N   gguf_matmul: a fused dequant-GEMV reads each row's blocks as they
                                 are: Σ_b d_b · (Σ q·x over block b), plus each block's offset (−8d, m)
                                 times Σ x over its 32 weights (summed once per x); Q4_K forms each
                                 weight in float32 as the reference does. It reads 0.14 (Q4_0) to 0.27
                                 (Q8_0) of the bytes of a float32 W. Q8_0/Q4_0/Q4_1 in float32: LLVM vector IR, IR_ROWS rows
                                 per pass over x (config.GGUF_VECTOR_IR); otherwise Numba loops
    larger N, and dx             dequantize NF4_TILE_ROWS rows of W (NF4_POOL_TILE_ROWS on the pool)
                                 into one float buffer, rows in parallel (float32 Q8_0/Q4_0/Q4_1: the
                                 same vector IR), then BLAS on it; the full float W never exists

    gguf_matmul_q8 (llama.cpp's arithmetic, x rounded to Q8_0): Q4_0/Q4_1 by integer dots (``gguf_vnni``)

Q5_0, Q5_1, Q5_K and Q6_K have no kernels here: ``reference``'s functions compute them (``_reference_for``).

The f16 scales are read through a 65536-entry float32 table (exact), or in the IR by fpext from half.
Dequantized values are computed in float32 as the reference computes them (every product is exact,
so a fused multiply-add rounds the same), then widened to the output dtype.
"""
import functools
import inspect

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import config, reference, validate
from ..common import round_q8_0
from . import blas, gguf_vnni, nf4_avx2, pool
from .llvm_ir import F16 as _f16t
from .llvm_ir import F32 as _f32
from .llvm_ir import I8 as _i8
from .llvm_ir import I32 as _i32
from .llvm_ir import I64 as _i64
from .llvm_ir import array_pointers as _arrays
from .llvm_ir import call as _call
from .llvm_ir import prefetch as _prefetch
from .llvm_ir import splat

F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)   # bits -> value
_ID = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3}                                       # formats with kernels here


def _reference_for(function):
    """Decorator: a format without a kernel here (not in ``_ID``) runs ``reference``'s function of the same name."""
    at = list(inspect.signature(function).parameters).index("qtype")     # found once: a bind per call is slow

    def wrapper(*args, **kwargs):
        if validate.gguf_qtype(args[at] if len(args) > at else kwargs["qtype"]) not in _ID:
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


# Q8_0, Q4_0 and Q4_1 in float32 as LLVM vector IR (with config.GGUF_VECTOR_IR; otherwise the loops above).
# Numba has no vector type, and its loops over a block's bytes widen each code to int64 and keep 32 lanes in
# memory. Written as IR, a block of 32 codes is 16-lane vectors: byte loads widened to int32 (Q4: low nibbles
# by a mask, high by a shift), converted to float, 2 FMAs against x and 1 by the scale d; R rows share each
# load of x. Generic LLVM (vector loads, zext/sext, sitofp, llvm.fma, fpext from half) compiles on any host;
# with AVX-512 (``PERMPS``) a nibble becomes its float, (q − 8) for Q4_0, by one vpermps from a 16-entry
# table (the low nibble needs no mask: vpermps reads the index's low 4 bits), so Q4_0 has no offset term.
# For Q4_0/Q4_1 each block step also prefetches PREFETCH_BYTES ahead in one of the R rows in turn: R interleaved
# row streams from a weight larger than the cache otherwise wait on memory (Q8_0 gained too little to pay for it).
LANES = 16                                                   # floats per vector: a block is 2 of them
_vf, _vi, _vb = (ir.VectorType(t, LANES) for t in (_f32, _i32, _i8))
IR_ROWS = 4                                                  # rows of W per pass over x (a power of 2)
PREFETCH_BYTES = 8192                                        # how far ahead in a row the GEMV asks for its bytes
PERMPS = nf4_avx2.AVAILABLE and bool(llvm.get_host_cpu_features().get("avx512f"))


def _load_f16(builder, P, at):
    """The little-endian f16 at byte at of P, as float32 (exact)."""
    p = builder.bitcast(builder.gep(P, [_i64(at)]), _f16t.as_pointer())
    return builder.fpext(builder.load(p, align=1), _f32)


def _splat_f16(builder, P):
    """The f16 at byte pointer P in every lane of a float vector: converted after the splat, so that AVX-512 FP16
    does it in one vcvtph2psx from memory."""
    return builder.fpext(splat(builder, builder.load(builder.bitcast(P, _f16t.as_pointer()), align=1), LANES), _vf)


def _codes(builder, kind, P):
    """The 32 codes of the block at byte pointer P as 2 float vectors (elements 0-15, 16-31); kind 0 Q8_0,
    1 Q4_0, 2 Q4_1 (q), 3 Q4_0 and 4 Q4_1 by vpermps (kind 3: q − 8)."""
    def load(at):
        return builder.load(builder.bitcast(builder.gep(P, [_i64(at)]), _vb.as_pointer()), align=1)
    if kind == 0:                                            # Q8_0: 32 signed bytes after d
        return [builder.sitofp(builder.sext(load(2 + LANES * k), _vi), _vf) for k in range(2)]
    w = builder.zext(load(2 if kind in (1, 3) else 4), _vi)  # byte j holds q_j (low nibble) and q_{j+16}
    hi = builder.lshr(w, ir.Constant(_vi, [4] * LANES))
    if kind >= 3:
        table = ir.Constant(_vf, [float(q - 8 * (kind == 3)) for q in range(16)])
        return [_call(builder, "llvm.x86.avx512.permvar.sf.512", _vf, table, v) for v in (w, hi)]
    return [builder.sitofp(v, _vf) for v in (builder.and_(w, ir.Constant(_vi, [15] * LANES)), hi)]


def _vector_at(builder, F, b, k):
    """A <LANES x float> pointer to floats 32b + LANES·k of the float pointer F."""
    return builder.bitcast(builder.gep(F, [builder.add(builder.shl(b, _i64(5)), _i64(LANES * k))]), _vf.as_pointer())


def _make_rows_dot(kind, R):
    """An intrinsic rows_dot(blocks, o, x, sx, y): y[o + r] = Σ_i x[i]·W[o + r, i] for r < R, float32 (D_in = 32k):
    Σ_b d_b · (Σ q·x) over each block b (``_codes``' q), plus Q4_0's −8·d_b (kind 1) or Q4_1's m_b times sx[b],
    the sum of x over block b."""
    S, at_m = (34, 18, 20, 18, 20)[kind], 2 if kind in (2, 4) else None

    @intrinsic
    def rows_dot(typingctx, blocks, o, x, sx, y):
        sig = types.void(blocks, o, x, sx, y)

        def codegen(context, builder, sig, args):
            (B, _, X, SX, Y), stride = _arrays(context, builder, sig, args)
            n_blocks = builder.ashr(cgutils.unpack_tuple(builder, context.make_array(sig.args[2])(
                context, builder, args[2]).shape, 1)[0], _i64(5))
            rows = [builder.gep(B, [builder.mul(builder.add(args[1], _i64(r)), stride)]) for r in range(R)]
            acc = [cgutils.alloca_once_value(builder, ir.Constant(_vf, [0.0] * LANES)) for _ in range(R)]
            off = [cgutils.alloca_once_value(builder, _f32(0.0)) for _ in range(R)]
            fma = lambda a, b, c: _call(builder, f"llvm.fma.v{LANES}f32", _vf, a, b, c)  # noqa: E731
            with cgutils.for_range(builder, n_blocks) as loop:
                b = loop.index
                xs = [builder.load(_vector_at(builder, X, b, k), align=4) for k in range(2)]
                sxb = builder.load(builder.gep(SX, [b]))
                if kind:                                     # Q4: prefetch one row in turn, a line per R blocks
                    r = builder.and_(b, _i64(R - 1))
                    at = builder.add(builder.mul(builder.add(args[1], r), stride), builder.mul(b, _i64(S)))
                    _prefetch(builder, builder.gep(B, [builder.add(at, _i64(PREFETCH_BYTES))]))
                for r in range(R):
                    P = builder.gep(rows[r], [builder.mul(b, _i64(S))])
                    q = _codes(builder, kind, P)
                    v = fma(q[1], xs[1], builder.fmul(q[0], xs[0]))
                    builder.store(fma(v, _splat_f16(builder, P), builder.load(acc[r])), acc[r])
                    if kind in (1, 2, 4):                    # the offset: −8·d (Q4_0) or m (Q4_1), times Σ x
                        c = builder.fmul(_load_f16(builder, P, 0), _f32(-8.0)) if kind == 1 else \
                            _load_f16(builder, P, at_m)
                        builder.store(_call(builder, "llvm.fma.f32", _f32, c, sxb, builder.load(off[r])), off[r])
            for r in range(R):
                t = builder.load(acc[r])
                total = builder.load(off[r])
                for k in range(LANES):
                    total = builder.fadd(total, builder.extract_element(t, _i32(k)))
                builder.store(total, builder.gep(Y, [builder.add(args[1], _i64(r))]))
            return context.get_dummy_value()
        return sig, codegen
    return rows_dot


def _make_row_dequantize(kind):
    """An intrinsic row_dequantize(blocks, o, out): out (D_in,) float32 = row o of W, bit-exact to the reference
    (each product d · q is exact in float32, so Q4_1's fma(q, d, m) rounds as d · q + m does)."""
    S, at_m = (34, 18, 20, 18, 20)[kind], 2 if kind in (2, 4) else None

    @intrinsic
    def row_dequantize(typingctx, blocks, o, out):
        sig = types.void(blocks, o, out)

        def codegen(context, builder, sig, args):
            (B, _, OUT), stride = _arrays(context, builder, sig, args)
            n_blocks = builder.ashr(cgutils.unpack_tuple(builder, context.make_array(sig.args[2])(
                context, builder, args[2]).shape, 1)[0], _i64(5))
            row = builder.gep(B, [builder.mul(args[1], stride)])
            with cgutils.for_range(builder, n_blocks) as loop:
                b = loop.index
                P = builder.gep(row, [builder.mul(b, _i64(S))])
                d = splat(builder, _load_f16(builder, P, 0), LANES)
                for k, q in enumerate(_codes(builder, kind, P)):
                    if kind == 1:
                        q = builder.fsub(q, ir.Constant(_vf, [8.0] * LANES))
                    if at_m is None:
                        w = builder.fmul(q, d)
                    else:
                        m = splat(builder, _load_f16(builder, P, at_m), LANES)
                        w = _call(builder, f"llvm.fma.v{LANES}f32", _vf, q, d, m)
                    builder.store(w, _vector_at(builder, OUT, b, k), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return row_dequantize


# The kinds compiled: without AVX-512 no vpermps can compile, and kinds 3 and 4 (never asked for) are 1 and 2.
_KINDS = range(5) if PERMPS else (0, 1, 2, 1, 2)
_deq0, _deq1, _deq2, _deq3, _deq4 = (_make_row_dequantize(k) for k in _KINDS)


@pool.jit(cache=True)
def _dequantize_rows_ir(blocks, kind, o0, out):
    """out[t, :] = row o0 + t of W (float32; ``_codes``'s kind), for t < out.shape[0]."""
    for t in prange(out.shape[0]):
        if kind == 0:
            _deq0(blocks, o0 + t, out[t])
        elif kind == 1:
            _deq1(blocks, o0 + t, out[t])
        elif kind == 2:
            _deq2(blocks, o0 + t, out[t])
        elif kind == 3:
            _deq3(blocks, o0 + t, out[t])
        else:
            _deq4(blocks, o0 + t, out[t])


def _tile(blocks, fmt, o0, out):
    """Rows o0 .. o0 + len(out) of W into out: the vector IR for float32 Q8_0/Q4_0/Q4_1, else Numba's loops."""
    if fmt < 3 and out.dtype == np.float32 and _ir_ok():
        _dequantize_rows_ir(blocks, _kind(fmt), o0, out)
    else:
        _dequantize_rows(blocks, fmt, F16, o0, out)


def _ir_ok():
    """Whether the vector IR kernels run: config.GGUF_VECTOR_IR, and Numba compiles."""
    return config.GGUF_VECTOR_IR and not numba.config.DISABLE_JIT


def _kind(fmt):
    """``_codes``'s kind of format fmt (0-2): vpermps's for Q4_0 and Q4_1 where ``PERMPS``."""
    return fmt + 2 * (PERMPS and fmt > 0)


_rows0, _rows1, _rows2, _rows3, _rows4 = (_make_rows_dot(k, IR_ROWS) for k in _KINDS)
_row0, _row1, _row2, _row3, _row4 = (_make_rows_dot(k, 1) for k in _KINDS)


@njit(inline="always")
def _dot_rows(kind, blocks, o, x, sx, y):
    """IR_ROWS rows from o by the intrinsic of ``kind``."""
    if kind == 0:
        _rows0(blocks, o, x, sx, y)
    elif kind == 1:
        _rows1(blocks, o, x, sx, y)
    elif kind == 2:
        _rows2(blocks, o, x, sx, y)
    elif kind == 3:
        _rows3(blocks, o, x, sx, y)
    else:
        _rows4(blocks, o, x, sx, y)


@njit(inline="always")
def _dot_row(kind, blocks, o, x, sx, y):
    """Row o by the intrinsic of ``kind``."""
    if kind == 0:
        _row0(blocks, o, x, sx, y)
    elif kind == 1:
        _row1(blocks, o, x, sx, y)
    elif kind == 2:
        _row2(blocks, o, x, sx, y)
    elif kind == 3:
        _row3(blocks, o, x, sx, y)
    else:
        _row4(blocks, o, x, sx, y)


@pool.jit(cache=True)
def _gemv_ir(blocks, kind, x, sx, y, chunks):
    """y[o] = Σ_i x[i]·W[o, i] (x (D_in,), y (D_out,) float32; ``_codes``'s kind), IR_ROWS rows per pass
    over x; rows split into ``chunks`` for the pool's threads."""
    D_out = y.shape[0]
    for c in prange(chunks):
        o, stop = c * D_out // chunks, (c + 1) * D_out // chunks
        while o + IR_ROWS <= stop:
            _dot_rows(kind, blocks, o, x, sx, y)
            o += IR_ROWS
        while o < stop:
            _dot_row(kind, blocks, o, x, sx, y)
            o += 1


@pool.jit(cache=True, fastmath=config.NUMBA_FASTMATH)
def _gemv_q4_k(blocks, f16, x, y):
    """As ``_gemv`` for Q4_K: y[o] = Σ x · w, each weight w = (d·sc)·q − dmin·mn rounded to float32 as the
    reference computes it (a factored d·(sc·Σ x·q) − dmin·(mn·Σ x) would skip that rounding)."""
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
                s0, m0 = d * np.float32(sc0), dmin * np.float32(mn0)
                s1, m1 = d * np.float32(sc1), dmin * np.float32(mn1)
                for j in range(32):
                    q = row[p + 16 + 32 * g + j]
                    total += x[k + 64 * g + j] * (s0 * np.float32(q & 15) - m0)
                    total += x[k + 64 * g + 32 + j] * (s1 * np.float32(q >> 4) - m1)
        y[o] = total


@_reference_for
def gguf_dequantize(blocks, qtype, shape, dtype="float32"):
    """All rows at once, in parallel (prange over rows of W)."""
    name, D_out, D_in = validate.gguf(blocks, qtype, shape)
    W = np.empty((D_out, D_in), validate.gguf_dtype(dtype))
    _tile(np.ascontiguousarray(blocks), _ID[name], 0, W)
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
        ir_ok = x.dtype == np.float32 and _ir_ok()
        chunks = pool.chunks(D_out)
        for n in range(N):
            if fmt == 3:
                _gemv_q4_k(blocks, F16, x[n], y[n])
            elif ir_ok:
                _gemv_ir(blocks, _kind(fmt), x[n], sx[n], y[n], chunks)
            else:
                _gemv(blocks, blocks.view(np.int8), fmt, F16, x[n], sx[n], y[n])
    else:
        T = _tile_rows(D_out)
        buf = np.empty((T, D_in), x.dtype)                 # the only float copy of W: one tile
        for o0 in range(0, D_out, T):
            t = min(T, D_out - o0)
            _tile(blocks, fmt, o0, buf[:t])
            y[:, o0:o0 + t] = blas.matmul(x, buf[:t].T)      # (N, D_in) @ (D_in, t)
    if bias is not None:
        y += bias
    return y


def gguf_matmul_q8(x, blocks, qtype, shape, bias=None):
    """Q4_0 and Q4_1 with float32 x of N <= config.GGUF_Q8_MAX_N rows: integer dots by AVX-512 VNNI
    (``gguf_vnni``); otherwise x rounded as the reference rounds it, then ``gguf_matmul``."""
    name, D_out, D_in = validate.gguf(blocks, qtype, shape)
    validate.gguf_operand("x", x, D_in, bias, D_out)
    if not (name in ("Q4_0", "Q4_1") and x.dtype == np.float32 and x.shape[0] <= config.GGUF_Q8_MAX_N
            and gguf_vnni.AVAILABLE and _ir_ok()):
        return gguf_matmul(round_q8_0(x).astype(x.dtype), blocks, qtype, shape, bias)
    y = np.empty((x.shape[0], D_out), np.float32)
    gguf_vnni.gemv(np.ascontiguousarray(blocks), _ID[name], np.ascontiguousarray(x), y, pool.chunks(D_out))
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
        _tile(blocks, fmt, o0, buf[:t])
        dx += blas.matmul(dy[:, o0:o0 + t], buf[:t])         # (N, t) @ (t, D_in)
    return dx
