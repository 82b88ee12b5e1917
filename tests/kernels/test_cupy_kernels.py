"""The CuPy GPU kernels equal the NumPy reference; the engine trains the same on the GPU.

GPU tests share one marker (``gpu``) and skip with "no CUDA device" when CuPy has no usable
device. Outputs come from poisoned memory (the pool is filled with NaN before each call), block
sizes are shrunk through kernels/config.py so small shapes cross block borders, and float16
is held to a float32 reference at 1e-2. The first tests run without a GPU: import hygiene,
argument checks, and the launch geometry: the index helpers of cuda/common.cu, read from the
source and evaluated in Python over launch.py's grids (so a wrong index in the .cu file fails here).
"""
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank as lr
from lowrank.nn.device import cupy_module
from lowrank.kernels import api, backends
from lowrank.kernels import config, reference
from lowrank.kernels.common import NF4_CODE

cp = cupy_module()
gpu = pytest.mark.skipif(cp is None, reason="no CUDA device")
SHRUNK = dict(CUPY_SHRINK_ROWS=3, CUPY_SHRINK_RANKS=5, CUPY_SHRINK_THREADS=32, CUPY_EXPAND_ROWS=3,
              CUPY_EXPAND_THREADS=32, CUPY_GEMV_ROWS=2, CUPY_GEMV_WARPS=2, CUPY_NF4_THREADS=32)
SIZES = pytest.mark.parametrize("sizes", [{}, SHRUNK], ids=["default-blocks", "shrunk-blocks"])


def _gpu_module():
    return pytest.importorskip("lowrank.kernels.cupy_gpu", reason="cupy is not installed", exc_type=ImportError)


