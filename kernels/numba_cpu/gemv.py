"""The few-row float32 product of numba_cpu: y = x Wᵀ (+ b) for 1 to config.NUMBA_SMALL_M rows of x, W (D_out,
D_in) C-contiguous (``reference/lora.py``'s dense_forward is the equation): a decode step's products, one row per
sequence of the batch.

Such a product reads all of W once for 2·N·D_out·D_in flops, so at a few rows it runs at the speed W streams
from memory. BLAS's sgemv leaves the loads in flight to the hardware prefetcher, and its GEMM packs W first;
this product asks for each row's bytes PREFETCH_BYTES ahead (a hint per 64 bytes read) and reads each step of
W once for up to 4 rows of x. Written as LLVM IR (``llvm_ir``): ROWS rows of W per pass, 16 floats a step, one
FMA per (row of W, row of x) into its own vector of 16 lanes; x's rows 4 at a time (a second group of 4 reads
the same rows of W again, from L1) and the 1 to 3 left; the last D_in mod 16 columns by a masked load (the
missing lanes zero); each sum's lanes added as a tree. What it gains is in docs/performance.md (``python -m
benchmarks.decode --stream``, variants gemv and numpy; ``python -m benchmarks.decode`` for the few-row cells).
W's rows split into chunks over the pool's threads.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import config
from . import pool
from .llvm_ir import F32, I8, I32, I64, array_pointers, call, hsum, lanes_below, pointer, prefetch

ROWS = 2                    # rows of W per pass over x (2 streamed fastest here: 4 and 8 ~8% slower, 1 ~4%)
PREFETCH_BYTES = 8192       # how far ahead in a row the loads are asked for (1024 and 2048 were slower)
LANES = 16
_vf = ir.VectorType(F32, LANES)


def _make_rows_dot(R, M):
    """An intrinsic rows_dot(W, o, x, n, y): y[n + m, o + r] = Σ_i W[o + r, i]·x[n + m, i] for r < R, m < M
    (module docstring): each step's R vectors of W times M vectors of x into R·M accumulators."""

    @intrinsic
    def rows_dot(typingctx, W, o, x, n, y):
        sig = types.void(W, o, x, n, y)

        def codegen(context, builder, sig, args):
            (P, _, X, _, Y), stride = array_pointers(context, builder, sig, args)
            xa, ya = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (2, 4))
            D = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
            x_stride = cgutils.unpack_tuple(builder, xa.strides, 2)[0]
            y_stride = cgutils.unpack_tuple(builder, ya.strides, 2)[0]
            byte = I8.as_pointer()
            at_row = lambda base, row, step: builder.bitcast(builder.gep(builder.bitcast(base, byte),   # noqa: E731
                                                                         [builder.mul(row, step)]), F32.as_pointer())
            rows = [at_row(P, builder.add(args[1], I64(r)), stride) for r in range(R)]
            xs = [at_row(X, builder.add(args[3], I64(m)), x_stride) for m in range(M)]
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(_vf, [0.0] * LANES)) for _ in range(M)]
                   for _ in range(R)]
            fma = lambda a, b, c: call(builder, "llvm.fma.v16f32", _vf, a, b, c)        # noqa: E731

            def step(j, masked):
                if masked:                                   # lanes j + k < D
                    mask = lanes_below(builder, builder.trunc(builder.sub(D, j), I32), LANES)
                    load = lambda p: call(builder, "llvm.masked.load.v16f32.p0", _vf,   # noqa: E731
                                          pointer(builder, p, j, _vf), I32(4), mask, ir.Constant(_vf, [0.0] * LANES))
                else:
                    load = lambda p: builder.load(pointer(builder, p, j, _vf), align=4)  # noqa: E731
                w = []
                for r in range(R):
                    if not masked:
                        prefetch(builder, builder.gep(builder.bitcast(builder.gep(rows[r], [j]), byte),
                                                      [I64(PREFETCH_BYTES)]))
                    w.append(load(rows[r]))
                for m in range(M):
                    xv = load(xs[m])
                    for r in range(R):
                        builder.store(fma(w[r], xv, builder.load(acc[r][m])), acc[r][m])

            with cgutils.for_range(builder, builder.ashr(D, I64(4))) as loop:
                step(builder.shl(loop.index, I64(4)), False)
            tail = builder.and_(D, I64(LANES - 1))
            with builder.if_then(builder.icmp_signed("!=", tail, I64(0))):
                step(builder.sub(D, tail), True)
            for m in range(M):
                y_row = at_row(Y, builder.add(args[3], I64(m)), y_stride)
                for r in range(R):
                    builder.store(hsum(builder, builder.load(acc[r][m])),
                                  builder.gep(y_row, [builder.add(args[1], I64(r))]))
            return context.get_dummy_value()
        return sig, codegen
    return rows_dot


_rows1, _rows2, _rows3, _rows4 = (_make_rows_dot(ROWS, M) for M in range(1, 5))
_row1, _row2, _row3, _row4 = (_make_rows_dot(1, M) for M in range(1, 5))


@njit(inline="always")
def _dots(W, o, x, y, R):
    """y[:, o .. o + R) for every row of x, 4 rows of x at a time (R: ROWS or 1, a constant where inlined)."""
    N, n = x.shape[0], 0
    while n + 4 <= N:
        if R == ROWS:
            _rows4(W, o, x, n, y)
        else:
            _row4(W, o, x, n, y)
        n += 4
    left = N - n
    if left == 1:
        if R == ROWS:
            _rows1(W, o, x, n, y)
        else:
            _row1(W, o, x, n, y)
    elif left == 2:
        if R == ROWS:
            _rows2(W, o, x, n, y)
        else:
            _row2(W, o, x, n, y)
    elif left == 3:
        if R == ROWS:
            _rows3(W, o, x, n, y)
        else:
            _row3(W, o, x, n, y)


@pool.jit(cache=True)
def _gemv(W, x, y, chunks):
    """y (N, D_out) = x Wᵀ, W's rows split into ``chunks``."""
    D_out = y.shape[1]
    for c in prange(chunks):
        o, stop = c * D_out // chunks, (c + 1) * D_out // chunks
        while o + ROWS <= stop:
            _dots(W, o, x, y, ROWS)
            o += ROWS
        while o < stop:
            _dots(W, o, x, y, 1)
            o += 1


def usable(x, W) -> bool:
    """Whether ``product`` takes x Wᵀ: 1 to config.NUMBA_SMALL_M rows, float32 on both sides, a C-contiguous W,
    config.NUMBA_GEMV_IR on and Numba compiling."""
    return (1 <= x.shape[0] <= config.NUMBA_SMALL_M and x.dtype == np.float32 and W.dtype == np.float32
            and W.flags.c_contiguous
            and config.NUMBA_GEMV_IR and not numba.config.DISABLE_JIT)


def product(x, W, bias=None):
    """y = x Wᵀ (+ b), W streamed once: x (N, D_in), W (D_out, D_in) C-contiguous float32 -> y (N, D_out)."""
    N, D_out = x.shape[0], W.shape[0]
    y = np.empty((N, D_out), np.float32)
    _gemv(W, np.ascontiguousarray(x), y, pool.chunks(D_out))
    if bias is not None:
        y += bias
    return y
