"""``gguf_matmul_q8``'s GEMV for Q4_0 and Q4_1 as llama.cpp computes it: integer dots of x's Q8_0 codes
against the weight's nibbles by VNNI (vpdpbusd: 32 unsigned bytes times 32 signed bytes, summed by 4 into 8
int32 lanes), written as LLVM vector IR because Numba has no vector type.

256-bit vectors, not 512: a decode step runs Python and small kernels between its GEMVs, and after such a gap
the cores here run 512-bit instructions slowly for a while (their upper lanes powered up again): the same
121 calls of a 135M-shape step took 9.5-10.4 ms with 100 us of scalar work before each against 7.1-7.7 back
to back in 512-bit form, 7.1-7.9 against 6.1-6.8 in this form (``_round_rows`` too stays within 256 bits).

x's side, once per row of x (``_round_rows``): each block b of 32 values becomes 32 int8 codes q_x and its
scale f16(d_x) (``common.round_q8_0``'s arithmetic, the same float32 operations, so the same codes), then the
codes of 4 blocks at a time (a group, 128 weights) are laid out as the weight's bytes hold theirs:

    xg[g]   (128 int8)   block 4g+k's codes 0-15 at 16k (against low nibbles), codes 16-31 at 64 + 16k (high)
    cg[g]   (16 int32)   lane 4k+l: Σ of the 8 codes lane l of block 4g+k meets (4l..4l+3 and 16+4l..16+4l+3)
    sg[g]   (16 float32) lane 4k+l: f16(d_x) of block 4g+k
    a last group short of 4 blocks is padded with zero codes and scales

The weight's side, per row and half group (2 blocks: xg's 32 bytes at 32h and 64 + 32h, cg's and sg's lanes
8h..8h+7): one load of its 36 (Q4_0) or 40 (Q4_1) bytes, one byte shuffle gathering its 32 nibble bytes, low
nibbles by a mask and high by a shift, two vpdpbusd, the 2 f16 scales (and Q4_1's 2 mins) spread to 4 lanes
each by a word shuffle, and one FMA into a float accumulator:

    Q4_0   lane += f16(d_W) f16(d_x) · (Σ q_W q_x − 8 Σ q_x)       (−8 Σ q_x: the vpdpbusd's start, cg · −8)
    Q4_1   lane += f16(d_W) f16(d_x) · Σ q_W q_x  +  m_W · f16(d_x) Σ q_x

A row whose blocks end short of a whole group reads its last halves by masked loads (the missing bytes zero, so
their scales are 0, never a NaN from another row's bytes). IR_ROWS rows share each load of x; each row asks for
its bytes PREFETCH_BYTES ahead; each row's 8 lanes are summed as a tree. Needs AVX-512 VNNI, VL and BW
(``AVAILABLE``: vpdpbusd on 256-bit vectors is AVX-512 VL's).
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
_v8i, _v8f = ir.VectorType(_i32, 8), ir.VectorType(_f32, 8)
_v32b, _v32i = ir.VectorType(_i8, 32), ir.VectorType(_i32, 32)
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
        for h in range(0, 32, 16):                       # 16 at a time: LLVM keeps the packing in 256-bit vectors
            for j in range(h, h + 16):
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
    docstring), each group of 4 blocks as two halves of 2 blocks in 256-bit vectors; a last group of nb mod 4
    blocks is read by masked loads, its missing bytes zero."""
    S, at_q, at_m = _FORMATS[fmt]
    nibbles = ir.Constant(_v32i, [S * k + at_q + j for k in range(2) for j in range(16)])   # of a half's 2S bytes
    spread = lambda at: ir.Constant(_v8i, [(S * (i // 4) + at) // 2 for i in range(8)])   # noqa: E731
    tail = ir.VectorType(_i8, 2 * S - 32)                                                # a half's bytes past 32

    @intrinsic
    def rows_dot(typingctx, blocks, o, nb, xg, cg, sg, y):
        sig = types.void(blocks, o, nb, xg, cg, sg, y)

        def codegen(context, builder, sig, args):
            (B, _, _, XG, CG, SG, Y), stride = _arrays(context, builder, sig, args)
            nb = args[2]
            rows = [builder.gep(B, [builder.mul(builder.add(args[1], _i64(r)), stride)]) for r in range(R)]
            acc = [cgutils.alloca_once_value(builder, ir.Constant(_v8f, [0.0] * 8)) for _ in range(R)]
            dot = lambda c, a, b: _call(builder, "llvm.x86.avx512.vpdpbusd.256", _v8i,   # noqa: E731
                                        c, builder.bitcast(a, _v8i), b)
            fma = lambda a, b, c: _call(builder, "llvm.fma.v8f32", _v8f, a, b, c)   # noqa: E731
            halves = lambda v, at: builder.fpext(builder.bitcast(builder.shuffle_vector(   # noqa: E731
                v, ir.Constant(v.type, ir.Undefined), spread(at)), ir.VectorType(_f16t, 8)), _v8f)
            clamp = lambda n: builder.select(builder.icmp_signed("<", n, _i64(0)), _i64(0), n)   # noqa: E731

            def half(g, h, valid):
                """Blocks 2h, 2h+1 of group g in every row; ``valid``: how many of their 2S bytes exist (None: all)."""
                at = builder.add(builder.mul(g, _i64(128)), _i64(32 * h))
                xlo = builder.load(_ptr(builder, XG, at, _v8i), align=1)                          # low-nibble codes
                xhi = builder.load(_ptr(builder, XG, builder.add(at, _i64(64)), _v8i), align=1)    # high-nibble codes
                lane = builder.add(builder.mul(g, _i64(16)), _i64(8 * h))
                c = builder.load(_ptr(builder, CG, lane, _v8i), align=4)                           # Σ q_x by lane
                s = builder.load(_ptr(builder, SG, lane, _v8f), align=4)                           # f16(d_x)
                start = builder.mul(c, ir.Constant(_v8i, [-8] * 8)) if fmt == 1 else ir.Constant(_v8i, [0] * 8)
                sx = builder.fmul(builder.sitofp(c, _v8f), s) if fmt == 2 else None
                for r in range(R):
                    P = builder.gep(rows[r], [builder.add(builder.mul(g, _i64(4 * S)), _i64(2 * S * h))])
                    if valid is None:
                        _prefetch(builder, builder.gep(P, [_i64(PREFETCH_BYTES)]))
                        A = builder.load(builder.bitcast(P, _v32b.as_pointer()), align=1)          # bytes 0-31
                        Bt = builder.load(builder.bitcast(builder.gep(P, [_i64(32)]), tail.as_pointer()), align=1)
                        Bw = builder.shuffle_vector(Bt, ir.Constant(tail, ir.Undefined), ir.Constant(
                            _v32i, list(range(2 * S - 32)) + [0] * (64 - 2 * S)))
                    else:
                        masked = lambda p, n: _call(builder, "llvm.masked.load.v32i8.p0", _v32b,   # noqa: E731
                                                    builder.bitcast(p, _v32b.as_pointer()), _i32(1),
                                                    lanes_below(builder, builder.trunc(n, _i8), 32),
                                                    ir.Constant(_v32b, [0] * 32))
                        A = masked(P, valid)
                        Bw = masked(builder.gep(P, [_i64(32)]), clamp(builder.sub(valid, _i64(32))))
                    v = builder.shuffle_vector(A, Bw, nibbles)
                    lo = builder.and_(v, ir.Constant(_v32b, [15] * 32))
                    hi = builder.lshr(v, ir.Constant(_v32b, [4] * 32))
                    a = dot(dot(start, lo, xlo), hi, xhi)                                          # (8,) int32
                    words = builder.bitcast(A, ir.VectorType(_i16, 16))
                    t = fma(builder.sitofp(a, _v8f), builder.fmul(halves(words, 0), s), builder.load(acc[r]))
                    if fmt == 2:
                        t = fma(halves(words, at_m), sx, t)
                    builder.store(t, acc[r])

            with cgutils.for_range(builder, builder.ashr(nb, _i64(2))) as loop:
                half(loop.index, 0, None)
                half(loop.index, 1, None)
            rest = builder.mul(builder.and_(nb, _i64(3)), _i64(S))                   # bytes of a short last group
            with builder.if_then(builder.icmp_signed("!=", rest, _i64(0))):
                g = builder.ashr(nb, _i64(2))
                half(g, 0, builder.select(builder.icmp_signed(">", rest, _i64(2 * S)), _i64(2 * S), rest))
                half(g, 1, clamp(builder.sub(rest, _i64(2 * S))))
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
