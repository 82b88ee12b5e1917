"""Input checks shared by every kernel backend: clear errors before any kernel runs.

They run on every call, a decode step's small products included (16 rows of 256: a few µs of
kernel), so each passing check is a plain comparison: no NumPy call, no generator.
"""
import numpy as np

FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
NF4_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))    # the CPU NF4 kernels' dtypes (the GPU's: FLOATS)
_FLOATS = frozenset(FLOATS)
SMALL_INDEX = 256          # up to this many rows, an index's range is read through a list (no NumPy reductions)


def _shape(name, a, expected):
    """ValueError unless ``a.shape`` matches ``expected`` (None = any size on that axis)."""
    got = tuple(a.shape)
    if len(got) == len(expected):
        for g, e in zip(got, expected):
            if e is not None and g != e:
                break
        else:
            return
    want = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
    raise ValueError(f"{name} has shape {got}, expected {want}")


def _float(name, a, dtype):
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float16/32/64 array, got dtype {a.dtype}")
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}, expected {np.dtype(dtype)} (the dtype of x)")


def dense(x, W, bias=None, dy=None):
    """Shapes and dtypes of a dense product; returns (N, D_in, D_out)."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (N, D_in), got shape {tuple(x.shape)}")
    _float("x", x, x.dtype)
    N, D_in = x.shape
    _float("W", W, x.dtype)
    _shape("W", W, (None, D_in))
    D_out = W.shape[0]
    if bias is not None:
        _float("bias", bias, x.dtype)
        _shape("bias", bias, (D_out,))
    if dy is not None:
        _float("dy", dy, x.dtype)
        _shape("dy", dy, (N, D_out))
    return N, D_in, D_out


def dense_grad(dy, x, W, need_dW):
    """Shapes of a dense backward; ``x`` may be None when dW is not needed (frozen W)."""
    if x is not None:
        return dense(x, W, dy=dy)
    if need_dW:
        raise ValueError("dense_backward: x is needed to compute dW (pass need_dW=False for a frozen weight)")
    if dy.ndim != 2:
        raise ValueError(f"dy must be 2-D (N, D_out), got shape {tuple(dy.shape)}")
    _float("dy", dy, dy.dtype)
    _float("W", W, dy.dtype)
    _shape("W", W, (dy.shape[1], None))
    return dy.shape[0], W.shape[1], W.shape[0]


def lora(x, W, A, B, bias=None, mask=None, dy=None, h=None):
    """Shapes and dtypes of the fused LoRA path; ``W`` may be None (LoRA term only)."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (N, D_in), got shape {tuple(x.shape)}")
    _float("x", x, x.dtype)
    N, D_in = x.shape
    _float("A", A, x.dtype)
    _shape("A", A, (None, D_in))
    r = A.shape[0]
    _float("B", B, x.dtype)
    _shape("B", B, (None, r))
    D_out = B.shape[0]
    if W is not None:
        _float("W", W, x.dtype)
        _shape("W", W, (D_out, D_in))
    for name, a, shape in (("bias", bias, (D_out,)), ("mask", mask, (N, D_in)),
                           ("dy", dy, (N, D_out)), ("h", h, (N, r))):
        if a is not None:
            _float(name, a, x.dtype)
            _shape(name, a, shape)
    return N, D_in, D_out, r


def multi(x, W, A_stack, B_stack, scalings, bias=None, dy=None, h=None):
    """Shapes and dtypes of a multi-adapter batch; returns (N, D_in, D_out, K, r)."""
    N, D_in, D_out = dense(x, W, bias, dy)
    _float("A_stack", A_stack, x.dtype)
    _shape("A_stack", A_stack, (None, None, D_in))
    K, r = A_stack.shape[:2]
    _float("B_stack", B_stack, x.dtype)
    _shape("B_stack", B_stack, (K, D_out, r))
    _shape("scalings", scalings, (K,))
    if h is not None:
        _float("h", h, x.dtype)
        _shape("h", h, (N, r))
    return N, D_in, D_out, K, r


