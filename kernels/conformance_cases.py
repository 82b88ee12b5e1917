"""The cases of the conformance suite (``conformance.py``): per API function, a hypothesis strategy of
small parameters and the inputs they stand for. Letters as in ``reference``.

A case is a dict of small ints and flags (what hypothesis shrinks and the report prints); the
arrays come from ``case["seed"]``, O(1) standard normals, so the relative tolerances of ``config``
mean something. What the cases cover, on purpose:

    shapes      N = 0 and 1, odd sizes, r = 1, r > min(D_in, D_out) (PEFT allows it); dense products of
                1 … 70 rows (decode-shaped: numba_cpu's one-row GEMV with a masked last step, its few-row kernel
                and BLAS on either side of its threshold)
    layouts     C, F and step-2 strided (non-contiguous) views of every float input
    LoRA        dropout masks (scaled by 1/keep), W=None (the LoRA term alone), bias or none, need_dx
    BGMV        index with repeats, gaps and −1 (base only), ranks zero-padded to the largest
    SGMV        sorted segments, empty ones included, an adapter or −1 per segment
    products    batched matmul with broadcast batch axes (a repeated matrix), K = 0, transposed views
    attention   RoPE on 2- to 5-axis inputs, T = 0 included; the causal softmax with a KV-cache offset
                (past > 0), padding masks and rows that see no key, any number of head axes; causal_attention
                with the same masks, query groups (GQA) of 1 to 3 heads, odd head sizes, keys after the last
                query's (a KV cache's buffer)
    SwiGLU      1 to 3 axes, empty ones included; gates of ±hundreds, where e^−g overflows
    RMSNorm     1 to 3 axes, d = 1, empty batches, a large eps, with and without dw
    LM loss     N = 0, V = 1, no label ignored, some, all; with and without dx and dW
    NF4         odd weight counts (a half-used last byte), block sizes 2 … 128, zero scales, and
                absmax with and without double quantization (an 8-bit round trip of the scales)
    GGUF        Q8_0, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K and Q6_K by name and by gguf type number,
                1 to 3 blocks a row, a zero-scale block; gguf_matmul_q8 up to 10 blocks a row (groups of 4
                blocks and the rest, as numba_cpu's VNNI GEMV reads them) and x with an all-zero block

NF4 and GGUF inputs are built here with plain NumPy: any uint8 is a valid pair of codes, so random bytes
and random scales are the whole format (``reference/nf4.py``); a GGUF block is random bytes with
finite f16 scales in its first 2 or 4 bytes, Q6_K's in bytes 208-209 (the 6-bit and int8 sub-block scales
are any bytes; ``reference/gguf.py``).
"""
import numpy as np
from hypothesis import strategies as st

from . import validate
from .common import xp

N_ = st.integers(0, 9)                          # rows, 0 included
D_ = st.integers(1, 9)                          # feature sizes, odd ones included
R_ = st.integers(1, 8)                          # ranks, drawn apart from D: r > min(D_in, D_out) happens
LAYOUT = st.sampled_from(["C", "F", "strided"])
SEED = st.integers(0, 2**16)
SCALING = st.sampled_from([2.0, 0.5, 1.5, 0.25])   # never 1: a dropped scaling must show
ADAPTERS = st.integers(1, 4)


def relayout(a, how):
    """The same values as a C-ordered, F-ordered, or step-2 strided (non-contiguous) array."""
    if a is None or how == "C":
        return a
    if how == "F":
        return xp(a).asfortranarray(a)
    big = xp(a).zeros(tuple(2 * n for n in a.shape), a.dtype)
    big[tuple(slice(None, None, 2) for _ in a.shape)] = a
    return big[tuple(slice(None, None, 2) for _ in a.shape)]


def _normal(rng, dtype, layout="C"):
    """f(*shape): O(1) standard normals of ``dtype`` in ``layout``."""
    return lambda *shape: relayout(rng.standard_normal(shape).astype(dtype), layout)


# -- dense -----------------------------------------------------------------------------------
FEW_ROWS = st.fixed_dictionaries(dict(N=st.integers(2, 70), D_in=st.integers(1, 40), D_out=st.integers(1, 40),
                                      bias=st.booleans(), layout=LAYOUT, seed=SEED))
