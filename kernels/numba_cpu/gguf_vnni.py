"""``gguf_matmul_q8``'s GEMV for Q4_0 and Q4_1 as llama.cpp computes it: integer dots of x's Q8_0 codes
against the weight's nibbles by AVX-512 VNNI (vpdpbusd: 64 unsigned bytes times 64 signed bytes, summed
by 4 into 16 int32 lanes), written as LLVM vector IR because Numba has no vector type.

x's side, once per row of x (``_round_rows``): each block b of 32 values becomes 32 int8 codes q_x and its
scale f16(d_x) (``common.round_q8_0``'s arithmetic, the same float32 operations, so the same codes), then the
codes of 4 blocks at a time (a group, 128 weights) are laid out as the weight's bytes hold theirs:

    xg[g]   (128 int8)   block 4g+k's codes 0-15 at 16k (against low nibbles), codes 16-31 at 64 + 16k (high)
    cg[g]   (16 int32)   lane 4k+l: Σ of the 8 codes lane l of block 4g+k meets (4l..4l+3 and 16+4l..16+4l+3)
    sg[g]   (16 float32) lane 4k+l: f16(d_x) of block 4g+k
    a last group short of 4 blocks is padded with zero codes and scales

The weight's side, per row and group: one load of the group's 72 (Q4_0) or 80 (Q4_1) bytes, one byte shuffle
(vpermt2b) gathering its 64 nibble bytes, low nibbles by a mask and high by a shift, two vpdpbusd, the 4 f16
scales (and Q4_1's 4 mins) spread to 4 lanes each by a word shuffle, and one FMA into a float accumulator:

    Q4_0   lane += f16(d_W) f16(d_x) · (Σ q_W q_x − 8 Σ q_x)       (−8 Σ q_x: the vpdpbusd's start, cg · −8)
    Q4_1   lane += f16(d_W) f16(d_x) · Σ q_W q_x  +  m_W · f16(d_x) Σ q_x

A row whose blocks end short of a whole group reads its last group by a masked load (the missing bytes zero, so
their scales are 0, never a NaN from another row's bytes). IR_ROWS rows share each load of x; each row asks for
its bytes PREFETCH_BYTES ahead; each row's 16 lanes are summed as a tree. Needs AVX-512 VNNI, VL and BW
(``AVAILABLE``).
"""
import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import pool
from .llvm_ir import F16 as _f16t
from .llvm_ir import F32 as _f32
from .llvm_ir import I8 as _i8
from .llvm_ir import I16 as _i16
from .llvm_ir import I32 as _i32
from .llvm_ir import I64 as _i64
from .llvm_ir import array_pointers as _arrays
from .llvm_ir import call as _call
from .llvm_ir import hsum, lanes_below
from .llvm_ir import pointer as _ptr
from .llvm_ir import prefetch as _prefetch

_features = llvm.get_host_cpu_features()
AVAILABLE = all(_features.get(f) for f in ("avx512vnni", "avx512vl", "avx512bw"))
IR_ROWS = 4                 # rows of W per pass over x's codes
PREFETCH_BYTES = 8192       # how far ahead in a row the GEMV asks for its bytes (1024 streamed slower: docs/files.md)
_v16i, _v16f, _v64b = ir.VectorType(_i32, 16), ir.VectorType(_f32, 16), ir.VectorType(_i8, 64)
_FORMATS = {1: (18, 2, None), 2: (20, 4, 2)}     # fmt (Q4_0, Q4_1): (block bytes, nibbles at, f16 m at)