def index(index, N, K):
    """A per-row adapter index: ints in [-1, K), shape (N,)."""
    if np.dtype(index.dtype).kind not in "iu":
        raise TypeError(f"index must be an integer array, got dtype {index.dtype}")
    _shape("index", index, (N,))
    if not N:
        return
    if N <= SMALL_INDEX and isinstance(index, np.ndarray):
        values = index.tolist()
        lo, hi = min(values), max(values)
    else:
        lo, hi = int(index.min()), int(index.max())
    if lo < -1 or hi >= K:
        raise ValueError(f"index values must lie in [-1, {K}) for {K} adapters; got min {lo}, max {hi}")


def segments(indptr, seg_index, N, K):
    """SGMV segments: indptr (S+1,) non-decreasing from 0 to N, seg_index (S,) in [-1, K)."""
    for name, a in (("indptr", indptr), ("seg_index", seg_index)):
        if np.dtype(a.dtype).kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    S = seg_index.shape[0]
    _shape("indptr", indptr, (S + 1,))
    ptr = np.asarray(indptr.get() if hasattr(indptr, "get") else indptr)
    if ptr[0] != 0 or ptr[-1] != N or np.any(np.diff(ptr) < 0):
        raise ValueError(f"indptr must rise from 0 to N={N} without decreasing, got {ptr.tolist()}")
    index(seg_index, S, K)


# -- attention: RoPE and the causal softmax (layout in reference/attention.py) ----------------
def rope(x, cos, sin):
    """x (..., T, h) float with h even; cos and sin (T, h) of x's dtype; returns (T, h)."""
    if x.ndim < 2:
        raise ValueError(f"x must be (..., T, head_dim), got shape {tuple(x.shape)}")
    _float("x", x, x.dtype)
    T, h = x.shape[-2:]
    if h % 2:
        raise ValueError(f"x's last axis (head_dim) must be even, got {h}")
    _float("cos", cos, x.dtype)
    _shape("cos", cos, (T, h))
    _float("sin", sin, x.dtype)
    _shape("sin", sin, (T, h))
    return T, h


def matmul(a, b):
    """a (..., M, K) and b (..., K, N) float of one dtype, batch axes that broadcast; returns the batch shape."""
    for name, arr in (("a", a), ("b", b)):
        if arr.ndim < 2:
            raise ValueError(f"matmul: {name} must have at least 2 axes (..., rows, cols), got shape {tuple(arr.shape)}")
    _float("a", a, a.dtype)
    _float("b", b, b.dtype)
    if b.dtype != a.dtype:
        raise TypeError(f"matmul: b has dtype {b.dtype}, expected {a.dtype} (the dtype of a)")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: a (..., M, K) and b (..., K, N) must share K, got a {tuple(a.shape)} "
                         f"and b {tuple(b.shape)}")
    if a.shape[:-2] == b.shape[:-2]:
        return a.shape[:-2]
    try:
        return np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: the batch axes of a {tuple(a.shape)} and b {tuple(b.shape)} do not broadcast") from None


def causal_softmax(S, key_mask, past):
    """S (B, ..., T, K) float with K = past + T; key_mask (B, K) or None; returns (B, T, K)."""
    if S.ndim < 3:
        raise ValueError(f"S must be (B, ..., T, K) with at least 3 axes, got shape {tuple(S.shape)}")
    _float("S", S, S.dtype)
    B, T, K = S.shape[0], S.shape[-2], S.shape[-1]
    _keys(key_mask, past, B, T, K, f"S has T={T} queries, K={K} keys")
    return B, T, K


