"""NF4 blockwise quantization with bitsandbytes' semantics, and double quantization.

Letters: n weights, flattened row-major; blocks of ``blocksize`` consecutive weights
(the last may be short); n_blocks = ceil(n / blocksize).

    absmax_b = max_{k in b} |w_k|                                  float32 (n_blocks,)
    q_k      = nearest NF4 code to w_k / absmax_b, ties to the lower code   (4 bits)
    packed   = two codes per byte, the first element in the high nibble      (ceil(n/2),)
    ŵ_k      = NF4_CODE[q_k] · absmax_b,   |ŵ_k − w_k| <= absmax_b · NF4_HALF_GAP

"Nearest, ties to the lower code" is bitsandbytes' decision tree (``x > midpoint`` picks
the upper code) with exact midpoints m (float64) instead of float32-rounded ones; the two
differ only for a value within one float32 ulp of a midpoint. For a float32 v, v > m
exactly when v >= t, t the smallest float32 above m, so the codes are found in float32
with those thresholds. An all-zero block (absmax 0) gets the code 0.0 (index 7), never 0/0.

Double quantization (QLoRA): the float32 absmax values are centred on their mean
``offset`` and quantized blockwise (blocks of 256) to 8 bits with bitsandbytes'
signed dynamic map, one float32 scale per block:

    c_j = absmax_j − offset,   scale_B = max_{j in B} |c_j|,   p_j = nearest DYNAMIC_CODE to c_j / scale_B
    absmax_j ≈ DYNAMIC_CODE[p_j] · scale_B + offset,   error <= scale_B · DYNAMIC_HALF_GAP (+ rounding)

Storage: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight with it, 4 + 32/64 = 4.5 without.
The two code books are module constants shared by every tensor, not per-tensor buffers.
"""
from __future__ import annotations

import numpy as np

from .device import FLOAT_DTYPES, get_array_module
from .dispatch import kernels_for
from ..kernels.common import NF4_CODE
from ..kernels.validate import nf4_blocksize

FLOATS_IN = (np.dtype(np.float16),) + FLOAT_DTYPES


def thresholds(code) -> np.ndarray:
    """(len(code) − 1,) float32: the smallest float32 above each exact midpoint of ``code``."""
    mid = (code[:-1].astype(np.float64) + code[1:]) / 2
    t = mid.astype(np.float32)
    return np.where(t.astype(np.float64) > mid, t, np.nextafter(t, np.float32(np.inf)))


