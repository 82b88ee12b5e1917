"""The one-row float32 product of numba_cpu: y = x Wᵀ (+ b) for x of one row, W (D_out, D_in) C-contiguous
(``reference/lora.py``'s dense_forward is the equation): a decode step's products at batch 1.

Such a product reads all of W once for 2·D_out·D_in flops, so it runs at the speed W streams from memory.
BLAS's sgemv leaves the loads in flight to the hardware prefetcher; this GEMV also asks for each row's bytes
PREFETCH_BYTES ahead (a hint per 64 bytes read). Written as LLVM IR (``llvm_ir``): ROWS rows of W per pass
over x, 16 floats a step, one FMA per row into its own vector of 16 lanes; the last D_in mod 16 columns by a
masked load (the missing lanes zero); each row's lanes summed as a tree. What it gains is in
docs/performance.md (``python -m benchmarks.decode --stream``, variants gemv and numpy).
W's rows split into chunks over the pool's threads.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import config
from . import pool
from .llvm_ir import F32, I8, I32, I64, array_pointers, call, hsum, lanes_below, pointer, prefetch

ROWS = 2                    # rows of W per pass over x (2 streamed fastest here: 4 and 8 ~8% slower, 1 ~4%)
PREFETCH_BYTES = 8192       # how far ahead in a row the loads are asked for (1024 and 2048 were slower)
LANES = 16
_vf = ir.VectorType(F32, LANES)


def _make_rows_dot(R):
    """An intrinsic rows_dot(W, o, x, y): y[o + r] = Σ_i W[o + r, i]·x[i] for r < R (module docstring)."""

    @intrinsic
    def rows_dot(typingctx, W, o, x, y):
        sig = types.void(W, o, x, y)

        def codegen(context, builder, sig, args):
            (P, _, X, Y), stride = array_pointers(context, builder, sig, args)
            D = cgutils.unpack_tuple(builder, context.make_array(sig.args[2])(context, builder, args[2]).shape, 1)[0]
            byte = I8.as_pointer()
            rows = [builder.bitcast(builder.gep(builder.bitcast(P, byte), [builder.mul(builder.add(args[1], I64(r)),
                                                                                       stride)]), F32.as_pointer())
                    for r in range(R)]
            acc = [cgutils.alloca_once_value(builder, ir.Constant(_vf, [0.0] * LANES)) for _ in range(R)]
            fma = lambda a, b, c: call(builder, "llvm.fma.v16f32", _vf, a, b, c)        # noqa: E731

            def step(j, masked):
                if masked:                                   # lanes j + k < D
                    mask = lanes_below(builder, builder.trunc(builder.sub(D, j), I32), LANES)
                    load = lambda p: call(builder, "llvm.masked.load.v16f32.p0", _vf,   # noqa: E731
                                          pointer(builder, p, j, _vf), I32(4), mask, ir.Constant(_vf, [0.0] * LANES))
                else:
                    load = lambda p: builder.load(pointer(builder, p, j, _vf), align=4)  # noqa: E731
                xv = load(X)
                for r in range(R):
                    if not masked:
                        prefetch(builder, builder.gep(builder.bitcast(builder.gep(rows[r], [j]), byte),
                                                      [I64(PREFETCH_BYTES)]))
                    builder.store(fma(load(rows[r]), xv, builder.load(acc[r])), acc[r])

            with cgutils.for_range(builder, builder.ashr(D, I64(4))) as loop:
                step(builder.shl(loop.index, I64(4)), False)
            tail = builder.and_(D, I64(LANES - 1))
            with builder.if_then(builder.icmp_signed("!=", tail, I64(0))):
                step(builder.sub(D, tail), True)
            for r in range(R):
                builder.store(hsum(builder, builder.load(acc[r])), builder.gep(Y, [builder.add(args[1], I64(r))]))
            return context.get_dummy_value()
        return sig, codegen
    return rows_dot


_rows, _row = _make_rows_dot(ROWS), _make_rows_dot(1)


@pool.jit(cache=True)
def _gemv(W, x, y, chunks):
    """y (D_out,) = W x, W's rows split into ``chunks``."""
    D_out = y.shape[0]
    for c in prange(chunks):
        o, stop = c * D_out // chunks, (c + 1) * D_out // chunks
        while o + ROWS <= stop:
            _rows(W, o, x, y)
            o += ROWS
        while o < stop:
            _row(W, o, x, y)
            o += 1


def usable(x, W) -> bool:
    """Whether ``product`` takes x Wᵀ: one row, float32 on both sides, a C-contiguous W, config.NUMBA_GEMV_IR
    on and Numba compiling."""
    return (x.shape[0] == 1 and x.dtype == np.float32 and W.dtype == np.float32 and W.flags.c_contiguous
            and config.NUMBA_GEMV_IR and not numba.config.DISABLE_JIT)


def product(x, W, bias=None):
    """y = x Wᵀ (+ b), W streamed once: x (1, D_in), W (D_out, D_in) C-contiguous float32 -> y (1, D_out)."""
    D_out = W.shape[0]
    y = np.empty((1, D_out), np.float32)
    _gemv(W, np.ascontiguousarray(x[0]), y[0], pool.chunks(D_out))
    if bias is not None:
        y += bias
    return y
