"""When Numba fails to import, 'auto' runs the NumPy reference and says so: once, with the reason; and the
one-lookup path for host arrays picks what the full rules pick."""
import warnings

import numpy as np
import pytest

import lowrank as lr
from lowrank.kernels import api, backends
from lowrank.nn import dispatch


@pytest.fixture
def broken_numba(monkeypatch):
    """backends.load('numba') raises ImportError, with the dispatch cache emptied before and after."""
    real = backends.load

    def load(name):
        if name == "numba":
            raise ImportError("numba: simulated broken install")
        return real(name)

    monkeypatch.setattr(backends, "load", load)
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    yield
    # monkeypatch restores the real cache and load afterwards


def test_auto_falls_back_to_numpy_with_one_runtime_warning(broken_numba):
    x = np.zeros((2, 3))
    with pytest.warns(RuntimeWarning, match=r"Numba kernels failed to load .*simulated broken install.*slower"):
        assert dispatch.kernels_for(x) is backends.load("numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # a second call must not warn again
        assert dispatch.kernels_for(x) is backends.load("numpy")
        assert not dispatch.available("numba")


def test_explicit_numba_names_the_import_error(broken_numba):
    with pytest.raises(ImportError, match="'numba' is not available") as info:
        dispatch.kernels_for(np.zeros(2), "numba")
    assert "simulated broken install" in str(info.value.__cause__)


def test_a_layer_still_computes_under_the_fallback(broken_numba):
    layer, x = lr.Dense(3, 2, seed=0), np.ones((4, 3), np.float32)
    with pytest.warns(RuntimeWarning, match="Numba kernels failed to load"):
        y = layer(x)
    np.testing.assert_allclose(y, x @ layer.weight.data.T + layer.bias.data, rtol=1e-6)


def test_choosing_numpy_does_not_warn(broken_numba):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.kernels_for(np.zeros(2), "numpy") is backends.load("numpy")


def test_the_fast_path_for_host_arrays_keeps_every_rule(monkeypatch):
    """A host array under 'auto' or a CPU backend's name is one dict lookup once loaded; the GPU backend, even
    loaded, still refuses a host array, and unknown names are still refused."""
    x = np.zeros((2, 3))
    assert dispatch.kernels_for(x) is dispatch.kernels_for(x, "numba") is backends.load("numba")
    assert dispatch.kernels_for(x, "numpy") is backends.load("numpy")
    monkeypatch.setitem(dispatch._loaded, "cupy", backends.load("numpy"))        # as if CuPy had loaded
    with pytest.raises(ValueError, match="backend 'cupy' needs CuPy arrays"):
        dispatch.kernels_for(x, "cupy")
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.kernels_for(x, "bogus")
    with lr.use_backend("numpy"):
        assert dispatch.kernels_for(x) is backends.load("numpy")
    assert dispatch.kernels_for(x.view(np.matrix)) is backends.load("numba")     # a subclass: the full rules
