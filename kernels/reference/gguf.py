"""Reference GGUF kernels: products with a frozen W kept in llama.cpp's own quantized blocks.

Letters: N rows, D_in, D_out; B weights per block, S bytes per block (``GGUF_FORMATS``).

Storage (ggml's layout, as ``gguf``'s GGUFReader gives a tensor). Each row of W (D_out, D_in) is
D_in / B whole blocks of S bytes, so ``blocks`` is uint8 (D_out, D_in / B · S); the values are
little-endian. Block layouts, for block weights w_0 .. w_{B-1} (f16 read as float32):

    Q8_0  B = 32,  S = 34:   f16 d | 32 × int8 q                               w_i = d · q_i
    Q4_0  B = 32,  S = 18:   f16 d | 16 bytes: byte j = q_{j+16} << 4 | q_j     w_i = d · (q_i − 8)
    Q4_1  B = 32,  S = 20:   f16 d | f16 m | 16 bytes as Q4_0                    w_i = d · q_i + m
    Q5_0  B = 32,  S = 22:   f16 d | u32 qh: bit i = q_i's 5th bit | 16 bytes of low nibbles as Q4_0
                                                                              w_i = d · (q_i − 16)
    Q5_1  B = 32,  S = 24:   f16 d | f16 m | u32 qh | 16 bytes as Q5_0          w_i = d · q_i + m
    Q4_K  B = 256, S = 144:  f16 d | f16 dmin | 12 bytes: 8 × (6-bit sc, 6-bit mn) | 128 bytes of nibbles
                             sub-block s = 0..7 of 32 weights: w = (d · sc_s) · q − dmin · mn_s
                             nibbles: byte 32g + j holds q of sub-block 2g (low) and 2g+1 (high), element j
                             scales: bytes 0-3 low 6 bits = sc_0..3, bytes 4-7 low 6 bits = mn_0..3,
                             bytes 8-11 low nibble | (bytes 0-3 >> 6) << 4 = sc_4..7,
                             bytes 8-11 high nibble | (bytes 4-7 >> 6) << 4 = mn_4..7
    Q5_K  B = 256, S = 176:  f16 d | f16 dmin | 12 bytes of scales as Q4_K | 32 bytes qh | 128 bytes as Q4_K
                             w = (d · sc_s) · q − dmin · mn_s, q = nibble | (bit s of qh byte j) << 4
    Q6_K  B = 256, S = 210:  128 bytes ql | 64 bytes qh | 16 × int8 sc | f16 d (last)
                             weight p = 128h + 32t + e (h < 2, t < 4, e < 32): w_p = (d · sc_{p/16}) · (q_p − 32),
                             q_p = (ql[64h + 32(t mod 2) + e] >> 4⌊t/2⌋) & 15 | ((qh[32h + e] >> 2t) & 3) << 4

    gguf_dequantize  W                (D_out, D_in)
    gguf_matmul      y  = x Wᵀ + b    (N, D_in) -> (N, D_out)
    gguf_matmul_dx   dx = dy W        (N, D_out) -> (N, D_in)      (no dW: W is frozen)
    gguf_matmul_q8   y  = x̃ Wᵀ + b    llama.cpp's arithmetic: x rounded to Q8_0 blocks first

llama.cpp multiplies a quantized W by activations it first rounds to Q8_0 blocks (its CPU vec_dot for
these formats), 32 values of a row of x at a time, in float32:

    d = max|x_j| / 127    q_j = round(x_j / d), ties away from zero (0 where d = 0)    x̃_j = f16(d) · q_j

(q_j = round(x_j · (1 / d)), d's reciprocal in float32, as gguf's quantizer and ggml's reference compute it;
f16(d) is d rounded to half, as the block stores it.) So each block's dot is integers, Σ_b f16(d_W) f16(d_x)
Σ_j (q_W − 8) q_x for Q4_0: what ``gguf_matmul_q8`` computes in the Numba backend.

W's values are gguf's ``dequantize``: each is computed in float32 exactly as ggml does, in its order
(products grouped as written above, so Q6_K's (d · sc) · q rounds where gguf's does), then widened
to the requested dtype. Only Q8_0, Q4_0, Q4_1 and Q4_K have Numba kernels; Numba falls back to these
functions for the Q5 and Q6 formats. The products dequantize ``config.NF4_TILE_ROWS`` rows of W at a
time, so the full float W never exists during a forward or backward.
"""
import numpy as np

from .. import config, validate
from ..common import round_q8_0, xp
from ..validate import GGUF_FORMATS


# -- GGUF: a frozen W in llama.cpp's quantized blocks -----------------------------------------
def _f16(b, at):
    """The f16 at byte ``at`` of each block, as float32: (n_blocks, 1)."""
    return xp(b).ascontiguousarray(b[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs):
    """16 bytes per block -> 32 codes, low nibbles first: (n_blocks, 32) float32."""
    return xp(qs).concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)


def _q8_0(b):
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b, 0)


def _q4_0(b):
    return (_nibbles(b[:, 2:]) - np.float32(8)) * _f16(b, 0)


def _q4_1(b):
    return _nibbles(b[:, 4:]) * _f16(b, 0) + _f16(b, 2)


def _bits(qh):
    """(n_blocks, k) bytes -> (n_blocks, 8k) uint8 bits: column i = bit i of the little-endian word."""
    return ((qh[:, :, None] >> xp(qh).arange(8, dtype=np.uint8)) & 1).reshape(qh.shape[0], -1)


