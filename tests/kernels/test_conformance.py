"""The one conformance suite (lowrank.kernels.conformance) on the built-in backends, on planted bugs,
and the registry around it: register, describe, fall back, refuse, route every layer, entry points.

The reference is checked against the slow float64 loops of tests/naive.py (against itself the suite
would prove nothing); its NF4 functions against the slow definition in test_nf4_kernels.py.
"""
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest

import naive
import wrong_backends as wb
import lowrank as lr
from lowrank.kernels import api, backends
from lowrank.kernels import conformance, reference
from lowrank.kernels.conformance import check_backend


def _naive_dense_backward(dy, x, W, need_dx=True, need_dW=True, need_db=True):
    dx, dW, db = naive.dense_backward(dy, np.zeros((dy.shape[0], W.shape[1])) if x is None else x, W)
    return dx if need_dx else None, dW if need_dW else None, db if need_db else None


def _naive_lora_backward(dy, x, h, W, A, B, scaling, need_dx=True, mask=None):
    dx, dA, dB = naive.lora_backward(dy, x, W, A, B, scaling, mask)
    return dx if need_dx else None, dA, dB


def _naive_multi_backward(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx=True):
    dx, dA, dB = naive.lora_backward_multi(dy, x, W, A_stack, B_stack, scalings, index)
    return dx if need_dx else None, dA, dB


NAIVE = types.SimpleNamespace(          # tests/naive.py's loops behind the API's signatures (no NF4)
    rope_forward=naive.rope_forward, rope_backward=naive.rope_backward,
    causal_softmax=naive.causal_softmax, causal_softmax_backward=naive.causal_softmax_backward,
    causal_attention=naive.causal_attention,
    silu_and_mul=naive.silu_and_mul, silu_and_mul_backward=naive.silu_and_mul_backward,
    rms_norm=naive.rms_norm, rms_norm_backward=naive.rms_norm_backward,
    dense_forward=naive.dense_forward, dense_backward=_naive_dense_backward,
    lora_forward=naive.lora_forward, lora_backward=_naive_lora_backward,
    lora_forward_multi=naive.lora_forward_multi, lora_backward_multi=_naive_multi_backward,
    lora_forward_sgmv=lambda x, W, A_stack, B_stack, scalings, indptr, seg_index, bias=None: naive.lora_forward_multi(
        x, W, A_stack, B_stack, scalings, naive.segments_to_index(indptr, seg_index), bias),
    lora_backward_sgmv=lambda dy, x, h, W, A_stack, B_stack, scalings, indptr, seg_index, need_dx=True:
        _naive_multi_backward(dy, x, h, W, A_stack, B_stack, scalings, naive.segments_to_index(indptr, seg_index),
                              need_dx))


def assert_passes(report):
    assert report.passed, f"\n{report}"


@pytest.fixture
def registered():
    """Names registered by a test, forgotten after it (and the global backend restored)."""
    names, old = [], lr.get_backend()
    yield names
    lr.set_backend(old)
    for name in names:
        backends.unregister_backend(name)


# -- the built-in backends -------------------------------------------------------------------
def test_reference_matches_the_naive_loops():
    """float16 left out: the reference accumulates in float16 (by design, O(sqrt(D)) ulps), which the
    float16 tolerance, meant for two float16 kernels on the same inputs, does not cover against float64."""
    assert_passes(check_backend("numpy", oracle=NAIVE, max_examples=15, dtypes=["float32", "float64"]))


def test_numba_conforms():
    assert_passes(check_backend("numba", functions=[n for n in api.API if n not in NF4_PRODUCTS]))


NF4_PRODUCTS = ("nf4_matmul", "nf4_matmul_dx")


def test_numba_nf4_products_conform():
    """Kept apart: this suite found N = 0 crashing the AVX2 GEMV (its lane permute reshaped an empty x
    to (0, -1, 8)); fixed in nf4_avx2.permute."""
    assert_passes(check_backend("numba", functions=NF4_PRODUCTS))


def test_cupy_conforms():
    cupy = pytest.importorskip("cupy", reason="no CuPy here: the GPU backend is checked on GPU machines only")
    if not cupy.is_available():
        pytest.skip("CuPy without a usable GPU")
    assert_passes(check_backend("cupy", dtypes=api.FLOATS, to_device=cupy.asarray))


# -- planted bugs: each fails, naming the function and a small case ------------------------------
@pytest.mark.parametrize("backend, function, expected", [
    (wb.NoScaling, "lora_forward", "N=1 D_in=1 D_out=1 r=1"),
    (wb.MinusOneIsLastAdapter, "lora_forward_multi", "index=[-1]"),
    (wb.HWrongLayout, "lora_forward", "N=2"),                 # h = its own transpose below N = r = 2
])
def test_a_planted_bug_fails_with_its_function_and_a_small_case(backend, function, expected):
    report = check_backend(backend, dtypes=["float32"], max_examples=20)
    failed = {row.function: row for row in report.failures}
    assert function in failed, f"\n{report}"
    row = failed[function]
    assert expected in row.case and row.worst_ratio > 1 and "tolerance" in row.message
    case = dict(part.split("=", 1) for part in row.case.split(" ") if "[" not in part)
    assert int(case["N"]) <= 2 and int(case["D_in"]) <= 2 and int(case["D_out"]) <= 2     # shrunk
    assert "FAIL" in str(report) and function in str(report)


