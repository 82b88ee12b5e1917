"""numba_cpu's one thread pool (kernels/numba_cpu/pool.py, blas.matmul): the GEMM tasks give NumPy's
products on any layout, batch broadcast and split; the serial and parallel twins of a loop are two
compilations; a forked child, where GNU OpenMP's pool cannot run, falls back to the serial paths and
still computes; thread limits leave SciPy's BLAS at one thread; a decoder step is the same either way."""
import multiprocessing

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from threadpoolctl import ThreadpoolController

import lowrank as lr
from lowrank.kernels import config
from lowrank.kernels.numba_cpu import blas, pool

needs_pool = pytest.mark.skipif(pool.layer() not in ("omp", "tbb") or numba.config.NUMBA_NUM_THREADS < 2,
                                reason=f"Numba's pool is not usable here (layer {pool.layer()!r}, "
                                       f"{numba.config.NUMBA_NUM_THREADS} threads): the products are NumPy's")


@pytest.fixture
def every_product_on_the_pool(monkeypatch):
    """Tiny products and loops go on the pool too (below NUMBA_POOL_MIN_MACS / _ELEMENTS they are NumPy's
    products and serial loops), products cut in blocks.
    Set once for all of a test's examples: nothing here changes between them."""
    monkeypatch.setattr(config, "NUMBA_PARALLEL", True)
    monkeypatch.setattr(config, "NUMBA_POOL_MIN_MACS", 1)
    monkeypatch.setattr(config, "NUMBA_POOL_MIN_ELEMENTS", 1)
    old = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield
    numba.set_num_threads(old)


def layout(rng, a, how):
    """The same values as C order, a transposed (F-ordered matrices) view, or a column-strided view."""
    if how == "T":
        return np.ascontiguousarray(a.swapaxes(-1, -2)).swapaxes(-1, -2)
    if how == "strided":
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    if how == "head-major":                       # (B, T, H, h) memory seen as (B, H, T, h), as attention's q
        return np.ascontiguousarray(a.swapaxes(-3, -2)).swapaxes(-3, -2) if a.ndim >= 3 else a
    return a


SHAPES = st.fixed_dictionaries(dict(
    M=st.sampled_from([0, 1, 2, 7, 33]), K=st.sampled_from([0, 1, 5, 40]), N=st.sampled_from([1, 3, 64]),
    lead=st.lists(st.integers(1, 3), max_size=2), b_repeats=st.booleans(), b_drops=st.booleans(),
    la=st.sampled_from(["C", "T", "strided", "head-major"]), lb=st.sampled_from(["C", "T", "strided", "head-major"]),
    dtype=st.sampled_from(["float32", "float64"]), alpha=st.sampled_from([1.0, 0.5]), seed=st.integers(0, 2**16)))


@needs_pool
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=SHAPES)
def test_pool_products_equal_numpy_on_any_layout_and_batch(c, every_product_on_the_pool):
    rng = np.random.default_rng(c["seed"])
    lead_b = [1 if c["b_repeats"] else n for n in c["lead"]][1 if c["b_drops"] else 0:]
    a = layout(rng, rng.standard_normal((*c["lead"], c["M"], c["K"])).astype(c["dtype"]), c["la"])
    b = layout(rng, rng.standard_normal((*lead_b, c["K"], c["N"])).astype(c["dtype"]), c["lb"])
    assert pool.threads() == 2
    got = blas.matmul(a, b, c["alpha"])
    want = c["alpha"] * (a.astype(np.float64) @ b.astype(np.float64))
    assert got.shape == want.shape and got.dtype == a.dtype and got.flags.c_contiguous
    tol = 1e-5 if c["dtype"] == "float32" else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1, c["K"]))


@needs_pool
@pytest.mark.parametrize("M, K, N", [(1, 300, 500), (500, 300, 1), (1, 1, 1), (40, 8, 900), (900, 8, 40)])
def test_gemv_and_split_cases_on_the_real_threshold(M, K, N):
    """Row vectors and column vectors (BLAS GEMV), and wide / tall products cut in column / row blocks,
    at the library's own threshold; transposed operands as attention and the backward pass them."""
    rng = np.random.default_rng(M * N)
    a, b = rng.standard_normal((K, M)).astype(np.float32).T, rng.standard_normal((N, K)).astype(np.float32).T
    np.testing.assert_allclose(blas.matmul(a, b), a.astype(np.float64) @ b, rtol=1e-5, atol=1e-4)


