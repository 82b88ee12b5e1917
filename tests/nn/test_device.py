"""The array device (lowrank.nn.device): NumPy for NumPy input, device moves, and both float dtypes end to end."""
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import lowrank as lr
from lowrank.nn import device


def test_get_array_module_is_numpy_for_numpy_input():
    x = np.zeros(3)
    assert lr.get_array_module(x) is np
    assert lr.get_array_module(x, np.ones((2, 2), np.float32)) is np
    assert lr.get_array_module() is np
    assert not device.is_cupy_array(x) and device.device_of(x) == "cpu"


def test_to_device_cpu_is_a_no_op_for_numpy():
    x = np.arange(4.0)
    assert lr.to_device(x, "cpu") is x
    with pytest.raises(ValueError, match="device must be 'cpu' or 'gpu', got 'tpu'"):
        lr.to_device(x, "tpu")


def test_to_device_gpu_round_trips_or_says_why_not():
    x = np.arange(4.0)
    if device.cupy_module() is None:                          # no CUDA device on this machine
        with pytest.raises(RuntimeError, match=r"to\('gpu'\): no usable CuPy/CUDA device"):
            lr.to_device(x, "gpu")
    else:
        on_gpu = lr.to_device(x, "gpu")
        assert device.device_of(on_gpu) == "gpu" and lr.get_array_module(on_gpu) is device.cupy_module()
        np.testing.assert_array_equal(lr.to_device(on_gpu, "cpu"), x)


def test_erf_matches_math_erf():
    x = np.linspace(-4, 4, 17)
    np.testing.assert_allclose(device.erf(x), [math.erf(v) for v in x], rtol=1e-14, atol=1e-16)


def test_only_the_device_module_imports_cupy():
    package = pathlib.Path(lr.__file__).parent
    library = [p for p in package.rglob("*.py") if "kernels" not in p.relative_to(package).parts]
    importers = sorted(str(p.relative_to(package)) for p in library if "import cupy" in p.read_text())
    assert importers == ["nn/device.py"]            # (the CuPy kernel backend imports it too, in lowrank.kernels)
    code = "import sys, lowrank; assert 'cupy' not in sys.modules, 'import lowrank loaded cupy'"
    subprocess.run([sys.executable, "-c", code], check=True)


def lora_mlp(dtype):
    model = lr.MLP([5, 7, 3], "gelu", dtype=dtype, seed=0)
    for i in (0, 2):
        model.set_submodule(str(i), lr.LoraLinear(model[i], r=2, lora_alpha=4, init_lora_weights=False, seed=i))
    return model


def test_float32_and_float64_both_work_and_agree():
    x64 = np.random.default_rng(0).standard_normal((4, 5))
    dy64 = np.random.default_rng(1).standard_normal((4, 3))
    results = {}
    for dtype in ("float32", "float64"):
        model = lora_mlp(dtype)
        y = model(x64.astype(dtype))
        dx = model.backward(dy64.astype(dtype))
        grads = [p.grad for p in model.parameters(trainable_only=True)]
        assert {a.dtype for a in [y, dx, *grads]} == {np.dtype(dtype)}
        results[dtype] = [y, dx, *grads]
    for a32, a64 in zip(results["float32"], results["float64"]):
        np.testing.assert_allclose(a32, a64, rtol=1e-4, atol=1e-5 * np.abs(a64).max())
