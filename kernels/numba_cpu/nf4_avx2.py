"""NF4 codes decoded by AVX2 byte shuffles, 32 in 16 instructions: the N = 1 GEMV and GEMVᵀ,
and the tiles that numba_cpu/nf4.py hands to BLAS for larger N.

A table lookup per weight (``code[q]``) costs Numba a scalar load each; the product it feeds
reads an eighth of a float32 W's bytes, so the lookup, not memory, bounds the kernel. The
16-entry table fits one ``vpshufb`` (a 16-way byte lookup in each 128-bit lane), but a
float32 code has 4 bytes, so the table is kept as 4 byte planes and a code is rebuilt from
4 lookups and 2 rounds of interleaving:

    16 packed bytes, broadcast to both lanes        lane 0: high nibbles (elements 0, 2, .., 30)
    idx   = (bytes >> (4, 0)) & 15                  lane 1: low nibbles  (elements 1, 3, .., 31)
    plane_j = vpshufb(PLANES[j], idx)               byte j of code[q] for 32 codes, j = 0..3
    words = unpack_bytes(plane_0, plane_1), unpack_bytes(plane_2, plane_3)     (lo, hi halves)
    F_k   = unpack_words(...)                       4 x <8 x float32>

F_k holds elements 8k + ORDER of the 32, ORDER = (0, 2, 4, 6, 1, 3, 5, 7), so x is put in
that order once per call (``permute``) and the dot product is 4 FMAs per 32 codes. The
GEMVᵀ for dx keeps its partial sums in the same order and ``unpermute`` puts them back; a
dequantized tile has its columns in that order, so BLAS multiplies it by the permuted x.
Per 32 codes: 1 broadcast load, 1 shift, 1 and, 4 vpshufb, 8 unpacks, 4 FMAs
(``python -m benchmarks.nf4`` times it against the float32 product; ``config.NF4_AVX2`` switches it).

The IR is written with llvmlite inside Numba ``@intrinsic``s (Numba has no vector type and
LLVM has no variable shuffle of its own); the loops around them are plain Numba. x86 only:
``AVAILABLE`` is False unless Numba compiles for this host and the host has AVX2, and
nf4.py then keeps its portable kernels. Rows must be whole blocks of whole 32-code
steps: D_in % blocksize == 0 and blocksize % 32 == 0; float32 only.
"""
import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..common import NF4_CODE
from . import pool
from .llvm_ir import F32, I8, I16, I32, I64
from .llvm_ir import call as _call
from .llvm_ir import splat


def _available(cpu_name, features, disable_jit=False):
    """AVX2 intrinsics compile only when Numba targets this host (no NUMBA_CPU_NAME), the host has
    AVX2, and Numba compiles at all (NUMBA_DISABLE_JIT runs kernels as Python, where IR can't run)."""
    return cpu_name in (None, "host") and bool(features.get("avx2")) and not disable_jit


AVAILABLE = _available(numba.config.CPU_NAME, llvm.get_host_cpu_features(), numba.config.DISABLE_JIT)
STEP = 32                                                   # codes per decode: 16 packed bytes
ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])                  # element of each group of 8 in F_k's lanes
PLANES = NF4_CODE.view(np.uint8).reshape(16, 4).T           # PLANES[j, q] = byte j of code[q] (little endian)

_f32, _i8, _i16, _i32, _i64 = F32, I8, I16, I32, I64
_v8f, _v8i, _v16w, _v16b, _v32b = (ir.VectorType(t, n) for t, n in
                                   ((_f32, 8), (_i32, 8), (_i16, 16), (_i8, 16), (_i8, 32)))


def usable(dtype, D_in, blocksize):
    """Whether this kernel takes a float ``dtype`` product with rows of D_in in blocks of ``blocksize``."""
    return AVAILABLE and np.dtype(dtype) == np.float32 and D_in % blocksize == 0 and blocksize % STEP == 0


def permute(v):
    """v (..., D) with its last axis in the lane order of the decoded codes: v[..., 8g + ORDER[j]]
    moves to 8g + j."""
    return np.ascontiguousarray(v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)[..., ORDER]).reshape(v.shape)


