"""NumPy reference for the NF4 (QLoRA) kernels: products with a 4-bit frozen W.

Letters: N rows, D_in, D_out, n = D_out·D_in weights, blocksize (64 by default).

Storage (bitsandbytes' layout). W (D_out, D_in) is flattened row-major; element k has a
4-bit code q_k in 0..15 and lies in block k // blocksize, the last block possibly short:

    packed  uint8 (ceil(n/2),)       byte j = q_{2j} << 4 | q_{2j+1}   (first element high)
    absmax  float32 (n_blocks,)      the block's max |w| (already undone from double quant)
    W[k]  = NF4_CODE[q_k] · absmax[k // blocksize]

    nf4_dequantize  W                (D_out, D_in)
    nf4_matmul      y  = x Wᵀ + b    (N, D_in) -> (N, D_out)
    nf4_matmul_dx   dx = dy W        (N, D_out) -> (N, D_in)      (no dW: W is frozen)

The products dequantize W a tile of ``config.NF4_TILE_ROWS`` output rows at a time, so
the full float W never exists during a forward or backward. The dequantized value is
computed in the output dtype (exact in float64, one rounding in float32).
"""
import numpy as np

from . import config

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
"""The 16 NormalFloat-4 values (QLoRA, bitsandbytes), index = the 4-bit code."""

OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_blocksize(blocksize):
    """ValueError unless ``blocksize`` is a positive even int (so blocks start on a byte)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) \
            or blocksize <= 0 or blocksize % 2:
        raise ValueError(f"NF4: blocksize must be a positive even integer, got {blocksize!r}")
    return int(blocksize)


def check_nf4(packed, absmax, shape, blocksize):
    """Validate a packed NF4 weight; returns (D_out, D_in)."""
    blocksize = check_blocksize(blocksize)
    if len(tuple(shape)) != 2 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                                     for d in shape):
        raise ValueError(f"NF4: shape must be (D_out, D_in) with positive ints, got {shape!r}")
    D_out, D_in = (int(d) for d in shape)
    n = D_out * D_in
    if np.dtype(packed.dtype) != np.uint8 or tuple(packed.shape) != ((n + 1) // 2,):
        raise ValueError(f"NF4: packed must be uint8 of shape ({(n + 1) // 2},) for shape {(D_out, D_in)}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    n_blocks = -(-n // blocksize)
    if np.dtype(absmax.dtype) != np.float32 or tuple(absmax.shape) != (n_blocks,):
        raise ValueError(f"NF4: absmax must be float32 of shape ({n_blocks},) for {n} weights in blocks of "
                         f"{blocksize}, got {absmax.dtype} {tuple(absmax.shape)}")
    return D_out, D_in


def check_operand(name, a, width, bias=None, width_bias=None):
    """TypeError/ValueError unless ``a`` is a float32/64 (N, width) array; checks ``bias`` too."""
    if np.dtype(a.dtype) not in OUT_DTYPES:
        raise TypeError(f"NF4: {name} must be float32 or float64, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"NF4: {name} has shape {tuple(a.shape)}, expected (N, {width})")
    if bias is not None and (np.dtype(bias.dtype) != np.dtype(a.dtype) or tuple(bias.shape) != (width_bias,)):
        raise ValueError(f"NF4: bias must be {a.dtype} of shape ({width_bias},), "
                         f"got {bias.dtype} {tuple(bias.shape)}")


def _dequantize_range(packed, absmax, start, stop, blocksize, dtype):
    """Elements start:stop of the flattened W, dequantized: (stop − start,)."""
    k = np.arange(start, stop)
    byte = packed[k >> 1]
    code = np.where(k & 1, byte & 0xF, byte >> 4)                 # even k: high nibble
    return NF4_CODE[code].astype(dtype) * absmax[k // blocksize].astype(dtype)


def nf4_dequantize(packed, absmax, shape, blocksize=64, dtype="float32"):
    """W (D_out, D_in) in ``dtype`` (float32 or float64) from its packed NF4 codes."""
    D_out, D_in = check_nf4(packed, absmax, shape, blocksize)
    if np.dtype(dtype) not in OUT_DTYPES:
        raise TypeError(f"NF4: dtype must be float32 or float64, got {np.dtype(dtype)}")
    return _dequantize_range(packed, absmax, 0, D_out * D_in, blocksize, np.dtype(dtype)).reshape(D_out, D_in)


def nf4_matmul(x, packed, absmax, shape, blocksize=64, bias=None):
    """y = x·dequant(W)ᵀ + b (N, D_out), dequantizing NF4_TILE_ROWS rows of W at a time."""
    D_out, D_in = check_nf4(packed, absmax, shape, blocksize)
    check_operand("x", x, D_in, bias, D_out)
    y = np.empty((x.shape[0], D_out), x.dtype)
    T = config.NF4_TILE_ROWS
    for o0 in range(0, D_out, T):
        o1 = min(o0 + T, D_out)
        W_tile = _dequantize_range(packed, absmax, o0 * D_in, o1 * D_in, blocksize, x.dtype)
        y[:, o0:o1] = x @ W_tile.reshape(o1 - o0, D_in).T        # (N, D_in) @ (D_in, t)
    if bias is not None:
        y += bias
    return y


def nf4_matmul_dx(dy, packed, absmax, shape, blocksize=64):
    """dx = dy·dequant(W) (N, D_in), dequantizing NF4_TILE_ROWS rows of W at a time."""
    D_out, D_in = check_nf4(packed, absmax, shape, blocksize)
    check_operand("dy", dy, D_out)
    dx = np.zeros((dy.shape[0], D_in), dy.dtype)
    T = config.NF4_TILE_ROWS
    for o0 in range(0, D_out, T):
        o1 = min(o0 + T, D_out)
        W_tile = _dequantize_range(packed, absmax, o0 * D_in, o1 * D_in, blocksize, dy.dtype)
        dx += dy[:, o0:o1] @ W_tile.reshape(o1 - o0, D_in)       # (N, t) @ (t, D_in)
    return dx