def _q5_codes(qh, qs):
    """u32 qh (4 bytes) and 16 nibble bytes per block -> 32 five-bit codes: (n_blocks, 32) float32."""
    low = xp(qs).concatenate([qs & 15, qs >> 4], axis=1)
    return (low | (_bits(qh) << 4)).astype(np.float32)


def _q5_0(b):
    return (_q5_codes(b[:, 2:6], b[:, 6:]) - np.float32(16)) * _f16(b, 0)


def _q5_1(b):
    return _q5_codes(b[:, 4:8], b[:, 8:]) * _f16(b, 0) + _f16(b, 2)


def _k_scales(s):
    """12 bytes of 6-bit scales per block -> (sc, mn), each (n_blocks, 8) float32 (layout above)."""
    cat = xp(s).concatenate
    sc = cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs):
    """128 bytes per block -> (n_blocks, 8 sub-blocks, 32) codes: sub-block 2g low nibbles of bytes 32g.., 2g+1 high."""
    q = qs.reshape(qs.shape[0], 4, 1, 32)
    return xp(qs).concatenate([q & 15, q >> 4], axis=2).reshape(qs.shape[0], 8, 32)


def _q4_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    q = _k_nibbles(b[:, 16:]).astype(np.float32)                       # (n, 8 sub-blocks, 32)
    scale, offset = (_f16(b, 0) * sc)[:, :, None], (_f16(b, 2) * mn)[:, :, None]
    return (scale * q - offset).reshape(b.shape[0], 256)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    high = _bits(b[:, 16:48]).reshape(n, 32, 8).transpose(0, 2, 1)    # (n, 8 sub-blocks, 32): bit s of byte j
    q = (_k_nibbles(b[:, 48:]) | (high << 4)).astype(np.float32)
    scale, offset = (_f16(b, 0) * sc)[:, :, None], (_f16(b, 2) * mn)[:, :, None]
    return (scale * q - offset).reshape(n, 256)


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    low = xp(b).concatenate([ql & 15, ql >> 4], axis=2).reshape(n, 2, 4, 32)      # (n, h, t, e)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> (2 * xp(b).arange(4, dtype=np.uint8))[:, None]) & 3           # (n, h, t, e)
    q = ((low | (high << 4)).reshape(n, 16, 16).astype(np.float32) - np.float32(32))
    scale = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)      # (n, 16): d · sc
    return (scale[:, :, None] * q).reshape(n, 256)


_DECODE = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k,
           "Q5_K": _q5_k, "Q6_K": _q6_k}


def _dequantize_rows(blocks, name, o0, o1, dtype):
    """Rows o0:o1 of W: (o1 − o0, D_in) of ``dtype`` (gguf's float32 values, widened)."""
    B, S = GGUF_FORMATS[name]
    rows = blocks[o0:o1]
    w = _DECODE[name](rows.reshape(-1, S))                     # (rows · D_in / B, B) float32
    return w.reshape(o1 - o0, -1).astype(dtype, copy=False)


def gguf_dequantize(blocks, qtype, shape, dtype="float32"):
    """Semantics: W[o, bB + i] = w_i of block b of row o (layouts above) -> W (D_out, D_in), float32/64."""
    name, D_out, D_in = validate.gguf(blocks, qtype, shape)
    return _dequantize_rows(blocks, name, 0, D_out, validate.gguf_dtype(dtype))


def gguf_matmul(x, blocks, qtype, shape, bias=None):
    """Semantics: y = x · dequant(W)ᵀ + b.   x (N, D_in) -> y (N, D_out); NF4_TILE_ROWS rows of W at a time."""
    name, D_out, D_in = validate.gguf(blocks, qtype, shape)
    validate.gguf_operand("x", x, D_in, bias, D_out)
    y = xp(x).empty((x.shape[0], D_out), x.dtype)
    T = config.NF4_TILE_ROWS
    for o0 in range(0, D_out, T):
        o1 = min(o0 + T, D_out)
        y[:, o0:o1] = x @ _dequantize_rows(blocks, name, o0, o1, x.dtype).T      # (N, D_in) @ (D_in, t)
    if bias is not None:
        y += bias
    return y


def gguf_matmul_q8(x, blocks, qtype, shape, bias=None):
    """Semantics: y = round_q8_0(x) · dequant(W)ᵀ + b, in x's dtype (round_q8_0: above, in ``common``).
    x (N, D_in) -> y (N, D_out)."""
    validate.gguf_operand("x", x, validate.gguf(blocks, qtype, shape)[2], bias, shape[0])
    return gguf_matmul(round_q8_0(x).astype(x.dtype), blocks, qtype, shape, bias)


def gguf_matmul_dx(dy, blocks, qtype, shape):
    """Semantics: dx = dy · dequant(W) (no dW: W is frozen).   dy (N, D_out) -> dx (N, D_in); tiles as gguf_matmul."""
    name, D_out, D_in = validate.gguf(blocks, qtype, shape)
    validate.gguf_operand("dy", dy, D_out)
    dx = xp(dy).zeros((dy.shape[0], D_in), dy.dtype)
    T = config.NF4_TILE_ROWS
    for o0 in range(0, D_out, T):
        o1 = min(o0 + T, D_out)
        dx += dy[:, o0:o1] @ _dequantize_rows(blocks, name, o0, o1, dy.dtype)    # (N, t) @ (t, D_in)
    return dx