DENSE = st.one_of(st.fixed_dictionaries(dict(N=N_, D_in=D_, D_out=D_, bias=st.booleans(), layout=LAYOUT, seed=SEED)),
                  FEW_ROWS)     # decode-shaped: a few rows (2 … 70) against a W of odd sizes
DENSE_GRAD = st.fixed_dictionaries(dict(N=N_, D_in=D_, D_out=D_, need_dx=st.booleans(), need_dW=st.booleans(),
                                        need_db=st.booleans(), keep_x=st.booleans(), layout=LAYOUT, seed=SEED))


def dense_forward(c, dtype, oracle):
    f = _normal(np.random.default_rng(c["seed"]), dtype, c["layout"])
    return f(c["N"], c["D_in"]), f(c["D_out"], c["D_in"]), f(c["D_out"]) if c["bias"] else None


def dense_backward(c, dtype, oracle):
    f = _normal(np.random.default_rng(c["seed"]), dtype, c["layout"])
    x, W, dy = f(c["N"], c["D_in"]), f(c["D_out"], c["D_in"]), f(c["N"], c["D_out"])
    x = x if c["keep_x"] or c["need_dW"] else None          # a frozen layer may drop its input
    return dy, x, W, c["need_dx"], c["need_dW"], c["need_db"]


# -- LoRA, one adapter -----------------------------------------------------------------------
LORA = st.fixed_dictionaries(dict(N=N_, D_in=D_, D_out=D_, r=R_, scaling=SCALING, masked=st.booleans(),
                                  base=st.booleans(), bias=st.booleans(), layout=LAYOUT, seed=SEED))
LORA_GRAD = st.fixed_dictionaries(dict(N=N_, D_in=D_, D_out=D_, r=R_, scaling=SCALING, masked=st.booleans(),
                                       base=st.booleans(), need_dx=st.booleans(), layout=LAYOUT, seed=SEED))


def _lora(c, dtype):
    rng = np.random.default_rng(c["seed"])
    f = _normal(rng, dtype, c["layout"])
    N, D_in, D_out, r = c["N"], c["D_in"], c["D_out"], c["r"]
    d = dict(x=f(N, D_in), W=f(D_out, D_in) if c["base"] else None, A=f(r, D_in), B=f(D_out, r),
             bias=f(D_out) if c.get("bias") else None, dy=f(N, D_out), mask=None)
    if c["masked"]:
        keep = 0.75
        d["mask"] = relayout(((rng.random((N, D_in)) < keep) / keep).astype(dtype), c["layout"])   # 1/keep
    return d


def lora_forward(c, dtype, oracle):
    d = _lora(c, dtype)
    return d["x"], d["W"], d["A"], d["B"], c["scaling"], d["bias"], d["mask"]


def lora_backward(c, dtype, oracle):
    d = _lora(c, dtype)
    h = oracle.lora_forward(d["x"], d["W"], d["A"], d["B"], c["scaling"], None, d["mask"])[1]
    h = relayout(np.asarray(h).astype(dtype), c["layout"])
    return d["dy"], d["x"], h, d["W"], d["A"], d["B"], c["scaling"], c["need_dx"], d["mask"]


# -- BGMV and SGMV: K adapters, ranks zero-padded to the largest ------------------------------
@st.composite
def _multi(draw, grad, segments):
    c = dict(N=draw(N_), D_in=draw(D_), D_out=draw(D_), K=draw(ADAPTERS))
    c["ranks"] = draw(st.lists(R_, min_size=c["K"], max_size=c["K"]))
    if segments:
        cuts = sorted(draw(st.lists(st.integers(0, c["N"]), max_size=4)))
        c["indptr"] = [0] + cuts + [c["N"]]                  # empty segments included
        c["seg_index"] = draw(st.lists(st.integers(-1, c["K"] - 1), min_size=len(cuts) + 1,
                                       max_size=len(cuts) + 1))
    else:
        c["index"] = draw(st.lists(st.integers(-1, c["K"] - 1), min_size=c["N"], max_size=c["N"]))
    c["bias" if not grad else "need_dx"] = draw(st.booleans())
    c.update(layout=draw(LAYOUT), seed=draw(SEED))
    return c