def test_the_command_line_prints_the_table_and_exits_1_on_a_failure(capsys):
    assert conformance.main(["wrong_backends:HWrongLayout", "--max-examples", "5", "--dtypes", "float32"]) == 1
    out = capsys.readouterr().out
    assert "native     lora_forward" in out and "FAIL" in out and "h[" in out
    assert conformance.main(["wrong_backends:DenseOnly", "--max-examples", "5"]) == 0


def test_the_pytest_plugin_runs_the_suite_on_a_backend(tmp_path):
    (tmp_path / "test_nothing.py").write_text("")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "lowrank.kernels.pytest_plugin", "-q",
                          "--lowrank-backend=wrong_backends:NoScaling", "--lowrank-max-examples=5",
                          "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300)   # wrong_backends.py
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 failed" in run.stdout and "conformance[wrong_backends:NoScaling]::lora_backward" in run.stdout


# -- the registry: register, describe, fall back, refuse -------------------------------------
def test_a_missing_function_falls_back_to_the_reference_and_says_so(registered):
    registered.append("dense_only")
    b = backends.register_backend("dense_only", wb.DenseOnly)
    assert b.native == ("dense_forward",) and b.lora_forward is reference.lora_forward
    text = backends.describe("dense_only")
    assert "native     dense_forward" in text and "reference  lora_backward_sgmv" in text
    assert "reference  every float16 call" in text
    assert [row.function for row in check_backend("dense_only", max_examples=3)] == ["dense_forward"] * 2


def test_a_wrong_signature_is_refused_listing_every_mismatch():
    with pytest.raises(TypeError) as e:
        backends.register_backend("wrong", wb.WrongSignatures)
    message = str(e.value)
    assert "dense_forward(x, W, b=None)  !=  reference dense_forward(x, W, bias=None)" in message
    assert "lora_forward(x, W, A, B, bias=None)  !=  reference lora_forward(x, W, A, B, scaling" in message
    assert not backends.is_backend("wrong")
    with pytest.raises(TypeError, match="defines none of dense_forward"):
        backends.register_backend("none", wb.NoKernels)


def test_names_are_guarded(registered):
    with pytest.raises(ValueError, match="taken by a built-in"):
        backends.register_backend("numba", wb.DenseOnly)
    registered.append("twice")
    backends.register_backend("twice", wb.DenseOnly)
    with pytest.raises(ValueError, match="already registered"):
        backends.register_backend("twice", wb.NoScaling)
    assert backends.register_backend("twice", wb.NoScaling, replace=True).native == ("lora_forward", "lora_backward")
    with pytest.raises(ValueError, match="or a name registered"):
        lr.set_backend("fortran")


class Spy:
    """The reference's lora_forward, counting its calls; float32 only, so float64 goes to the reference."""
    calls = 0
    DTYPES = ("float32",)

    @staticmethod
    def lora_forward(x, W, A, B, scaling, bias=None, mask=None):
        Spy.calls += 1
        return reference.lora_forward(x, W, A, B, scaling, bias, mask)


def test_a_registered_backend_runs_every_layer_set_globally_per_layer_or_in_a_block(registered, rng):
    registered.append("spy")
    backends.register_backend("spy", Spy)
    layer = lr.LoraLinear(lr.Dense(4, 3, dtype="float32", seed=0), r=2, lora_alpha=4, init_lora_weights=False, seed=1)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    with lr.use_backend("numpy"):
        want = layer.forward(x)
    Spy.calls = 0
    lr.set_backend("spy")
    np.testing.assert_array_equal(layer.forward(x), want)
    lr.set_backend("auto")
    with lr.use_backend("spy"):
        layer.forward(x)
    layer.backend = "spy"
    layer.forward(x)
    layer.backward(np.ones((5, 3), np.float32))              # the rest of the API: the reference's
    assert Spy.calls == 3
    d = naive.lora_inputs(rng, 2, 4, 3, 2, np.float64)
    backends.resolve("spy").lora_forward(d["x"], d["W"], d["A"], d["B"], d["s"])
    assert Spy.calls == 3                                    # float64: not claimed, the reference ran


def test_an_installed_entry_point_is_found_and_loaded_lazily(registered, monkeypatch):
    ep = EntryPoint(name="planted", value="wrong_backends:DenseOnly", group=backends.ENTRY_POINTS)
    monkeypatch.setattr(backends, "entry_points", lambda group: [ep] if group == backends.ENTRY_POINTS else [])
    registered.append("planted")
    assert "planted" in backends.names() and backends.is_backend("planted")
    lr.set_backend("planted")                                  # accepted before it is loaded
    assert backends.load("planted").native == ("dense_forward",)