@contextmanager
def _config(**values):
    """Set kernels/config.py values for the block, then restore them."""
    old = {k: getattr(config, k) for k in values}
    for k, v in values.items():
        setattr(config, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(config, k, v)


# -- without a GPU ---------------------------------------------------------------------------------
def _python(code, **env):
    import os
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    return run.returncode, run.stdout + run.stderr


def test_import_touches_no_device():
    """With no device visible, any device call would raise: importing must not make one."""
    rc, out = _python("import lowrank, lowrank.nn.dispatch\n"
                      "try:\n    import lowrank.kernels.cupy_gpu\n"
                      "except ImportError as e:\n    assert 'needs CuPy' in str(e), e\n"
                      "print('ok')", CUDA_VISIBLE_DEVICES="")
    assert rc == 0 and "ok" in out, out


def test_import_without_cupy_is_a_clear_import_error():
    rc, out = _python("import sys; sys.modules['cupy'] = None\n"
                      "import lowrank.nn.dispatch as d; assert not d.available('cupy')\n"
                      "import lowrank.kernels.cupy_gpu")
    assert rc != 0 and "ImportError" in out and "pip install 'lowrank[gpu]'" in out, out


def test_numpy_inputs_are_refused_before_any_launch(rng):
    g = _gpu_module()
    x, W = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    A, B = rng.standard_normal((2, 4)).astype(np.float32), np.zeros((5, 2), np.float32)
    with pytest.raises(TypeError, match="cupy_gpu kernels take CuPy arrays; x is a numpy.ndarray"):
        g.lora_forward(x, W, A, B, 1.0)
    with pytest.raises(ValueError, match="W has shape"):
        g.dense_forward(x, W.T)


def test_defines_follow_config(cuda_launch):
    g = cuda_launch
    with _config(**SHRUNK):
        assert "-DSHRINK_THREADS=32" in g.defines() and "-DGEMV_WARPS=2" in g.defines()
    assert "-DSHRINK_THREADS=256" in g.defines()


def _cuda(name):
    return (Path(api.__file__).parent / "cupy_gpu" / "cuda" / name).read_text()


HELPER = re.compile(r"__device__ __forceinline__ (?:int|long long) (\w+)\(([^)]*)\) \{ return (.+); \}")


def _index_helpers(launch):
    """The launch-geometry helpers of cuda/common.cu (the block after "// Launch geometry", up to a blank
    line) as Python functions, with the block sizes of ``config`` now: C's / on ints >= 0 is Python's //."""
    block = _cuda("common.cu").split("// Launch geometry", 1)[1].split("\n\n", 1)[0]
    sizes = {m: int(getattr(config, "CUPY_" + m)) for m in launch.MACROS}
    helpers = {}
    for line in block.splitlines():
        if line.startswith("__device__"):
            name, params, expr = HELPER.fullmatch(line).groups()
            args = ", ".join(p.split()[-1] for p in params.split(","))
            helpers[name] = eval(f"lambda {args}: {expr.replace('/', '//')}", dict(sizes))
    return helpers


def test_sources_take_block_sizes_from_defines_and_index_through_the_helpers(cuda_launch):
    """launch.defines() is the only source of block sizes (no defaults in the .cu files), and the
    kernels call every helper that the geometry tests below evaluate."""
    common, kernel_src = _cuda("common.cu"), _cuda("lora.cu") + _cuda("nf4.cu")
    assert set(re.findall(r"!defined\((\w+)\)", common)) == set(cuda_launch.MACROS)
    assert not re.search(r"#define (%s)\b" % "|".join(cuda_launch.MACROS), common + kernel_src)
    helpers = _index_helpers(cuda_launch)
    assert {"shrink_row", "expand_col", "gemv_col", "dequant_elem", "stride_k0"} <= set(helpers)
    assert [n for n in helpers if f"{n}(" not in kernel_src] == []


def test_vectorizable_needs_aligned_rows(cuda_launch):
    g = cuda_launch
    assert g.vectorizable((256, 512), 64, 2) and g.vectorizable((0, 16), 4, 4)
    assert not g.vectorizable((256, 8), 64, 2) and not g.vectorizable((0, 0), 6, 4)
    assert g.vectorizable((8, 16), 4, 2, width=8) and not g.vectorizable((4,), 4, 2, width=8)   # 4 halves


@settings(max_examples=15)
@given(D=st.integers(1, 300), shrunk=st.booleans())
def test_vector_loops_cover_every_column_once(cuda_launch, D, shrunk):
    """The block-stride loops (stride_k0, stride_step) of the shrink's block and of a GEMV warp
    (lanes by lane_of) visit each k < D exactly once, for every load width the kernels use."""
    with _config(**(SHRUNK if shrunk else {})):
        ix = _index_helpers(cuda_launch)
        shrink = list(range(config.CUPY_SHRINK_THREADS))
        warp = [ix["lane_of"](32 + t) for t in range(32)]          # the second warp's lanes
        loops = [(shrink, 1), (shrink, 4)] + [(warp, V) for V in (1, 4, 8)]
        for threads, V in loops:
            if D % V:
                continue                                              # the wrapper picks the scalar loop
            step = ix["stride_step"](len(threads), V)
            ks = [k + v for t in threads for k in range(ix["stride_k0"](t, V), D, step) for v in range(V)]
            assert sorted(ks) == list(range(D)), (len(threads), V)


def test_nibble_order_matches_the_reference(cuda_launch, rng):
    """nibble_shift: element e of the packed codes, read the kernels' way, is the reference's element."""
    packed, n = rng.integers(0, 256, 9).astype(np.uint8), 17
    shift = _index_helpers(cuda_launch)["nibble_shift"]
    got = [NF4_CODE[(int(packed[e // 2]) >> shift(e)) & 15] for e in range(n)]
    want = reference.nf4_dequantize(packed, np.ones(1, np.float32), (1, n), blocksize=18)[0]
    np.testing.assert_array_equal(got, want)


def test_grid_y_limit_is_a_clear_error(cuda_launch):
    g = cuda_launch
    with pytest.raises(ValueError, match="CUPY_EXPAND_ROWS"):
        g.expand_geometry(65535 * config.CUPY_EXPAND_ROWS + 1, 8)
    with pytest.raises(ValueError, match="blocks along y"):
        g.shrink_geometry(1, 65535 * config.CUPY_SHRINK_RANKS + 1)


@settings(max_examples=15)
@given(N=st.integers(1, 40), r=st.integers(1, 40), D=st.integers(1, 90), shrunk=st.booleans())
def test_launch_geometry_writes_every_output_once(cuda_launch, N, r, D, shrunk):
    """The kernels' own index helpers over launch.py's grids: each (row, column) of h, y and W is
    written exactly once, and the shrink writes output t of a block where it summed it."""
    g = cuda_launch
    with _config(**(SHRUNK if shrunk else {})):
        ix, R, J = _index_helpers(g), config.CUPY_SHRINK_ROWS, config.CUPY_SHRINK_RANKS
        (gx, gy, _), _ = g.shrink_geometry(N, r)                      # a block reduces R x J outputs
        h = [(ix["shrink_row"](bx, t), ix["shrink_rank"](by, t)) for bx in range(gx) for by in range(gy)
             for t in range(R * J)]
        summed = [(ix["shrink_row"](bx, 0) + i, ix["shrink_rank"](by, 0) + j)    # acc[i][j], part slot i J + j
                  for bx in range(gx) for by in range(gy) for i in range(R) for j in range(J)]
        assert h == summed
        (gx, gy, _), (tx, _, _) = g.expand_geometry(N, D)            # thread = output o, EXPAND_ROWS rows
        y = [(ix["expand_row"](by, i), ix["expand_col"](bx, t)) for bx in range(gx) for by in range(gy)
             for t in range(tx) for i in range(config.CUPY_EXPAND_ROWS)]
        (gx, _, _), (tx, _, _) = g.gemv_geometry(D)                   # warp = output o, lane 0 writes
        v = [(n, ix["gemv_col"](bx, t)) for bx in range(gx) for t in range(tx) if ix["lane_of"](t) == 0
             for n in range(N)]
        (gx, _, _), (tx, _, _) = g.dequant_geometry(N * D)            # thread = byte = elements e, e + 1
        e = [ix["dequant_elem"](bx, t) + i for bx in range(gx) for t in range(tx) for i in (0, 1)]
    for got, rows, cols in ((h, N, r), (y, N, D), (v, N, D)):
        kept = [p for p in got if p[0] < rows and p[1] < cols]
        assert sorted(kept) == [(n, c) for n in range(rows) for c in range(cols)]
    assert sorted(k for k in e if k < N * D) == list(range(N * D))


# -- on the GPU: every kernel against the reference ------------------------------------------------
def _poison():
    """Fill the memory pool with NaN so that outputs never written show up."""
    cp.get_default_memory_pool().free_all_blocks()
    cp.full(1 << 22, cp.nan, cp.float32)                             # 16 MiB, freed back to the pool


def _close(got, want, dtype):
    """Elementwise within config's tolerances, atol relative to the array's largest entry."""
    got, want = cp.asnumpy(got).astype(np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max(initial=0)))
    np.testing.assert_allclose(got, want, rtol=config.RTOL[dtype], atol=config.ATOL[dtype] * scale)


def _host32(*arrays):
    return [None if a is None else np.asarray(a, np.float32) for a in arrays]


def _dev(dtype, *arrays):
    return [None if a is None else cp.asarray(a, dtype) for a in arrays]


shapes = st.tuples(st.integers(1, 37), st.integers(1, 70), st.integers(1, 70), st.integers(1, 20))


@gpu
@SIZES
@settings(max_examples=20)
@given(shape=shapes, dtype=st.sampled_from(["float32", "float16"]), gemv_max=st.sampled_from([0, 4, 64]),
       blas_shrink=st.sampled_from([1, 1000]), mask=st.booleans(), base=st.booleans(), bias=st.booleans(),
       need_dx=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_matches_reference(sizes, shape, dtype, gemv_max, blas_shrink, mask, base, bias, need_dx, seed):
    g = _gpu_module()
    N, D_in, D_out, r = shape
    rng = np.random.default_rng(seed)
    x, W, A, B = (rng.standard_normal(s) for s in ((N, D_in), (D_out, D_in), (r, D_in), (D_out, r)))
    b = rng.standard_normal(D_out) if bias else None
    m = (rng.random((N, D_in)) > 0.3) / 0.7 if mask else None
    W = W if base else None
    dy, s = rng.standard_normal((N, D_out)), float(rng.uniform(0.1, 3))
    y_ref, h_ref = reference.lora_forward(*_host32(x, W, A, B), s, *_host32(b, m))
    grads_ref = reference.lora_backward(*_host32(dy, x, h_ref, W, A, B), s, need_dx, *_host32(m))
    with _config(**sizes, CUPY_GEMV_MAX_N=gemv_max, CUPY_CUBLAS_SHRINK_MIN_N=blas_shrink):
        _poison()
        y, h = g.lora_forward(*_dev(dtype, x, W, A, B), s, *_dev(dtype, b, m))
        _poison()
        grads = g.lora_backward(*_dev(dtype, dy, x), h, *_dev(dtype, W, A, B), s, need_dx, *_dev(dtype, m))
    assert (grads[0] is None) == (not need_dx)
    for got, want in zip((y, h) + grads, (y_ref, h_ref) + grads_ref):
        if want is not None:
            assert got.dtype == np.dtype(dtype)
            _close(got, want, dtype)


@gpu
@SIZES
@settings(max_examples=15)
@given(shape=shapes, K=st.integers(1, 5), dtype=st.sampled_from(["float32", "float16"]),
       gemv_max=st.sampled_from([0, 64]), sgmv=st.booleans(), seed=st.integers(0, 2**16))
def test_multi_adapter_matches_reference(sizes, shape, K, dtype, gemv_max, sgmv, seed):
    g = _gpu_module()
    N, D_in, D_out, r = shape
    rng = np.random.default_rng(seed)
    x, W, b, dy = (rng.standard_normal(s) for s in ((N, D_in), (D_out, D_in), (D_out,), (N, D_out)))
    A_stack, B_stack = rng.standard_normal((K, r, D_in)), rng.standard_normal((K, D_out, r))
    scal = rng.uniform(0.1, 2, K)
    index = np.sort(rng.integers(-1, K, N)) if sgmv else rng.integers(-1, K, N)       # −1: base only
    seg_index, counts = np.unique(index, return_counts=True)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    y_ref, h_ref = reference.lora_forward_multi(*_host32(x, W, A_stack, B_stack, scal), index, *_host32(b))
    grads_ref = reference.lora_backward_multi(*_host32(dy, x, h_ref, W, A_stack, B_stack, scal), index)
    args = _dev(dtype, x, W, A_stack, B_stack) + [cp.asarray(scal, dtype)]
    with _config(**sizes, CUPY_GEMV_MAX_N=gemv_max):
        _poison()
        if sgmv:
            y, h = g.lora_forward_sgmv(*args, cp.asarray(indptr), cp.asarray(seg_index), *_dev(dtype, b))
            _poison()
            grads = g.lora_backward_sgmv(*_dev(dtype, dy), args[0], h, *args[1:], cp.asarray(indptr),
                                         cp.asarray(seg_index))
        else:
            y, h = g.lora_forward_multi(*args, cp.asarray(index), *_dev(dtype, b))
            _poison()
            grads = g.lora_backward_multi(*_dev(dtype, dy), args[0], h, *args[1:], cp.asarray(index))
    for got, want in zip((y, h) + grads, (y_ref, h_ref) + grads_ref):
        _close(got, want, dtype)


@gpu
@SIZES
@settings(max_examples=10)
@given(shape=shapes, dtype=st.sampled_from(["float32", "float16"]), gemv_max=st.sampled_from([0, 64]),
       need=st.tuples(st.booleans(), st.booleans(), st.booleans()), seed=st.integers(0, 2**16))
def test_dense_matches_reference(sizes, shape, dtype, gemv_max, need, seed):
    g = _gpu_module()
    N, D_in, D_out, _ = shape
    rng = np.random.default_rng(seed)
    x, W, b, dy = (rng.standard_normal(s) for s in ((N, D_in), (D_out, D_in), (D_out,), (N, D_out)))
    with _config(**sizes, CUPY_GEMV_MAX_N=gemv_max):
        _poison()
        _close(g.dense_forward(*_dev(dtype, x, W, b)), reference.dense_forward(*_host32(x, W, b)), dtype)
        _poison()
        x_arg = _dev(dtype, x)[0] if need[1] else None                # a frozen layer keeps no x
        got = g.dense_backward(*_dev(dtype, dy), x_arg, *_dev(dtype, W), *need)
    want = reference.dense_backward(*_host32(dy, x, W), *need)
    for gt, wt in zip(got, want):
        assert (gt is None) == (wt is None)
        if wt is not None:
            _close(gt, wt, dtype)


@gpu
@pytest.mark.parametrize("gemv_max", [0, 4])
def test_zero_rows_launch_nothing_and_give_zero_gradients(gemv_max):
    g = _gpu_module()
    x, dy = cp.zeros((0, 5), cp.float32), cp.zeros((0, 4), cp.float32)
    W, A, B, b = (cp.ones(s, cp.float32) for s in ((4, 5), (2, 5), (4, 2), (4,)))
    with _config(CUPY_GEMV_MAX_N=gemv_max):
        y, h = g.lora_forward(x, W, A, B, 1.0, b)
        dx, dA, dB = g.lora_backward(dy, x, h, W, A, B, 1.0)
    assert y.shape == (0, 4) and h.shape == (0, 2) and dx.shape == (0, 5)
    assert not dA.any() and not dB.any()


@gpu
def test_float64_falls_back_to_cublas_reference(rng):
    g = _gpu_module()
    x, W, A, B = (rng.standard_normal(s) for s in ((5, 7), (6, 7), (3, 7), (6, 3)))
    y, h = g.lora_forward(*_dev(np.float64, x, W, A, B), 0.5)
    y_ref, h_ref = reference.lora_forward(x, W, A, B, 0.5)
    _close(y, y_ref, "float64")
    _close(h, h_ref, "float64")


def _nf4_quantized(rng, D_out, D_in, blocksize):
    """Random codes and scales, and W from them in float64 (the obviously-correct formula)."""
    n = D_out * D_in
    q = rng.integers(0, 16, n)
    absmax = rng.uniform(0.5, 2, -(-n // blocksize)).astype(np.float32)
    pairs = np.append(q, 0)[: 2 * ((n + 1) // 2)].reshape(-1, 2)
    packed = (pairs[:, 0] << 4 | pairs[:, 1]).astype(np.uint8)          # first element: high nibble
    W = NF4_CODE.astype(np.float64)[q] * absmax.astype(np.float64)[np.arange(n) // blocksize]
    return packed, absmax, W.reshape(D_out, D_in)


@gpu
@SIZES
@settings(max_examples=15)
@given(N=st.integers(1, 9), D_out=st.integers(1, 40), D_in=st.sampled_from([1, 7, 8, 64, 72]),
       blocksize=st.sampled_from([2, 6, 64]), dtype=st.sampled_from(["float32", "float16", "float64"]),
       gemv_max=st.sampled_from([0, 8]), seed=st.integers(0, 2**16))
def test_nf4_matches_formula(sizes, N, D_out, D_in, blocksize, dtype, gemv_max, seed):
    g = _gpu_module()
    rng = np.random.default_rng(seed)
    packed, absmax, W = _nf4_quantized(rng, D_out, D_in, blocksize)
    x, dy, b = rng.standard_normal((N, D_in)), rng.standard_normal((N, D_out)), rng.standard_normal(D_out)
    nf4 = (cp.asarray(packed), cp.asarray(absmax), (D_out, D_in), blocksize)
    with _config(**sizes, CUPY_GEMV_MAX_N=gemv_max):
        _poison()
        _close(g.nf4_dequantize(*nf4, dtype=dtype), W, dtype)
        _poison()
        _close(g.nf4_matmul(*_dev(dtype, x), *nf4, bias=_dev(dtype, b)[0]), x @ W.T + b, dtype)
        _poison()
        _close(g.nf4_matmul_dx(*_dev(dtype, dy), *nf4), dy @ W, dtype)


# -- on the GPU: the whole engine ------------------------------------------------------------------
def _train(device, steps=40):
    """A LoRA MLP (dropout on) on a fixed 3-class problem; returns (losses, accuracy, model)."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((96, 6)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
    model = lr.MLP([6, 32, 3], seed=0)
    model.set_submodule("0", lr.LoraLinear(model[0], r=4, lora_alpha=8, lora_dropout=0.1, seed=2))
    model.set_submodule("2", lr.LoraLinear(model[2], r=2, lora_alpha=4, seed=3))
    model.to(device)
    Xd, yd = lr.to_device(X, device), lr.to_device(y, device)
    opt, loss_fn, losses = lr.Adam(model.parameters(), lr=1e-2), lr.CrossEntropyLoss(), []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(float(loss_fn(model(Xd), yd)))
        model.backward(loss_fn.backward())
        opt.step()
    model.eval()
    accuracy = float((lr.to_device(model(Xd), "cpu").argmax(1) == y).mean())
    return np.array(losses), accuracy, model


@gpu
def test_lora_mlp_trains_the_same_on_gpu_and_cpu():
    loss_cpu, acc_cpu, _ = _train("cpu")
    loss_gpu, acc_gpu, model = _train("gpu")
    assert loss_gpu[-1] < 0.7 * loss_gpu[0]
    np.testing.assert_allclose(loss_gpu, loss_cpu, rtol=1e-3, atol=1e-4)
    assert abs(acc_gpu - acc_cpu) <= 1 / 96
    assert lr.kernels_for(model[0].weight.data).__name__.endswith("cupy_gpu")


@gpu
def test_module_to_gpu_and_back_round_trips():
    model = lr.MLP([5, 7, 2], seed=4)
    model.set_submodule("0", lr.LoraLinear(model[0], r=3, seed=5))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    model.to("gpu")
    assert all(type(v).__module__.startswith("cupy") for v in model.state_dict().values())
    model.to("cpu")
    for k, v in model.state_dict().items():
        assert isinstance(v, np.ndarray) and v.dtype == before[k].dtype
        np.testing.assert_array_equal(v, before[k])