MULTI, MULTI_GRAD, SGMV, SGMV_GRAD = (_multi(grad, seg) for seg in (False, True) for grad in (False, True))


def _stacks(c, dtype):
    """x, W, A_stack (K, r, D_in), B_stack (K, D_out, r), scalings, bias, dy; adapter k's rows of A and
    columns of B past its own rank are zero (the padding of a mixed-rank stack)."""
    rng = np.random.default_rng(c["seed"])
    f = _normal(rng, dtype, c["layout"])
    N, D_in, D_out, K, r = c["N"], c["D_in"], c["D_out"], c["K"], max(c["ranks"])
    A_stack, B_stack = f(K, r, D_in), f(K, D_out, r)
    for k, r_k in enumerate(c["ranks"]):
        A_stack[k, r_k:], B_stack[k, :, r_k:] = 0, 0         # in place: the layout stays
    scalings = rng.choice([0.5, 2.0, 1.5], K).astype(dtype)
    return (f(N, D_in), f(D_out, D_in), A_stack, B_stack, scalings,
            f(D_out) if c.get("bias") else None, f(N, D_out))


def _rows(c):
    if "index" in c:
        return (np.array(c["index"], np.int64),)
    return np.array(c["indptr"], np.int64), np.array(c["seg_index"], np.int64)


def lora_forward_multi(c, dtype, oracle):
    x, W, A_stack, B_stack, scalings, bias, _ = _stacks(c, dtype)
    return (x, W, A_stack, B_stack, scalings, *_rows(c), bias)


def lora_backward_multi(c, dtype, oracle):
    x, W, A_stack, B_stack, scalings, _, dy = _stacks(c, dtype)
    forward = oracle.lora_forward_multi if "index" in c else oracle.lora_forward_sgmv
    h = relayout(np.asarray(forward(x, W, A_stack, B_stack, scalings, *_rows(c))[1]).astype(dtype), c["layout"])
    return (dy, x, h, W, A_stack, B_stack, scalings, *_rows(c), c["need_dx"])


lora_forward_sgmv, lora_backward_sgmv = lora_forward_multi, lora_backward_multi


# -- NF4 (QLoRA): a 4-bit frozen W ----------------------------------------------------------
NF4 = st.fixed_dictionaries(dict(N=st.integers(0, 5), D_out=D_, D_in=st.one_of(D_, st.sampled_from([32, 64, 96])),
                                 blocksize=st.sampled_from([64, 2, 4, 6, 8, 32, 128]), double_quant=st.booleans(),
                                 bias=st.booleans(), layout=LAYOUT, seed=SEED))


def double_quant_roundtrip(absmax, blocksize=256):
    """absmax after QLoRA's double quantization and back: centred on the mean, 8 bits per value with
    one float32 scale per ``blocksize`` values (a linear code here; the kernels only see the result)."""
    offset = np.float32(absmax.mean(dtype=np.float64))
    centred = absmax - offset
    out = np.empty_like(absmax)
    for b0 in range(0, absmax.size, blocksize):
        c = centred[b0:b0 + blocksize]
        scale = np.float32(np.abs(c).max()) or np.float32(1)
        out[b0:b0 + blocksize] = np.round(c / scale * 127) / 127 * scale + offset
    return np.maximum(out, 0).astype(np.float32)