@intrinsic
def _f16_round(typingctx, x):
    """float32 x rounded to half and back (round to nearest even, as NumPy's astype(float16))."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.fptrunc(args[0], _f16t), _f32)
    return types.float32(types.float32), codegen


@njit(inline="always")
def _round_away(v):
    """round(v), ties away from zero, exactly (gguf's np_roundf)."""
    a = abs(v)
    q = np.floor(a) + np.floor(np.float32(2) * (a - np.floor(a)))
    return q if v >= 0 else -q


@njit(cache=True)
def _round_rows(x, xt, xg, cg, sg):
    """The Q8_0 codes of x (D_in,) float32 into xt (D_in / 32, 32), laid out in xg, cg, sg (module docstring);
    a last group short of 4 blocks is padded with zeros."""
    nb = xt.shape[0]
    xg[-1, :], cg[-1, :], sg[-1, :] = 0, 0, 0
    for b in range(nb):
        amax = np.float32(0)
        for j in range(32):
            amax = max(amax, abs(x[32 * b + j]))
        d = amax / np.float32(127)
        inv = np.float32(1) / d if d != 0 else np.float32(0)
        d16 = _f16_round(d)
        for j in range(32):
            xt[b, j] = np.int8(_round_away(x[32 * b + j] * inv))
        g, k = b // 4, b % 4
        xg[g, 16 * k:16 * k + 16] = xt[b, :16]
        xg[g, 64 + 16 * k:80 + 16 * k] = xt[b, 16:]
        for l in range(4):
            cg[g, 4 * k + l] = (np.int32(xt[b, 4 * l]) + xt[b, 4 * l + 1] + xt[b, 4 * l + 2] + xt[b, 4 * l + 3]
                                + xt[b, 16 + 4 * l] + xt[b, 17 + 4 * l] + xt[b, 18 + 4 * l] + xt[b, 19 + 4 * l])
            sg[g, 4 * k + l] = d16


def _make_rows_dot(fmt, R):
    """An intrinsic rows_dot(blocks, o, nb, xg, cg, sg, y): y[o + r] for r < R, rows of nb blocks (module
    docstring); a last group of nb mod 4 blocks is read by a masked load, its missing bytes zero."""
    S, at_q, at_m = _FORMATS[fmt]
    nibbles = [S * k + at_q + j for k in range(4) for j in range(16)]        # group bytes 0..4S of the nibbles
    spread = lambda at: ir.Constant(_v16i, [(S * (i // 4) + at) // 2 for i in range(16)])   # noqa: E731
    _v64i = ir.VectorType(_i32, 64)

    @intrinsic
    def rows_dot(typingctx, blocks, o, nb, xg, cg, sg, y):
        sig = types.void(blocks, o, nb, xg, cg, sg, y)

        def codegen(context, builder, sig, args):
            (B, _, _, XG, CG, SG, Y), stride = _arrays(context, builder, sig, args)
            nb = args[2]
            rows = [builder.gep(B, [builder.mul(builder.add(args[1], _i64(r)), stride)]) for r in range(R)]
            acc = [cgutils.alloca_once_value(builder, ir.Constant(_v16f, [0.0] * 16)) for _ in range(R)]
            dot = lambda c, a, b: _call(builder, "llvm.x86.avx512.vpdpbusd.512", _v16i,   # noqa: E731
                                        c, builder.bitcast(a, _v16i), b)
            fma = lambda a, b, c: _call(builder, "llvm.fma.v16f32", _v16f, a, b, c)   # noqa: E731
            halves = lambda v, at: builder.fpext(builder.bitcast(builder.shuffle_vector(   # noqa: E731
                v, ir.Constant(v.type, ir.Undefined), spread(at)), ir.VectorType(_f16t, 16)), _v16f)
            rest = ir.VectorType(_i8, 4 * S - 64)

            def group(g, masked):
                """Group g of every row: whole (two loads), or the last one short of 4 blocks (one masked load)."""
                xlo = builder.load(_ptr(builder, XG, builder.mul(g, _i64(128)), _v16i), align=1)
                xhi = builder.load(_ptr(builder, XG, builder.add(builder.mul(g, _i64(128)), _i64(64)), _v16i), align=1)
                c = builder.load(_ptr(builder, CG, builder.mul(g, _i64(16)), _v16i), align=4)      # Σ q_x by lane
                s = builder.load(_ptr(builder, SG, builder.mul(g, _i64(16)), _v16f), align=4)      # f16(d_x)
                start = builder.mul(c, ir.Constant(_v16i, [-8] * 16)) if fmt == 1 else ir.Constant(_v16i, [0] * 16)
                sx = builder.fmul(builder.sitofp(c, _v16f), s) if fmt == 2 else None
                if masked:                                   # bytes < (nb mod 4)·S of the group
                    mask = lanes_below(builder, builder.trunc(builder.mul(builder.and_(nb, _i64(3)), _i64(S)), _i32), 64)
                for r in range(R):
                    P = builder.gep(rows[r], [builder.mul(g, _i64(4 * S))])
                    if masked:
                        A = _call(builder, "llvm.masked.load.v64i8.p0", _v64b, builder.bitcast(P, _v64b.as_pointer()),
                                  _i32(1), mask, ir.Constant(_v64b, [0] * 64))
                        Bw = ir.Constant(_v64b, [0] * 64)
                    else:
                        _prefetch(builder, builder.gep(P, [_i64(PREFETCH_BYTES)]))
                        A = builder.load(builder.bitcast(P, _v64b.as_pointer()), align=1)          # bytes 0-63
                        Bt = builder.load(builder.bitcast(builder.gep(P, [_i64(64)]), rest.as_pointer()), align=1)
                        Bw = builder.shuffle_vector(Bt, ir.Constant(rest, ir.Undefined), ir.Constant(
                            _v64i, list(range(4 * S - 64)) + [0] * (128 - 4 * S)))
                    v = builder.shuffle_vector(A, Bw, ir.Constant(_v64i, nibbles))
                    lo = builder.and_(v, ir.Constant(_v64b, [15] * 64))
                    hi = builder.lshr(v, ir.Constant(_v64b, [4] * 64))
                    a = dot(dot(start, lo, xlo), hi, xhi)                                          # (16,) int32
                    words = builder.bitcast(A, ir.VectorType(_i16, 32))
                    t = fma(builder.sitofp(a, _v16f), builder.fmul(halves(words, 0), s), builder.load(acc[r]))
                    if fmt == 2:
                        t = fma(halves(words, at_m), sx, t)
                    builder.store(t, acc[r])

            with cgutils.for_range(builder, builder.ashr(nb, _i64(2))) as loop:
                group(loop.index, False)
            with builder.if_then(builder.icmp_signed("!=", builder.and_(nb, _i64(3)), _i64(0))):
                group(builder.ashr(nb, _i64(2)), True)
            for r in range(R):
                builder.store(hsum(builder, builder.load(acc[r])), builder.gep(Y, [builder.add(args[1], _i64(r))]))
            return context.get_dummy_value()
        return sig, codegen
    return rows_dot


if AVAILABLE:
    _rows1, _row1 = _make_rows_dot(1, IR_ROWS), _make_rows_dot(1, 1)
    _rows2, _row2 = _make_rows_dot(2, IR_ROWS), _make_rows_dot(2, 1)
else:                                                # never called: ``gemv`` is not run without VNNI
    _rows1 = _row1 = _rows2 = _row2 = njit(lambda *args: None)


@pool.jit(cache=True)
def gemv(blocks, fmt, x, y, chunks):
    """y (N, D_out) = round_q8_0(x) · Wᵀ for x (N, D_in) float32 C-contiguous, W Q4_0 (fmt 1) or Q4_1 (fmt 2):
    each row of x rounded and laid out (``_round_rows``), then W's rows split into ``chunks``."""
    nb, D_out = x.shape[1] // 32, y.shape[1]
    ng = (nb + 3) // 4
    xt, xg = np.empty((nb, 32), np.int8), np.empty((ng, 128), np.int8)
    cg, sg = np.empty((ng, 16), np.int32), np.empty((ng, 16), np.float32)
    for n in range(x.shape[0]):
        _round_rows(x[n], xt, xg, cg, sg)
        yn = y[n]
        for c in prange(chunks):
            o, stop = c * D_out // chunks, (c + 1) * D_out // chunks
            while o + IR_ROWS <= stop:
                if fmt == 1:
                    _rows1(blocks, o, nb, xg, cg, sg, yn)
                else:
                    _rows2(blocks, o, nb, xg, cg, sg, yn)
                o += IR_ROWS
            while o < stop:
                if fmt == 1:
                    _row1(blocks, o, nb, xg, cg, sg, yn)
                else:
                    _row2(blocks, o, nb, xg, cg, sg, yn)
                o += 1
