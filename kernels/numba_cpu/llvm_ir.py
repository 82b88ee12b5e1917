"""What the LLVM-IR kernels of this backend share (``nf4_avx2``, ``gguf``, ``gguf_vnni``, ``gemv``): Numba has no vector
type, so those kernels are Numba intrinsics that build LLVM IR with llvmlite, from these pieces.

    F32 F16 I8 I16 I32 I64   the IR scalar types
    call                     a call of an LLVM intrinsic (llvm.fma.*, llvm.x86.*), declared on first use
    prefetch                 a cache-line hint that never faults
    array_pointers           an intrinsic's array arguments as data pointers, and the first one's row stride
    pointer                  a typed pointer at an element offset of another
    splat                    a scalar in every lane of a vector
    lanes_below              the mask of a vector's lanes k < n (a masked load's, for a last partial step)
    hsum                     the sum of a float vector's lanes, as a tree
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils

F32, F16 = ir.FloatType(), ir.HalfType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def call(builder, name, ret, *args):
    """``name``(args) -> ``ret``: the intrinsic declared in the module on first use."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, list(args))


def prefetch(builder, p):
    """Ask for the cache line at byte pointer p (a hint: never faults, even past the array)."""
    call(builder, "llvm.prefetch.p0", ir.VoidType(), p, I32(0), I32(3), I32(1))


def array_pointers(context, builder, sig, args):
    """Data pointers of the array arguments (None for the others), and the first one's row stride in bytes."""
    arr = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else None
           for t, a in zip(sig.args, args)]
    return [a.data if a is not None else None for a in arr], cgutils.unpack_tuple(builder, arr[0].strides, 2)[0]


def pointer(builder, base, at, ty):
    """A ``ty`` pointer to element ``at`` of pointer ``base`` (at in base's elements)."""
    return builder.bitcast(builder.gep(base, [at]), ty.as_pointer())


def splat(builder, s, n):
    """<n x s.type> with s in every lane."""
    v = builder.insert_element(ir.Constant(ir.VectorType(s.type, n), ir.Undefined), s, I32(0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), [0] * n))


def lanes_below(builder, count, n):
    """<n x i1>: lane k is k < count (a signed integer, compared in its own width: an i8 keeps a 32-lane mask
    within 256 bits)."""
    return builder.icmp_signed("<", ir.Constant(ir.VectorType(count.type, n), list(range(n))), splat(builder, count, n))


def hsum(builder, v):
    """The sum of a float vector's lanes, halves added in turn (a tree, not a chain of adds)."""
    n = v.type.count
    while n > 1:
        n //= 2
        half = lambda at: builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n),   # noqa: E731
                                                                   list(range(at, at + n))))
        v = builder.fadd(half(0), half(n))
    return builder.extract_element(v, I32(0))