@needs_pool
def test_every_numba_kernel_conforms_with_its_loops_and_products_on_the_pool(every_product_on_the_pool):
    """The conformance suite's small cases with every loop's parallel twin and every product's GEMM tasks
    (by default they are below the thresholds and run serial): the threads' blocks meet correctly."""
    from lowrank.kernels.conformance import check_backend
    assert pool.threads() == 2
    report = check_backend("numba", max_examples=15)
    assert report.passed, f"\n{report}"


def test_the_serial_and_parallel_twins_are_two_compilations_of_one_function():
    """pool.jit compiles f twice, serial and with its prange on the pool; the on-disk cache keeps the two
    apart (cache.KernelCache; tests/kernels/test_numba_cache.py stores and reloads both)."""
    for kernel in (blas._gemm_tasks, lr.kernels.numba_cpu.attention._softmax, lr.kernels.numba_cpu.norm._backward):
        assert kernel.serial.targetoptions.get("parallel") in (None, False)
        assert kernel.parallel.targetoptions.get("parallel")
        assert kernel.serial.py_func is kernel.parallel.py_func


@pool.jit()
def _thread_of_each_row(x, out):
    for i in numba.prange(x.shape[0]):
        out[i] = numba.get_thread_id()


@needs_pool
@pytest.mark.parametrize("loops_on_the_pool", [True, False])
def test_pool_loops_switch_picks_the_parallel_or_the_serial_compilation(loops_on_the_pool, monkeypatch):
    """config.NUMBA_POOL_LOOPS: a big loop runs on the pool's threads, or all of it on the calling thread."""
    monkeypatch.setattr(config, "NUMBA_POOL_LOOPS", loops_on_the_pool)
    big, small = np.zeros(config.NUMBA_POOL_MIN_ELEMENTS), np.zeros(10)
    on_big, on_small = np.full(big.size, -1), np.full(small.size, -1)
    with pool.limit(2):
        _thread_of_each_row(big, on_big)
        _thread_of_each_row(small, on_small)                     # below NUMBA_POOL_MIN_ELEMENTS: serial either way
    assert set(on_big) == ({0, 1} if loops_on_the_pool else {0})
    assert set(on_small) == {0}


def _child(queue):
    """In a forked child: the pool must be off (GNU OpenMP's cannot run after fork: Numba aborts the
    process), and the kernels still compute."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 200)).astype(np.float32), rng.standard_normal((200, 300)).astype(np.float32)
    S = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    y = blas.matmul(a, b)
    P = lr.kernels.numba_cpu.causal_softmax(S)
    queue.put((pool.threads(), float(np.abs(y - a @ b).max()), float(np.abs(P.sum(-1) - 1).max())))


@needs_pool
def test_a_forked_child_runs_the_serial_paths_instead_of_being_aborted():
    S = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    lr.kernels.numba_cpu.causal_softmax(S)                      # the pool is running in this process
    assert pool.threads() > 1
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(120)
    assert child.exitcode == 0, f"the forked child died (exit code {child.exitcode})"
    threads, product_err, softmax_err = queue.get(timeout=5)
    assert threads == 1 and product_err < 1e-3 and softmax_err < 1e-5


def _scipy_blas_threads():
    own = set(pool.PINNED_BLAS)
    return [lib.num_threads for lib in ThreadpoolController().lib_controllers if lib.filepath in own]


def test_limit_keeps_scipys_blas_at_one_thread_and_restores_numba():
    """The pool's GEMM tasks each call SciPy's BLAS; a thread limit (the LM commands' --threads, the
    benchmarks' pinning) must not give it threads of its own to start inside every task."""
    assert _scipy_blas_threads() and set(_scipy_blas_threads()) == {1}
    old = numba.get_num_threads()
    with pool.limit(2):
        assert set(_scipy_blas_threads()) == {1}
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    with pool.limit(1):
        assert numba.get_num_threads() == 1 and pool.threads() == 1
    assert numba.get_num_threads() == old and set(_scipy_blas_threads()) == {1}
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        pool.limit(0).__enter__()                              # the check runs on entering the context


def test_threads_reads_numbas_count_as_it_changes_and_per_thread():
    """pool.threads() reads Numba's count directly after its first call (numba.get_num_threads takes locks): it
    still follows set_num_threads, pool.limit and another thread's own count, as numba.get_num_threads does."""
    import threading
    pool.threads()
    old = numba.get_num_threads()
    try:
        for n in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(n)
            assert pool._numba_threads() == numba.get_num_threads() == n
            assert pool.threads() == (1 if n < 2 or pool.layer() not in ("omp", "tbb") else n)
        with pool.limit(1):
            assert pool._numba_threads() == 1 and pool.threads() == 1
        numba.set_num_threads(1)
        seen = []
        other = threading.Thread(target=lambda: seen.append((pool._numba_threads(), numba.get_num_threads())))
        other.start()
        other.join()
        assert seen[0][0] == seen[0][1] and pool._numba_threads() == 1      # a thread's count is its own
    finally:
        numba.set_num_threads(old)


def _decoder_step(monkeypatch, on: bool):
    monkeypatch.setattr(config, "NUMBA_PARALLEL", on)
    cfg = lr.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = lr.get_lora_model(lr.LlamaForCausalLM(cfg, seed=0), lr.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                               init_lora_weights=False))
    model.train()
    ids = np.random.default_rng(0).integers(0, 50, (3, 40))
    loss_fn = lr.CausalLMLoss()
    model.zero_grad()
    loss = loss_fn.forward(model.forward(ids), ids)
    model.backward(loss_fn.backward())
    return loss, {n: p.grad.copy() for n, p in model.named_parameters() if p.trainable}


