"""examples/torch_backend.py, a backend from outside the library: it passes the conformance suite,
trains layers the same as the built-in backends, declares its fallbacks (NF4, the decoder's elementwise kernels and the LM loss), and joins the benchmark."""
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (a required test dependency: the example is written with it)

import lowrank as lr
from lowrank.kernels import api, backends
from lowrank.kernels import config, reference
from lowrank.kernels.conformance import check_backend

from benchmarks import kernels as bench

FILE = Path(__file__).resolve().parents[2] / "examples" / "torch_backend.py"
LEFT_OUT = ("nf4_dequantize", "nf4_matmul", "nf4_matmul_dx",            # what the example does not implement
            "gguf_dequantize", "gguf_matmul", "gguf_matmul_dx", "gguf_matmul_q8",
            "rope_forward", "rope_backward", "causal_softmax", "causal_softmax_backward", "causal_attention",
            "silu_and_mul", "silu_and_mul_backward", "rms_norm", "rms_norm_backward", "linear_cross_entropy")
NATIVE = tuple(n for n in api.API if n not in LEFT_OUT)

pytestmark = pytest.mark.filterwarnings(r"ignore:.*exceeds min\(D_in, D_out\):UserWarning")


@pytest.fixture
def torch_backend():
    old = lr.get_backend()
    yield backends.register_backend("torch", str(FILE), replace=True)
    lr.set_backend(old)
    backends.unregister_backend("torch")


def test_the_torch_backend_passes_the_conformance_suite():
    report = check_backend(str(FILE))
    assert report.passed, f"\n{report}"
    assert sorted({row.function for row in report}) == sorted(NATIVE)
    assert {row.dtype for row in report} == {"float32", "float64"}


def test_nf4_and_attention_fall_back_to_the_reference_declared_once(torch_backend):
    assert torch_backend.native == NATIVE
    assert torch_backend.fallback == LEFT_OUT
    assert torch_backend.nf4_matmul is reference.nf4_matmul
    assert "reference  nf4_matmul_dx" in backends.describe("torch")
    assert backends.resolve("examples.torch_backend").native == NATIVE      # the import path works too


def _grads(layer, x, dy, **kw):
    layer.zero_grad()
    y = layer.forward(x, **kw)
    return [y, layer.backward(dy)] + [p.grad for _, p in layer.named_parameters() if p.trainable]


def _layer(dtype, backend, dropout):
    """The same two-adapter layer each call (same seeds: same weights and dropout masks)."""
    layer = lr.LoraLinear(lr.Dense(6, 5, dtype=dtype, seed=0, backend=backend), r=2, lora_alpha=4,
                          lora_dropout=dropout, init_lora_weights=False, seed=1, backend=backend)
    layer.update_layer("b", 3, 3.0, init_lora_weights=False)
    return layer


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layers_train_the_same_through_torch(torch_backend, dtype, rng):
    x, dy = rng.standard_normal((7, 6)).astype(dtype), rng.standard_normal((7, 5)).astype(dtype)
    names = ["b", "__base__", "default", "b", "default", "__base__", "b"]
    tol = dict(rtol=config.RTOL[dtype], atol=config.ATOL[dtype])
    for dropout, kw in ((0.3, {}), (0.0, {"adapter_names": names})):      # mixed batches take no dropout
        want = _grads(_layer(dtype, "numpy", dropout), x, dy, **kw)
        with lr.use_backend("torch"):                            # the global switch reaches every layer
            assert lr.kernels_for(x) is torch_backend
            got = _grads(_layer(dtype, None, dropout), x, dy, **kw)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                np.testing.assert_allclose(g, w, **tol)


def test_the_benchmark_times_it_beside_the_built_in_backends():
    backends = bench.extra_backends(["examples/torch_backend.py"])
    assert list(backends) == ["torch"]
    cfg = dict(bench.QUICK, forward=[((24, 16), 2, 4)], step=[((24, 16), 2, 4)], multi=[((24, 16), 2, 4, 3)],
               skip={}, target_s=1e-4, rounds={4: 2})
    rows = bench.run(cfg, log=lambda *a: None, backends=backends)
    got = {(row["group"], row["variant"]) for row in rows}
    assert {("forward", "torch"), ("backward", "torch"), ("train", "lora_torch"), ("multi", "bgmv_torch"),
            ("multi", "sgmv_torch"), ("forward", "numba"), ("multi", "bgmv")} <= got
    assert all(row["ratio"] > 0 for row in rows)