_NF4_THRESHOLDS = thresholds(NF4_CODE)
NF4_HALF_GAP = float(np.diff(NF4_CODE.astype(np.float64)).max() / 2)        # 0.1519...


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (create_dynamic_map(signed=True)): (256,) sorted float32.

    For exponent e = 0..6 the means of 2**e + 1 evenly spaced points in [0.1, 1], times
    10**(e − 6), with both signs; plus 0 and 1.
    """
    data = [np.float32(0.0), np.float32(1.0)]
    for e in range(7):
        edges = np.linspace(0.1, 1, 2**e + 1, dtype=np.float32)
        means = (edges[:-1] + edges[1:]) / np.float32(2)
        data += list(means * np.float32(10.0 ** (e - 6))) + list(-means * np.float32(10.0 ** (e - 6)))
    return np.sort(np.array(data, dtype=np.float32))


DYNAMIC_CODE = dynamic_map()
_DYNAMIC_THRESHOLDS = thresholds(DYNAMIC_CODE)
DYNAMIC_HALF_GAP = float(np.diff(DYNAMIC_CODE.astype(np.float64)).max() / 2)   # 0.00703...


def _blockwise_absmax(flat, blocksize):
    """max |x| per block of ``blocksize`` (the last may be short): float32 (n_blocks,)."""
    n = flat.size
    padded = np.zeros(-(-n // blocksize) * blocksize, np.float32)
    padded[:n] = np.abs(flat)
    return padded.reshape(-1, blocksize).max(axis=1)


def _nearest(flat, absmax, blocksize, thresholds):
    """Index of the nearest code to x / absmax per element, ties to the lower code: (n,) uint8."""
    scale = np.where(absmax > 0, absmax, np.float32(1))            # an all-zero block scales to 0
    v = flat / np.repeat(scale, blocksize)[:flat.size]             # float32 division, as bitsandbytes
    return np.searchsorted(thresholds, v, side="right").astype(np.uint8)   # #{t <= v} = #{m < v}


def pack_nibbles(codes):
    """(n,) codes 0..15 -> (ceil(n/2),) uint8, element 2j in the high nibble of byte j."""
    even = np.zeros((codes.size + 1) // 2 * 2, np.uint8)
    even[:codes.size] = codes
    return (even[0::2] << 4) | even[1::2]


def unpack_nibbles(packed, n: int):
    """Inverse of pack_nibbles: (n,) uint8 codes."""
    return np.stack([packed >> 4, packed & 0xF], axis=1).reshape(-1)[:n]


def check_weight(w, who="quantize_nf4"):
    """TypeError/ValueError unless ``w`` is a finite float16/32/64 array."""
    if not hasattr(w, "dtype") or np.dtype(w.dtype) not in FLOATS_IN:
        raise TypeError(f"{who}: weights must be a float16/32/64 array, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.size == 0:
        raise ValueError(f"{who}: weights must not be empty, got shape {tuple(w.shape)}")
    bad = ~np.isfinite(w)
    if bad.any():
        raise ValueError(f"{who}: weights must be finite; {int(bad.sum())} NaN/Inf value(s), first at index "
                         f"{tuple(int(i) for i in np.argwhere(bad)[0])}")


def quantize_blockwise_nf4(w, blocksize: int = 64):
    """NF4 codes and absmax of ``w`` (any shape, flattened row-major): ((n,) uint8, (n_blocks,) float32)."""
    blocksize = nf4_blocksize(blocksize)
    check_weight(w)
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    absmax = _blockwise_absmax(flat, blocksize)
    return _nearest(flat, absmax, blocksize, _NF4_THRESHOLDS), absmax


def double_quantize(absmax, blocksize: int = 256):
    """(q (n_blocks,) uint8, scale (ceil(n_blocks/256),) float32, offset float32) of the absmax values."""
    blocksize = nf4_blocksize(blocksize)
    offset = np.float32(absmax.mean(dtype=np.float64))
    centred = absmax - offset                                      # float32
    scale = _blockwise_absmax(centred, blocksize)
    return _nearest(centred, scale, blocksize, _DYNAMIC_THRESHOLDS), scale, offset


def double_dequantize(q, scale, offset, blocksize: int = 256):
    """absmax (n_blocks,) float32 = DYNAMIC_CODE[q] · scale_block + offset (NumPy or CuPy arrays)."""
    xp = get_array_module(q)
    return xp.asarray(DYNAMIC_CODE)[q] * xp.repeat(scale, blocksize)[:q.size] + offset


class NF4Tensor:
    """A weight in 4-bit NormalFloat: packed codes plus (double-quantized) block scales.

    ``data`` is the packed uint8 array (as bitsandbytes' Params4bit); ``dtype`` is the
    dtype ``dequantize()`` returns by default (the original weights' dtype).
    """

    def __init__(self, data, shape, dtype, blocksize: int = 64, *, absmax=None,
                 absmax_q=None, absmax_scale=None, absmax_offset=None, dq_blocksize: int = 256):
        self.data, self.shape, self.dtype = data, tuple(int(d) for d in shape), np.dtype(dtype)
        self.blocksize, self.dq_blocksize = nf4_blocksize(blocksize), nf4_blocksize(dq_blocksize)
        self.double_quant = absmax is None
        if self.double_quant and (absmax_q is None or absmax_scale is None or absmax_offset is None):
            raise ValueError("NF4Tensor: give absmax, or all of absmax_q, absmax_scale and absmax_offset")
        self.absmax_q, self.absmax_scale, self.absmax_offset = absmax_q, absmax_scale, absmax_offset
        self._absmax = absmax

    @classmethod
    def quantize(cls, w, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256):
        """Quantize ``w`` (float16/32/64, any shape) blockwise to NF4."""
        codes, absmax = quantize_blockwise_nf4(w, blocksize)
        packed = pack_nibbles(codes)
        if not double_quant:
            return cls(packed, w.shape, w.dtype, blocksize, absmax=absmax)
        q, scale, offset = double_quantize(absmax, dq_blocksize)
        return cls(packed, w.shape, w.dtype, blocksize, absmax_q=q, absmax_scale=scale,
                   absmax_offset=np.array([offset], np.float32), dq_blocksize=dq_blocksize)

    @classmethod
    def empty(cls, shape, dtype, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256):
        """Zero buffers of the right sizes, to be filled by load_state_dict (no quantization work)."""
        n = int(np.prod(shape))
        n_blocks = -(-n // nf4_blocksize(blocksize))
        packed = np.zeros(-(-n // 2), np.uint8)
        if not double_quant:
            return cls(packed, shape, dtype, blocksize, absmax=np.zeros(n_blocks, np.float32))
        return cls(packed, shape, dtype, blocksize, absmax_q=np.zeros(n_blocks, np.uint8),
                   absmax_scale=np.zeros(-(-n_blocks // nf4_blocksize(dq_blocksize)), np.float32),
                   absmax_offset=np.zeros(1, np.float32), dq_blocksize=dq_blocksize)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def absmax(self):
        """The block scales (n_blocks,) float32, double quantization undone (recomputed per call)."""
        if not self.double_quant:
            return self._absmax
        return double_dequantize(self.absmax_q, self.absmax_scale, self.absmax_offset, self.dq_blocksize)

    def buffers(self) -> dict:
        """name -> array: everything this tensor stores (what a state dict or file carries)."""
        if not self.double_quant:
            return {"packed": self.data, "absmax": self._absmax}
        return {"packed": self.data, "absmax_q": self.absmax_q, "absmax_scale": self.absmax_scale,
                "absmax_offset": self.absmax_offset}

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.buffers().values())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    def dequantize(self, dtype=None):
        """ŵ in ``dtype`` (default: the original dtype; float16 is computed in float32 and cast)."""
        dtype = np.dtype(dtype or self.dtype)
        flat_shape = (1, self.numel) if len(self.shape) != 2 else self.shape
        work = dtype if dtype in FLOAT_DTYPES else np.dtype(np.float32)
        W = kernels_for(self.data).nf4_dequantize(self.data, self.absmax(), flat_shape, self.blocksize, work)
        return W.reshape(self.shape).astype(dtype, copy=False)

    def __repr__(self):
        dq = f", double_quant (blocks of {self.dq_blocksize})" if self.double_quant else ""
        return (f"NF4Tensor(shape={self.shape}, dtype={self.dtype}, blocksize={self.blocksize}{dq}, "
                f"{self.bits_per_param:.3f} bits/param)")


def quantize_nf4(w, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """``NF4Tensor.quantize``: w (any shape) -> its NF4 form."""
    return NF4Tensor.quantize(w, blocksize, double_quant)


def merge_delta(q: NF4Tensor, delta) -> NF4Tensor:
    """Requantize dequant(q) + delta with q's settings (lossy: a LoRA merge into a 4-bit base)."""
    if tuple(delta.shape) != q.shape:
        raise ValueError(f"merge_delta: delta has shape {tuple(delta.shape)}, expected {q.shape}")
    merged = q.dequantize(np.float64) + delta
    return NF4Tensor.quantize(merged.astype(q.dtype), q.blocksize, q.double_quant, q.dq_blocksize)