def causal_attention(q, k, v, key_mask, past):
    """q (B, H_kv, G, T, h); k and v (B, H_kv, K, h) of q's dtype with K >= past + T; key_mask (B, K) or None."""
    if q.ndim != 5:
        raise ValueError(f"q must be (B, H_kv, G, T, head_dim), got shape {tuple(q.shape)}")
    _float("q", q, q.dtype)
    B, H_kv, G, T, h = q.shape
    for name, a in (("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(f"{name} must be (B, H_kv, K, head_dim), got shape {tuple(a.shape)}")
        _float(name, a, q.dtype)
        _shape(name, a, (B, H_kv, k.shape[2], h))
    K = k.shape[2]
    _keys(key_mask, past, B, T, K, f"q has T={T} queries, k has K={K} keys", spare=True)
    return B, T, K


def _keys(key_mask, past, B, T, K, what, spare=False):
    """The queries' offset ``past`` (an int >= 0, past + T = K, or <= K with ``spare`` keys after them) and
    key_mask (B, K) or None; ``what``: the sizes."""
    if isinstance(past, bool) or not isinstance(past, (int, np.integer)) or past < 0 \
            or past + T > K or (past + T < K and not spare):
        raise ValueError(f"past must be an int >= 0 with past + T {'<=' if spare else '='} K ({what}), "
                         f"got {past!r}")
    if key_mask is not None:
        _shape("key_mask", key_mask, (B, K))


def softmax_grad(dP, P):
    """dP and P of one shape and float dtype."""
    _float("P", P, P.dtype)
    _float("dP", dP, P.dtype)
    _shape("dP", dP, tuple(P.shape))


# -- activations: SwiGLU's gate ----------------------------------------------------------------
def silu_and_mul(g, u, dy=None):
    """g, u (and dy) float arrays of one shape (at least one axis) and dtype."""
    if g.ndim < 1:
        raise ValueError(f"g must be (..., I) with at least one axis, got shape {tuple(g.shape)}")
    _float("g", g, g.dtype)
    _float("u", u, g.dtype)
    _shape("u", u, tuple(g.shape))
    if dy is not None:
        _float("dy", dy, g.dtype)
        _shape("dy", dy, tuple(g.shape))


# -- the LM head and cross-entropy ---------------------------------------------------------------
def linear_cross_entropy(x, W, labels, ignore_index):
    """x (N, d) float, W (V, d) of x's dtype, labels (N,) ints in [0, V) or ignore_index; returns (N, V)."""
    if x.ndim != 2 or W.ndim != 2:
        raise ValueError(f"linear_cross_entropy: x must be (N, d) and W (V, d), got x {tuple(x.shape)}, "
                         f"W {tuple(W.shape)}")
    _float("x", x, x.dtype)
    _float("W", W, x.dtype)
    _shape("W", W, (None, x.shape[1]))
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    _shape("labels", labels, (x.shape[0],))
    V = W.shape[0]
    counted = labels[labels != ignore_index]
    if counted.size and (int(counted.min()) < 0 or int(counted.max()) >= V):
        bad = counted[(counted < 0) | (counted >= V)][0]
        raise ValueError(f"labels must lie in [0, {V}) or be ignore_index={ignore_index}, got {int(bad)}")
    return x.shape[0], V


# -- RMSNorm ----------------------------------------------------------------------------------
def rms_norm(x, weight, dy=None, rstd=None):
    """x (..., d) float, weight (d,) of x's dtype; dy like x; rstd (..., 1) in float32 or wider."""
    if x.ndim < 1:
        raise ValueError(f"x must be (..., d) with at least one axis, got shape {tuple(x.shape)}")
    _float("x", x, x.dtype)
    _float("weight", weight, x.dtype)
    _shape("weight", weight, (x.shape[-1],))
    if dy is not None:
        _float("dy", dy, x.dtype)
        _shape("dy", dy, tuple(x.shape))
    if rstd is not None:
        _float("rstd", rstd, np.promote_types(np.float32, x.dtype))
        _shape("rstd", rstd, tuple(x.shape[:-1]) + (1,))


# -- NF4: a packed 4-bit W (layout in reference/nf4.py) ------------------------------------
def nf4_blocksize(blocksize):
    """ValueError unless ``blocksize`` is a positive even int (so blocks start on a byte)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) \
            or blocksize <= 0 or blocksize % 2:
        raise ValueError(f"NF4: blocksize must be a positive even integer, got {blocksize!r}")
    return int(blocksize)


def nf4(packed, absmax, shape, blocksize):
    """Validate a packed NF4 weight; returns (D_out, D_in)."""
    blocksize = nf4_blocksize(blocksize)
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


def nf4_operand(name, a, width, bias=None, width_bias=None, dtypes=NF4_FLOATS):
    """TypeError/ValueError unless ``a`` is an (N, width) array of one of ``dtypes``; checks ``bias`` too."""
    if np.dtype(a.dtype) not in dtypes:
        raise TypeError(f"NF4: {name} must be {' or '.join(str(d) for d in dtypes)}, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"NF4: {name} has shape {tuple(a.shape)}, expected (N, {width})")
    if bias is not None and (np.dtype(bias.dtype) != np.dtype(a.dtype) or tuple(bias.shape) != (width_bias,)):
        raise ValueError(f"NF4: bias must be {a.dtype} of shape ({width_bias},), "
                         f"got {bias.dtype} {tuple(bias.shape)}")


# -- GGUF: llama.cpp's quantized blocks --------------------------------------------------------
GGUF_FORMATS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
                "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}   # name: (B weights, S bytes)
GGUF_TYPES = {8: "Q8_0", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 12: "Q4_K", 13: "Q5_K",
              14: "Q6_K"}                                     # gguf.GGMLQuantizationType values of those names


def gguf_qtype(qtype):
    """The format's name from a name ('Q4_0') or a gguf.GGMLQuantizationType (an int); ValueError otherwise."""
    if isinstance(qtype, (int, np.integer)) and not isinstance(qtype, bool) and int(qtype) in GGUF_TYPES:
        return GGUF_TYPES[int(qtype)]
    if isinstance(qtype, str) and qtype.upper() in GGUF_FORMATS:
        return qtype.upper()
    raise ValueError(f"GGUF: qtype must be one of {sorted(GGUF_FORMATS)} (a name or a gguf.GGMLQuantizationType), "
                     f"got {qtype!r}")


_UINT8 = np.dtype(np.uint8)


def _gguf_shape(shape) -> tuple:
    """``shape`` as a tuple of two ints (NumPy's included); ValueError otherwise."""
    if len(tuple(shape)) != 2 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in shape):
        raise ValueError(f"GGUF: shape must be (D_out, D_in) with positive ints, got {shape!r}")
    return tuple(int(d) for d in shape)


def gguf(blocks, qtype, shape):
    """Validate a GGUF-quantized weight, rows of whole blocks; returns (name, D_out, D_in)."""
    name = qtype if type(qtype) is str and qtype in GGUF_FORMATS else gguf_qtype(qtype)
    B, S = GGUF_FORMATS[name]
    if not (type(shape) is tuple and len(shape) == 2 and type(shape[0]) is int and type(shape[1]) is int):
        shape = _gguf_shape(shape)                 # the plain tuple of ints every layer passes skips this
    D_out, D_in = shape
    if D_out < 1 or D_in < 1:
        raise ValueError(f"GGUF: shape must be (D_out, D_in) with positive ints, got {shape!r}")
    if D_in % B:
        raise ValueError(f"GGUF: {name} rows are whole blocks of {B} weights, got D_in = {D_in}")
    if blocks.dtype != _UINT8 or tuple(blocks.shape) != (D_out, D_in // B * S):
        raise ValueError(f"GGUF: {name} blocks must be uint8 of shape ({D_out}, {D_in // B * S}) for shape "
                         f"{(D_out, D_in)}, got {blocks.dtype} {tuple(blocks.shape)}")
    return name, D_out, D_in


def gguf_dtype(dtype, floats=NF4_FLOATS):
    """The dequantized dtype: one of ``floats``; TypeError otherwise."""
    if np.dtype(dtype) not in floats:
        raise TypeError(f"GGUF: dtype must be {' or '.join(str(d) for d in floats)}, got {np.dtype(dtype)}")
    return np.dtype(dtype)


def gguf_operand(name, a, width, bias=None, width_bias=None, dtypes=NF4_FLOATS):
    """As ``nf4_operand``, for a GGUF product's operand: (N, width) of one of ``dtypes``, and its bias."""
    if np.dtype(a.dtype) not in dtypes:
        raise TypeError(f"GGUF: {name} must be {' or '.join(str(d) for d in dtypes)}, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"GGUF: {name} has shape {tuple(a.shape)}, expected (N, {width})")
    if bias is not None and (np.dtype(bias.dtype) != np.dtype(a.dtype) or tuple(bias.shape) != (width_bias,)):
        raise ValueError(f"GGUF: bias must be {a.dtype} of shape ({width_bias},), got {bias.dtype} {tuple(bias.shape)}")
