"""Reference NF4 (QLoRA) kernels: products with a 4-bit frozen W.

Letters: N rows, D_in, D_out, n = D_out·D_in weights, blocksize (64 by default).

Storage (bitsandbytes' layout). W (D_out, D_in) is flattened row-major; element k has a
4-bit code q_k in 0..15 and lies in block k // blocksize, the last block possibly short:

    packed  uint8 (ceil(n/2),)       byte j = q_{2j} << 4 | q_{2j+1}   (first element high)
    absmax  float32 (n_blocks,)      the block's max |w| (already undone from double quant)
    W[k]  = NF4_CODE[q_k] · absmax[k // blocksize]      (NF4_CODE: kernels/common.py)

    nf4_dequantize  W                (D_out, D_in)
    nf4_matmul      y  = x Wᵀ + b    (N, D_in) -> (N, D_out)
    nf4_matmul_dx   dx = dy W        (N, D_out) -> (N, D_in)      (no dW: W is frozen)

The products dequantize W a tile of ``config.NF4_TILE_ROWS`` output rows at a time, so
the full float W never exists during a forward or backward. The dequantized value is
computed in the output dtype (exact in float64, one rounding in float32).
"""
import numpy as np

from .. import config, validate
from ..common import NF4_CODE


# -- NF4 (QLoRA): a 4-bit frozen W ----------------------------------------------------------
def _dequantize_range(packed, absmax, start, stop, blocksize, dtype):
    """Elements start:stop of the flattened W, dequantized: (stop − start,)."""
    k = np.arange(start, stop)
    byte = packed[k >> 1]
    code = np.where(k & 1, byte & 0xF, byte >> 4)                 # even k: high nibble
    return NF4_CODE[code].astype(dtype) * absmax[k // blocksize].astype(dtype)


def nf4_dequantize(packed, absmax, shape, blocksize=64, dtype="float32"):
    """Semantics: W[k // D_in, k % D_in] = NF4_CODE[q_k] · absmax[k // blocksize] -> W (D_out, D_in), float32/64."""
    D_out, D_in = validate.nf4(packed, absmax, shape, blocksize)
    if np.dtype(dtype) not in validate.NF4_FLOATS:
        raise TypeError(f"NF4: dtype must be float32 or float64, got {np.dtype(dtype)}")
    return _dequantize_range(packed, absmax, 0, D_out * D_in, blocksize, np.dtype(dtype)).reshape(D_out, D_in)


def nf4_matmul(x, packed, absmax, shape, blocksize=64, bias=None):
    """Semantics: y = x · dequant(W)ᵀ + b.   x (N, D_in) -> y (N, D_out); NF4_TILE_ROWS rows of W at a time."""
    D_out, D_in = validate.nf4(packed, absmax, shape, blocksize)
    validate.nf4_operand("x", x, D_in, bias, D_out)
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
    """Semantics: dx = dy · dequant(W) (no dW: W is frozen).   dy (N, D_out) -> dx (N, D_in); tiles as nf4_matmul."""
    D_out, D_in = validate.nf4(packed, absmax, shape, blocksize)
    validate.nf4_operand("dy", dy, D_out)
    dx = np.zeros((dy.shape[0], D_in), dy.dtype)
    T = config.NF4_TILE_ROWS
    for o0 in range(0, D_out, T):
        o1 = min(o0 + T, D_out)
        W_tile = _dequantize_range(packed, absmax, o0 * D_in, o1 * D_in, blocksize, dy.dtype)
        dx += dy[:, o0:o1] @ W_tile.reshape(o1 - o0, D_in)       # (N, t) @ (t, D_in)
    return dx