@needs_pool
def test_a_decoder_step_is_the_same_on_the_pool_and_off_it(monkeypatch):
    loss_on, grads_on = _decoder_step(monkeypatch, True)
    loss_off, grads_off = _decoder_step(monkeypatch, False)
    assert abs(loss_on - loss_off) <= 1e-6 * abs(loss_off)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == 8
    for name in grads_on:
        np.testing.assert_allclose(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-6, err_msg=name)


class _Spy:
    """A backend that is the reference plus a matmul that records what it multiplies."""
    calls: list = []

    @staticmethod
    def matmul(a, b):
        _Spy.calls.append((tuple(a.shape), tuple(b.shape)))
        return a @ b


@pytest.fixture
def spy_backend():
    lr.register_backend("spy", _Spy, replace=True)
    _Spy.calls.clear()
    with lr.use_backend("spy"):
        yield _Spy.calls
    lr.kernels.backends.unregister_backend("spy")


def test_dora_and_lora_embedding_products_run_on_the_layers_backend(spy_backend):
    """DoRA's norm (W Aᵀ, A Aᵀ, B (A Aᵀ)) and its exact-mode gradient, and a LoRA embedding's rank-r
    products, go through the kernel backend like every other product. They were NumPy's ``@``: on the
    pool that woke NumPy's BLAS threads, which then spun against Numba's (a demo MLP's DoRA step
    took 42.7 ms instead of 4.0)."""
    from lowrank.tuners.lora.dora import DoraLinear
    layer = DoraLinear(lr.Dense(6, 5, dtype="float64", seed=0), r=2, lora_alpha=4, init_lora_weights=False,
                       seed=1, exact_norm_grad=True)
    layer.train()
    x = np.random.default_rng(0).standard_normal((3, 6))
    layer.forward(x)
    layer.backward(np.ones((3, 5)))
    assert {((5, 6), (6, 2)), ((2, 6), (6, 2)), ((5, 2), (2, 2)), ((2, 5), (5, 6))} <= set(spy_backend)
    spy_backend.clear()
    emb = lr.get_lora_model(lr.LlamaForCausalLM(lr.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12,
                                                               num_hidden_layers=1, num_attention_heads=2), seed=0),
                            lr.LoraConfig(r=3, target_modules=["embed_tokens"], init_lora_weights=False))
    emb.train()
    ids = np.arange(8).reshape(2, 4)
    emb.backward(np.ones(emb.forward(ids).shape, np.float32))
    assert {((8, 3), (3, 8)), ((8, 8), (8, 3)), ((8, 8), (8, 3))} <= set(spy_backend)   # h Bᵀ, dyᵀ h, dy B