def unpermute(v):
    """The inverse of ``permute``."""
    out = np.empty_like(v)
    out.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)[..., ORDER] = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
    return out


def _unpack(builder, a, b, high):
    """x86 punpck{l,h}{bw,wd}: in each 128-bit lane, interleave the low (or high) halves of a and b."""
    n = a.type.count
    lane, half = n // 2, n // 4
    mask = [j for L in range(2) for i in range(half)
            for j in (L * lane + high * half + i, n + L * lane + high * half + i)]
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, n), mask))


def _decode32(builder, bytes16):
    """16 packed bytes -> 4 x <8 x float>: the codes of elements 8k + ORDER, k = 0..3 (module docstring)."""
    both = builder.shuffle_vector(bytes16, bytes16, ir.Constant(ir.VectorType(_i32, 32), list(range(16)) * 2))
    shifted = builder.lshr(builder.bitcast(both, _v8i), ir.Constant(_v8i, [4] * 4 + [0] * 4))
    idx = builder.and_(builder.bitcast(shifted, _v32b), ir.Constant(_v32b, [15] * 32))
    plane = [_call(builder, "llvm.x86.avx2.pshuf.b", _v32b, ir.Constant(_v32b, [int(v) for v in p] * 2), idx)
             for p in PLANES]
    lo01, hi01 = (builder.bitcast(_unpack(builder, plane[0], plane[1], h), _v16w) for h in (0, 1))
    lo23, hi23 = (builder.bitcast(_unpack(builder, plane[2], plane[3], h), _v16w) for h in (0, 1))
    return [builder.bitcast(_unpack(builder, a, b, h), _v8f) for a, b in ((lo01, lo23), (hi01, hi23)) for h in (0, 1)]


def _fma(builder, a, b, c):
    return _call(builder, "llvm.fma.v8f32", _v8f, a, b, c)


def _row(context, builder, sig, args):
    """Pointers to the row's bytes, to x / out, and to its block scales; the row's block and step counts."""
    packed, p0, v, absmax, a0, n_blocks, steps = args[:7]
    arr = lambda k, a: context.make_array(sig.args[k])(context, builder, a).data   # noqa: E731
    P = builder.gep(arr(0, packed), [p0])
    return P, arr(2, v), builder.gep(arr(3, absmax), [a0]), n_blocks, steps