def _nf4(c):
    """packed (ceil(n/2),) uint8, absmax (n_blocks,) float32 with a zero block, shape, blocksize."""
    rng = np.random.default_rng(c["seed"])
    n = c["D_out"] * c["D_in"]
    packed = rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)
    absmax = rng.uniform(0, 2, -(-n // c["blocksize"])).astype(np.float32)
    absmax[rng.integers(absmax.size)] = 0                           # an all-zero block
    if c["double_quant"]:
        absmax = double_quant_roundtrip(absmax)
    return rng, packed, absmax, (c["D_out"], c["D_in"]), c["blocksize"]


def nf4_dequantize(c, dtype, oracle):
    _, packed, absmax, shape, blocksize = _nf4(c)
    return packed, absmax, shape, blocksize, np.dtype(dtype).name


def nf4_matmul(c, dtype, oracle):
    rng, packed, absmax, shape, blocksize = _nf4(c)
    f = _normal(rng, dtype, c["layout"])
    return f(c["N"], shape[1]), packed, absmax, shape, blocksize, f(shape[0]) if c["bias"] else None


def nf4_matmul_dx(c, dtype, oracle):
    rng, packed, absmax, shape, blocksize = _nf4(c)
    return _normal(rng, dtype, c["layout"])(c["N"], shape[0]), packed, absmax, shape, blocksize


# -- GGUF: a frozen W in llama.cpp's quantized blocks -----------------------------------------
GGUF = st.fixed_dictionaries(dict(N=st.integers(0, 5), D_out=D_, blocks=st.integers(1, 3),
                                  qtype=st.sampled_from(["Q4_0", "Q8_0", "Q4_1", "Q4_K", 2, 8, 3, 12,
                                                         "Q5_0", "Q5_1", "Q5_K", "Q6_K", 6, 7, 13, 14]),
                                  bias=st.booleans(), layout=LAYOUT, seed=SEED))


_GGUF_SCALE = {"Q8_0": 1 / 64, "Q4_0": 1 / 8, "Q4_1": 1 / 8, "Q4_K": 1 / 256,
               "Q5_0": 1 / 16, "Q5_1": 1 / 32, "Q5_K": 1 / 512, "Q6_K": 1 / 2048}
_GGUF_SCALE_AT = {"Q8_0": (0, 1), "Q4_0": (0, 1), "Q5_0": (0, 1), "Q6_K": (208, 1)}   # f16 d: (byte, count)


def _gguf(c):
    """blocks (D_out, D_in / B · S) uint8: random bytes with finite f16 scales (one block's zero), shape, qtype."""
    rng = np.random.default_rng(c["seed"])
    name = validate.gguf_qtype(c["qtype"])
    B, S = validate.GGUF_FORMATS[name]
    D_out, D_in = c["D_out"], c["blocks"] * B
    raw = rng.integers(0, 256, (D_out * c["blocks"], S), dtype=np.uint8)
    at, halves = _GGUF_SCALE_AT.get(name, (0, 2))                  # d, or d and m / dmin at bytes 0-3
    scales = (rng.uniform(-1, 1, (raw.shape[0], halves)) * _GGUF_SCALE[name]).astype(np.float16)   # O(1) weights
    scales[rng.integers(raw.shape[0])] = 0                          # an all-zero block
    raw[:, at:at + 2 * halves] = scales.view(np.uint8).reshape(raw.shape[0], 2 * halves)
    return rng, raw.reshape(D_out, -1), c["qtype"], (D_out, D_in)


def gguf_dequantize(c, dtype, oracle):
    _, blocks, qtype, shape = _gguf(c)
    return blocks, qtype, shape, np.dtype(dtype).name


def gguf_matmul(c, dtype, oracle):
    rng, blocks, qtype, shape = _gguf(c)
    f = _normal(rng, dtype, c["layout"])
    return f(c["N"], shape[1]), blocks, qtype, shape, f(shape[0]) if c["bias"] else None


def gguf_matmul_q8(c, dtype, oracle):
    x, blocks, qtype, shape, bias = gguf_matmul(c, dtype, oracle)
    if x.shape[0]:
        x[0, :32] = 0                                               # a block of x with d = 0
    return x, blocks, qtype, shape, bias


def gguf_matmul_dx(c, dtype, oracle):
    rng, blocks, qtype, shape = _gguf(c)
    return _normal(rng, dtype, c["layout"])(c["N"], shape[0]), blocks, qtype, shape


# -- attention: the products, RoPE and the causal softmax -----------------------------------------
MATMUL = st.fixed_dictionaries(dict(lead=st.lists(st.integers(1, 3), max_size=3),
                                    repeat=st.lists(st.integers(0, 2), min_size=3, max_size=3), drop=st.integers(0, 3),
                                    M=N_, K=N_, N=N_, layout=LAYOUT, seed=SEED))
ROPE = st.fixed_dictionaries(dict(lead=st.lists(st.integers(0, 3), max_size=3), T=st.integers(0, 6),
                                  half=st.integers(1, 4), layout=LAYOUT, seed=SEED))
SOFTMAX = st.fixed_dictionaries(dict(B=st.integers(0, 3), heads=st.lists(st.integers(1, 3), max_size=2),
                                     T=st.integers(0, 6), past=st.integers(0, 4), key_mask=st.booleans(),
                                     layout=LAYOUT, seed=SEED))

ATTENTION = st.fixed_dictionaries(dict(B=st.integers(0, 3), H_kv=st.integers(1, 3), G=st.integers(1, 3),
                                       T=st.integers(0, 6), past=st.integers(0, 4), spare=st.integers(0, 3), h=D_,
                                       key_mask=st.booleans(), layout=LAYOUT, seed=SEED))


def matmul(c, dtype, oracle):
    """a (*lead_a, M, K) and b (*lead_b, K, N) whose batch axes broadcast: per axis of ``lead``, both have
    it (repeat 0), b has 1 (1: b's matrix repeats, as k over a query group in GQA) or a has 1 (2); b
    drops its first ``drop`` axes. Empty axes and K = 0 come from M, K, N = 0."""
    lead, rep = c["lead"], c["repeat"]
    lead_a = [1 if rep[i] == 2 else n for i, n in enumerate(lead)]
    lead_b = [1 if rep[i] == 1 else n for i, n in enumerate(lead)][c["drop"]:]
    f = _normal(np.random.default_rng(c["seed"]), dtype, c["layout"])
    return f(*lead_a, c["M"], c["K"]), f(*lead_b, c["K"], c["N"])


def rope_forward(c, dtype, oracle):
    """x (*lead, T, h) and tables with equal halves (transformers' layout), from random angles."""
    rng = np.random.default_rng(c["seed"])
    T, h = c["T"], 2 * c["half"]
    angles = rng.uniform(-4, 4, (T, c["half"]))
    cos, sin = (relayout(np.concatenate([f(angles)] * 2, axis=-1).astype(dtype), c["layout"]) for f in (np.cos, np.sin))
    return _normal(rng, dtype, c["layout"])(*c["lead"], T, h), cos, sin


rope_backward = rope_forward


def causal_softmax(c, dtype, oracle):
    """S (B, *heads, T, past + T), scores of a few units; key_mask (B, K) of 0/1 ints, with rows that
    see no key (a query before any unmasked key) whenever the mask starts with zeros."""
    rng = np.random.default_rng(c["seed"])
    B, T, K = c["B"], c["T"], c["past"] + c["T"]
    S = relayout((3 * rng.standard_normal((B, *c["heads"], T, K))).astype(dtype), c["layout"])
    key_mask = (rng.random((B, K)) < 0.7).astype(np.int64) if c["key_mask"] else None
    return S, key_mask, c["past"]


def causal_softmax_backward(c, dtype, oracle):
    """dP and a P from the oracle's forward (zeros where keys are hidden, rows of sum 1 or 0)."""
    S, key_mask, past = causal_softmax(c, dtype, oracle)
    P = relayout(np.asarray(oracle.causal_softmax(S, key_mask, past)).astype(dtype), c["layout"])
    return _normal(np.random.default_rng(c["seed"] + 1), dtype, c["layout"])(*S.shape), P


def causal_attention(c, dtype, oracle):
    """q (B, H_kv, G, T, h), k and v (B, H_kv, past + T + spare, h), the spare keys after every query's (a KV
    cache's unused buffer): scores q·k of a few units; key_mask as the softmax's (rows that see no key whenever
    the mask starts with zeros)."""
    rng = np.random.default_rng(c["seed"])
    B, H_kv, T, K, h = c["B"], c["H_kv"], c["T"], c["past"] + c["T"] + c["spare"], c["h"]
    f = _normal(rng, dtype, c["layout"])
    q = relayout((2 * rng.standard_normal((B, H_kv, c["G"], T, h)) / np.sqrt(h)).astype(dtype), c["layout"])
    key_mask = (rng.random((B, K)) < 0.7).astype(np.int64) if c["key_mask"] else None
    return q, f(B, H_kv, K, h), f(B, H_kv, K, h), key_mask, c["past"]


# -- activations: SwiGLU's gate ----------------------------------------------------------------
SILU = st.fixed_dictionaries(dict(shape=st.lists(st.integers(0, 5), min_size=1, max_size=3), scale=st.sampled_from([1.0, 4.0, 120.0]),
                                  layout=LAYOUT, seed=SEED))


def silu_and_mul(c, dtype, oracle):
    """g of a few units, or up to ±hundreds (e^−g overflows to inf: σ = 0 must come out, not NaN), and u."""
    f = _normal(np.random.default_rng(c["seed"]), dtype, c["layout"])
    g = (c["scale"] * f(*c["shape"])).astype(dtype)
    return relayout(g, c["layout"]), f(*c["shape"])


def silu_and_mul_backward(c, dtype, oracle):
    g, u = silu_and_mul(c, dtype, oracle)
    return _normal(np.random.default_rng(c["seed"] + 1), dtype, c["layout"])(*c["shape"]), g, u


# -- RMSNorm ----------------------------------------------------------------------------------
NORM = st.fixed_dictionaries(dict(shape=st.lists(st.integers(0, 4), max_size=2), d=st.integers(1, 9),
                                  eps=st.sampled_from([1e-6, 1e-5, 0.5]), need_dw=st.booleans(), layout=LAYOUT,
                                  seed=SEED))


def rms_norm(c, dtype, oracle):
    """x (*shape, d) and a weight away from 1 (a dropped weight must show)."""
    f = _normal(np.random.default_rng(c["seed"]), dtype, c["layout"])
    return f(*c["shape"], c["d"]), f(c["d"]), c["eps"]


def rms_norm_backward(c, dtype, oracle):
    """dy, x, weight, and rstd from the oracle's forward (float32 or wider, as the forward gives it)."""
    x, weight, eps = rms_norm(c, dtype, oracle)
    rstd = np.asarray(oracle.rms_norm(x, weight, eps)[1]).astype(np.promote_types(np.float32, dtype))
    dy = _normal(np.random.default_rng(c["seed"] + 1), dtype, c["layout"])(*x.shape)
    return dy, x, weight, relayout(rstd, c["layout"]), c["need_dw"]


# -- the LM head and cross-entropy ---------------------------------------------------------------
LOSS = st.fixed_dictionaries(dict(N=N_, d=D_, V=st.integers(1, 40), ignored=st.sampled_from([0.0, 0.3, 1.0]),
                                  scale=SCALING, need_dx=st.booleans(), need_dW=st.booleans(), layout=LAYOUT,
                                  seed=SEED))


def linear_cross_entropy(c, dtype, oracle):
    """x, W and labels, some ignored (none, about a third, all); rows cross ``config.LOSS_CHUNK_ROWS`` when the
    test shrinks it."""
    rng = np.random.default_rng(c["seed"])
    f = _normal(rng, dtype, c["layout"])
    labels = rng.integers(0, c["V"], c["N"])
    labels[rng.random(c["N"]) < c["ignored"]] = -100
    return f(c["N"], c["d"]), f(c["V"], c["d"]), labels, c["scale"], -100, c["need_dx"], c["need_dW"]


# -- per API function: (strategy, inputs(case, dtype, oracle) -> args, explicit edge cases) --------
_EDGE_FEW_ROWS = [dict(N=1, D_in=37, D_out=11), dict(N=1, D_in=48, D_out=2), dict(N=2, D_in=1, D_out=1), dict(N=5, D_in=9, D_out=7), dict(N=33, D_in=17, D_out=13),
                  dict(N=64, D_in=33, D_out=6), dict(N=70, D_in=40, D_out=5)]
_EDGE_LORA = [dict(N=0, D_in=1, D_out=1, r=1), dict(N=1, D_in=1, D_out=1, r=1), dict(N=3, D_in=6, D_out=2, r=8)]
_EDGE_MULTI = [dict(N=1, D_in=1, D_out=1, K=1, ranks=[1], index=[-1]), dict(N=0, D_in=2, D_out=3, K=2, ranks=[1, 2],
               index=[]), dict(N=5, D_in=2, D_out=3, K=3, ranks=[7, 2, 1], index=[2, -1, 0, 2, 0])]
_EDGE_SGMV = [dict(N=0, D_in=1, D_out=1, K=1, ranks=[1], indptr=[0, 0], seg_index=[0]),
              dict(N=9, D_in=6, D_out=2, K=2, ranks=[8, 3], indptr=[0, 3, 3, 7, 9], seg_index=[1, 0, -1, 1])]
_EDGE_NF4 = [dict(N=0, D_out=1, D_in=1, blocksize=2, double_quant=False), dict(N=3, D_out=3, D_in=5, blocksize=4,
             double_quant=True), dict(N=2, D_out=5, D_in=64, blocksize=64, double_quant=True)]

_EDGE_GGUF = [dict(N=n, D_out=d, blocks=k, qtype=q) for q in ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K",
                                                                "Q6_K")
              for n, d, k in ((0, 1, 1), (1, 3, 2), (3, 5, 1))]

GGUF_Q8 = st.fixed_dictionaries(dict(N=st.integers(0, 5), D_out=D_, blocks=st.integers(1, 10),
                                     qtype=st.sampled_from(["Q4_0", "Q4_1", "Q8_0", "Q4_K", 2, 3, "Q6_K"]),
                                     bias=st.booleans(), layout=LAYOUT, seed=SEED))
_EDGE_GGUF_Q8 = [dict(N=n, D_out=d, blocks=k, qtype=q) for q in ("Q4_0", "Q4_1", "Q8_0")
                 for n, d, k in ((0, 1, 1), (1, 5, 4), (1, 9, 10), (3, 5, 6))]

_EDGE_MATMUL = [dict(lead=[], repeat=[0, 0, 0], drop=0, M=1, K=0, N=3),
                dict(lead=[2, 3, 2], repeat=[0, 0, 1], drop=0, M=5, K=4, N=1),
                dict(lead=[3, 2], repeat=[2, 1, 0], drop=1, M=1, K=2, N=2),
                dict(lead=[3, 2], repeat=[0, 0, 0], drop=2, M=0, K=2, N=2)]
_EDGE_ROPE = [dict(lead=[], T=1, half=1), dict(lead=[0, 2], T=3, half=2), dict(lead=[2, 3, 1], T=6, half=4)]
_EDGE_SOFTMAX = [dict(B=1, heads=[], T=1, past=0, key_mask=False), dict(B=0, heads=[2], T=3, past=1, key_mask=True),
                 dict(B=3, heads=[2, 3], T=6, past=4, key_mask=True), dict(B=2, heads=[1], T=0, past=2, key_mask=True)]

_EDGE_ATTENTION = [dict(B=1, H_kv=1, G=1, T=1, past=0, h=1, key_mask=False),
                   dict(B=2, H_kv=3, G=3, T=1, past=5, spare=3, h=8, key_mask=True),
                   dict(B=3, H_kv=2, G=2, T=6, past=4, h=9, key_mask=True),
                   dict(B=2, H_kv=1, G=2, T=0, past=2, spare=1, h=4, key_mask=True),
                   dict(B=0, H_kv=2, G=1, T=3, past=1, h=3)]

_EDGE_SILU = [dict(shape=[1], scale=1.0), dict(shape=[0, 3], scale=4.0), dict(shape=[4, 5], scale=120.0)]

_EDGE_NORM = [dict(shape=[], d=1, eps=1e-6, need_dw=True), dict(shape=[0], d=3, eps=1e-5, need_dw=True),
              dict(shape=[3, 4], d=9, eps=0.5, need_dw=False)]

_EDGE_LOSS = [dict(N=0, d=1, V=1, ignored=0.0), dict(N=1, d=1, V=1, ignored=0.0), dict(N=5, d=3, V=7, ignored=1.0),
              dict(N=9, d=4, V=40, ignored=0.3)]


def _edges(edges, **defaults):
    return [{**defaults, **e} for e in edges]


_LORA_F = dict(scaling=2.0, masked=True, base=True, bias=True, layout="strided", seed=0)
_LORA_B = dict(scaling=2.0, masked=True, base=True, need_dx=True, layout="strided", seed=0)
CASES = {
    "dense_forward": (DENSE, dense_forward, [dict(N=0, D_in=1, D_out=1, bias=True, layout="C", seed=0)]
                      + _edges(_EDGE_FEW_ROWS, bias=True, layout="C", seed=0)),
    "dense_backward": (DENSE_GRAD, dense_backward, [dict(N=1, D_in=1, D_out=1, need_dx=True, need_dW=False,
                                                         need_db=True, keep_x=False, layout="strided", seed=0)]),
    "lora_forward": (LORA, lora_forward, _edges(_EDGE_LORA, **_LORA_F) + _edges(_EDGE_LORA[2:], **{**_LORA_F,
                                                                                                    "base": False})),
    "lora_backward": (LORA_GRAD, lora_backward, _edges(_EDGE_LORA, **_LORA_B) + _edges(_EDGE_LORA[2:], **{
        **_LORA_B, "base": False})),
    "lora_forward_multi": (MULTI, lora_forward_multi, _edges(_EDGE_MULTI, bias=True, layout="F", seed=0)),
    "lora_backward_multi": (MULTI_GRAD, lora_backward_multi, _edges(_EDGE_MULTI, need_dx=True, layout="F", seed=0)),
    "lora_forward_sgmv": (SGMV, lora_forward_sgmv, _edges(_EDGE_SGMV, bias=True, layout="strided", seed=0)),
    "lora_backward_sgmv": (SGMV_GRAD, lora_backward_sgmv, _edges(_EDGE_SGMV, need_dx=True, layout="strided",
                                                                 seed=0)),
    "nf4_dequantize": (NF4, nf4_dequantize, _edges(_EDGE_NF4, bias=False, layout="C", seed=0)),
    "nf4_matmul": (NF4, nf4_matmul, _edges(_EDGE_NF4, bias=True, layout="F", seed=0)),
    "nf4_matmul_dx": (NF4, nf4_matmul_dx, _edges(_EDGE_NF4, bias=False, layout="strided", seed=0)),
    "gguf_dequantize": (GGUF, gguf_dequantize, _edges(_EDGE_GGUF, bias=False, layout="C", seed=0)),
    "gguf_matmul": (GGUF, gguf_matmul, _edges(_EDGE_GGUF, bias=True, layout="strided", seed=0)),
    "gguf_matmul_dx": (GGUF, gguf_matmul_dx, _edges(_EDGE_GGUF, bias=False, layout="F", seed=0)),
    "gguf_matmul_q8": (GGUF_Q8, gguf_matmul_q8, _edges(_EDGE_GGUF_Q8, bias=True, layout="strided", seed=0)),
    "matmul": (MATMUL, matmul, _edges(_EDGE_MATMUL, layout="strided", seed=0)),
    "rope_forward": (ROPE, rope_forward, _edges(_EDGE_ROPE, layout="strided", seed=0)),
    "rope_backward": (ROPE, rope_backward, _edges(_EDGE_ROPE, layout="F", seed=0)),
    "causal_softmax": (SOFTMAX, causal_softmax, _edges(_EDGE_SOFTMAX, layout="strided", seed=0)),
    "causal_softmax_backward": (SOFTMAX, causal_softmax_backward, _edges(_EDGE_SOFTMAX, layout="F", seed=0)),
    "causal_attention": (ATTENTION, causal_attention, _edges(_EDGE_ATTENTION, key_mask=False, spare=0,
                                                             layout="strided", seed=0)),
    "silu_and_mul": (SILU, silu_and_mul, _edges(_EDGE_SILU, layout="strided", seed=0)),
    "silu_and_mul_backward": (SILU, silu_and_mul_backward, _edges(_EDGE_SILU, layout="F", seed=0)),
    "rms_norm": (NORM, rms_norm, _edges(_EDGE_NORM, layout="strided", seed=0)),
    "rms_norm_backward": (NORM, rms_norm_backward, _edges(_EDGE_NORM, layout="F", seed=0)),
    "linear_cross_entropy": (LOSS, linear_cross_entropy, _edges(_EDGE_LOSS, scale=0.5, need_dx=True, need_dW=True,
                                                                layout="strided", seed=0)),
}