def _codes(builder, P, step):
    """The 4 decoded <8 x float> of 32-code step ``step`` of the row at P."""
    ptr = builder.gep(P, [builder.mul(step, _i64(STEP // 2))])
    return _decode32(builder, builder.load(builder.bitcast(ptr, _v16b.as_pointer()), align=1))


def _lanes(builder, V, step):
    """Pointers to the 4 <8 x float> of V at 32-code step ``step``."""
    base = builder.mul(step, _i64(STEP))
    return [builder.bitcast(builder.gep(V, [builder.add(base, _i64(8 * k))]), _v8f.as_pointer()) for k in range(4)]


@intrinsic
def _row_dot(typingctx, packed, p0, x, absmax, a0, n_blocks, steps):
    """Σ_b absmax[a0 + b] · Σ_{32-code steps of block b} codes · x (x permuted); packed[p0] starts the row."""
    sig = types.float32(packed, p0, x, absmax, a0, n_blocks, steps)

    def codegen(context, builder, sig, args):
        P, X, A, n_blocks, steps = _row(context, builder, sig, args)
        zero = ir.Constant(_v8f, [0.0] * 8)
        total = cgutils.alloca_once_value(builder, zero)
        acc = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]      # 4 FMA chains per block
        with cgutils.for_range(builder, n_blocks) as blk:
            for a in acc:
                builder.store(zero, a)
            with cgutils.for_range(builder, steps) as s:
                step = builder.add(builder.mul(blk.index, steps), s.index)
                for a, w, xp in zip(acc, _codes(builder, P, step), _lanes(builder, X, step)):
                    builder.store(_fma(builder, w, builder.load(xp, align=4), builder.load(a)), a)
            block = builder.fadd(builder.fadd(builder.load(acc[0]), builder.load(acc[1])),
                                 builder.fadd(builder.load(acc[2]), builder.load(acc[3])))
            scale = builder.load(builder.gep(A, [blk.index]))
            builder.store(_fma(builder, block, splat(builder, scale, 8), builder.load(total)), total)
        t = builder.load(total)
        out = builder.extract_element(t, _i32(0))
        for k in range(1, 8):
            out = builder.fadd(out, builder.extract_element(t, _i32(k)))
        return out
    return sig, codegen


@intrinsic
def _row_axpy(typingctx, packed, p0, out, absmax, a0, n_blocks, steps, g):
    """out += g · absmax[a0 + b] · codes, block by block over the row at packed[p0] (out permuted)."""
    sig = types.void(packed, p0, out, absmax, a0, n_blocks, steps, g)

    def codegen(context, builder, sig, args):
        P, OUT, A, n_blocks, steps = _row(context, builder, sig, args)
        with cgutils.for_range(builder, n_blocks) as blk:
            gs = splat(builder, builder.fmul(args[7], builder.load(builder.gep(A, [blk.index]))), 8)
            with cgutils.for_range(builder, steps) as s:
                step = builder.add(builder.mul(blk.index, steps), s.index)
                for w, op in zip(_codes(builder, P, step), _lanes(builder, OUT, step)):
                    builder.store(_fma(builder, w, gs, builder.load(op, align=4)), op, align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _row_dequantize(typingctx, packed, p0, out, absmax, a0, n_blocks, steps):
    """out = absmax[a0 + b] · codes, block by block over the row at packed[p0] (out permuted)."""
    sig = types.void(packed, p0, out, absmax, a0, n_blocks, steps)

    def codegen(context, builder, sig, args):
        P, OUT, A, n_blocks, steps = _row(context, builder, sig, args)
        with cgutils.for_range(builder, n_blocks) as blk:
            scale = splat(builder, builder.load(builder.gep(A, [blk.index])), 8)
            with cgutils.for_range(builder, steps) as s:
                step = builder.add(builder.mul(blk.index, steps), s.index)
                for w, op in zip(_codes(builder, P, step), _lanes(builder, OUT, step)):
                    builder.store(builder.fmul(w, scale), op, align=4)
        return context.get_dummy_value()
    return sig, codegen


@pool.jit(cache=True)
def dequantize_tile(packed, absmax, D_in, blocksize, o0, out):
    """out[t, :] = row o0 + t of W, columns permuted, for t < out.shape[0] (rows in parallel on the pool)."""
    per_row, steps = D_in // blocksize, blocksize // STEP
    for t in prange(out.shape[0]):
        o = o0 + t
        _row_dequantize(packed, (o * D_in) >> 1, out[t], absmax, o * per_row, per_row, steps)


@pool.jit(cache=True)
def gemv(packed, absmax, x, blocksize, y, chunks):
    """y[o] = Σ_i x[i]·W[o, i] (x (D_in,) permuted, y (D_out,)); rows split into ``chunks`` for threads."""
    D_out, D_in = y.shape[0], x.shape[0]
    per_row, steps = D_in // blocksize, blocksize // STEP
    for c in prange(chunks):
        for o in range(c * D_out // chunks, (c + 1) * D_out // chunks):
            y[o] = _row_dot(packed, (o * D_in) >> 1, x, absmax, o * per_row, per_row, steps)


@pool.jit(cache=True)
def gemv_t(packed, absmax, dy, blocksize, partial):
    """partial[c] = Σ_{o in chunk c} dy[o]·W[o, :] (permuted; partial (chunks, D_in)); dx = Σ_c partial[c]."""
    chunks, D_in = partial.shape
    D_out, per_row, steps = dy.shape[0], D_in // blocksize, blocksize // STEP
    for c in prange(chunks):
        for o in range(c * D_out // chunks, (c + 1) * D_out // chunks):
            _row_axpy(packed, (o * D_in) >> 1, partial[c], absmax, o * per_row, per_row, steps, dy[o])
