"""QLoRA: NF4Dense against the float layer holding its dequantized weight, LoRA over it,
quantize_model, and merging an adapter into a 4-bit base (lossy, measured) or into float (exact)."""
import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowrank as lr
from lowrank.nn.gradcheck import gradcheck
from lowrank.tuners.lora.qlora import NF4Dense, merge_model_nf4, merge_nf4, output_error, quantize_model
from lowrank.nn.quant import NF4_HALF_GAP, NF4Tensor, quantize_nf4

SEED = st.integers(0, 2**16)


def nf4_layer(D_in, D_out, seed, dtype="float64", blocksize=8, double_quant=True, backend=None, bias=True):
    dense = lr.Dense(D_in, D_out, bias, dtype=dtype, seed=seed, backend=backend)
    return NF4Dense.from_dense(dense, blocksize, double_quant)


@given(N=st.integers(1, 5), D_in=st.integers(1, 9), D_out=st.integers(1, 9), seed=SEED,
       backend=st.sampled_from(["numpy", "numba"]), double_quant=st.booleans())
def test_nf4dense_gradients_match_finite_differences_of_the_dequantized_layer(N, D_in, D_out, seed, backend,
                                                                             double_quant):
    layer = nf4_layer(D_in, D_out, seed, backend=backend, double_quant=double_quant)
    reference = layer.dequantized()                                         # float64 Dense holding Ŵ
    x = np.random.default_rng(seed + 1).standard_normal((N, D_in))

    def backward(g):
        layer.zero_grad()
        layer.forward(x)
        return {"x": layer.backward(g), "b": layer.bias.grad}

    gradcheck(lambda: reference.forward(x), backward, {"x": x, "b": reference.bias.data}, seed=seed, rtol=1e-6)
    W = layer.weight.dequantize()
    np.testing.assert_allclose(layer.forward(x), x @ W.T + layer.bias.data, rtol=1e-12, atol=1e-12)


def test_nf4dense_keeps_no_input_and_computes_no_dW():
    layer = nf4_layer(6, 4, 0, dtype="float32")
    layer.bias.trainable = False
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    layer(x)
    assert layer._cache._fields == ("rows",)                               # nothing kept for a dW nobody needs
    layer.backward(np.ones((3, 4), np.float32))
    assert all(p.grad is None for p in layer.parameters())
    assert {n: p.dtype for n, p in layer.named_parameters() if n.startswith("weight_")} == {
        "weight_packed": np.uint8, "weight_absmax_q": np.uint8, "weight_absmax_scale": np.float32,
        "weight_absmax_offset": np.float32}
    assert all(not p.trainable for n, p in layer.named_parameters() if n.startswith("weight_"))


def lora_mlp(base_layers, seed):
    """LoRA (r=2) on both hidden layers of Sequential(base0, ReLU, base1, ReLU, head); B random so dA != 0."""
    model = lr.Sequential(base_layers[0], lr.ReLU(), base_layers[1], lr.ReLU(), base_layers[2])
    for i in (0, 2):
        lora = lr.LoraLinear(model[i], r=2, lora_alpha=4, seed=seed + i)
        lora.lora_B["default"].data = np.random.default_rng(seed + 10 + i).standard_normal(
            lora.lora_B["default"].shape).astype(lora.lora_B["default"].dtype)
        model.set_submodule(str(i), lora)
    return model


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 2e-4)])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_qlora_mlp_lora_gradients_equal_those_on_the_dequantized_weights(dtype, rtol, backend):
    mlp = lr.MLP([7, 12, 9, 3], dtype=dtype, seed=5)
    for i in (0, 2, 4):
        mlp[i].backend = backend
    qmodel = quantize_model(mlp, skip=("4",), blocksize=16)
    bases = [qmodel[0], qmodel[2], qmodel[4]]
    floats = [bases[0].dequantized(), bases[1].dequantized(), lr.Dense(9, 3, dtype=dtype)]
    floats[2].weight.data, floats[2].bias.data = bases[2].weight.data.copy(), bases[2].bias.data.copy()
    q, f = lora_mlp(bases, seed=1), lora_mlp(floats, seed=1)
    rng = np.random.default_rng(2)
    x, target = rng.standard_normal((11, 7)).astype(dtype), rng.standard_normal((11, 3)).astype(dtype)
    for model in (q, f):
        loss = lr.MSELoss()
        loss(model(x), target)
        model.backward(loss.backward())
    grads_q = {n: p.grad for n, p in q.named_parameters() if "lora_" in n}
    grads_f = {n: p.grad for n, p in f.named_parameters() if "lora_" in n}
    assert sorted(grads_q) == sorted(grads_f) and len(grads_q) == 4
    for name in grads_q:
        np.testing.assert_allclose(grads_q[name], grads_f[name], rtol=rtol, atol=rtol * np.abs(grads_f[name]).max())


def test_lora_over_nf4dense_trains_the_adapter_only():
    rng = np.random.default_rng(0)
    layer = lr.LoraLinear(nf4_layer(16, 8, 0, dtype="float32", blocksize=64), r=4, lora_alpha=8, seed=0)
    packed_before = layer.base_layer.weight_packed.data.copy()
    assert layer.lora_A["default"].dtype == np.float32                     # the base's compute dtype
    x = rng.standard_normal((32, 16)).astype(np.float32)
    target = x @ rng.standard_normal((16, 8)).astype(np.float32) * 0.1
    opt = lr.AdamW(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = lr.MSELoss()
        losses.append(float(loss(layer(x), target)))
        opt.zero_grad()
        layer.backward(loss.backward())
        opt.step()
    assert losses[-1] < 0.8 * losses[0]
    np.testing.assert_array_equal(layer.base_layer.weight_packed.data, packed_before)
    trainable = {n for n, p in layer.named_parameters() if p.trainable}
    assert trainable == {"lora_A.default", "lora_B.default"}
    assert opt.state_nbytes() == 2 * 4 * (4 * 16 + 8 * 4)                  # Adam moments of A and B only


def test_trainable_bias_gets_the_row_sum_of_dy():
    layer = nf4_layer(5, 3, 1)
    dy = np.random.default_rng(1).standard_normal((4, 3))
    layer(np.ones((4, 5)))
    layer.backward(dy)
    np.testing.assert_allclose(layer.bias.grad, dy.sum(axis=0))


def test_quantize_model_replaces_dense_layers_except_skipped_and_state_roundtrips():
    model = quantize_model(lr.MLP([6, 8, 8, 2], seed=0), skip="4", blocksize=16, double_quant=False)
    assert [type(model[i]).__name__ for i in (0, 2, 4)] == ["NF4Dense", "NF4Dense", "Dense"]
    state = model.state_dict()
    assert state["0.weight_packed"].dtype == np.uint8 and state["0.weight_absmax"].dtype == np.float32
    other = quantize_model(lr.MLP([6, 8, 8, 2], seed=1), skip="4", blocksize=16, double_quant=False)
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    assert not np.allclose(other(x), model(x))
    other.load_state_dict(state)
    np.testing.assert_array_equal(other(x), model(x))
    assert isinstance(quantize_model(lr.Dense(4, 2)), NF4Dense)
    assert isinstance(quantize_model(lr.Dense(4, 2), skip=("",)), lr.Dense)
    with pytest.raises(ValueError, match=r"skip names \['head'\] match no module"):
        quantize_model(lr.MLP([4, 4, 2]), skip=("head",))


def merged_weight_bound(layer, name="default"):
    """Per-element bound of requantizing W' = Ŵ + s·B·A without double quant: absmax'_block · half gap."""
    W = layer.base_layer.weight.dequantize(np.float64) + layer.delta_weight(name)
    flat = np.abs(W).reshape(-1)
    bs = layer.base_layer.blocksize
    absmax = [flat[i:i + bs].max() for i in range(0, flat.size, bs)]
    return np.repeat(absmax, bs)[:flat.size].reshape(W.shape) * NF4_HALF_GAP * (1 + 1e-6)


def test_merge_into_nf4_is_lossy_but_bounded_and_the_float_merge_is_exact():
    rng = np.random.default_rng(3)
    layer = lr.LoraLinear(nf4_layer(24, 10, 3, blocksize=8, double_quant=False), r=3, lora_alpha=6, seed=3)
    layer.lora_B["default"].data = rng.standard_normal((10, 3))
    x = rng.standard_normal((20, 24))
    lossy, exact = merge_nf4(layer), merge_nf4(layer, "default", exact=True)
    assert isinstance(lossy, NF4Dense) and isinstance(exact, lr.Dense)
    err, err_exact = output_error(layer, lossy, x), output_error(layer, exact, x)
    bound = np.abs(x) @ merged_weight_bound(layer).T                        # |Δy| <= |x| |ΔW|ᵀ, elementwise
    assert np.all(np.abs(lossy(x) - layer(x)) <= bound + 1e-12)
    # so ‖Δy‖_F <= ‖bound‖_F: the relative error that the code book's spacing and the block absmax allow
    assert 0 < err["max_abs"] and 0 < err["rel_fro"] <= np.linalg.norm(bound) / np.linalg.norm(layer(x)) + 1e-12
    assert err_exact["max_abs"] <= 1e-12 * np.abs(layer(x)).max()
    assert layer.training                                                   # output_error restores modes
    # and the codes are exactly those of quantizing Ŵ + s·B·A, computed here from the factors
    s, A, B = layer.scaling["default"], layer.lora_A["default"].data, layer.lora_B["default"].data
    expected = NF4Tensor.quantize(layer.base_layer.weight.dequantize(np.float64) + s * B @ A, 8, False)
    np.testing.assert_array_equal(lossy.weight.data, expected.data)
    np.testing.assert_array_equal(lossy.weight.absmax(), expected.absmax())


def test_merge_model_nf4_and_merge_errors():
    model = lr.Sequential(lr.LoraLinear(nf4_layer(6, 4, 0), r=2), lr.ReLU(), lr.Dense(4, 2, dtype="float64"))
    x = np.random.default_rng(0).standard_normal((5, 6))
    y = model(x)
    merged = merge_model_nf4(model, exact=True)
    assert isinstance(merged[0], lr.Dense)
    np.testing.assert_allclose(merged(x), y, rtol=1e-12)
    single = lr.LoraLinear(nf4_layer(6, 4, 0), r=2)
    assert isinstance(merge_model_nf4(single), NF4Dense)
    with pytest.raises(TypeError, match="has a Dense base; use LoraLinear.merge"):
        merge_nf4(lr.LoraLinear(lr.Dense(4, 4), r=2))
    with pytest.raises(ValueError, match="has no adapter 'other'"):
        merge_nf4(single, "other")


def test_nf4dense_bad_input_is_a_clear_error():
    layer = nf4_layer(4, 3, 0, dtype="float32")
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="expects float32 or float64 input, got int64"):
        layer(np.ones((2, 4), np.int64))
    with pytest.raises(TypeError, match="expects float32 input"):
        layer(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 4\)"):
        layer(np.ones((2, 5), np.float32))
    layer(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"dy has shape \(3, 3\), expected \(2, 3\)"):
        layer.backward(np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        NF4Dense(quantize_nf4(np.ones(8, np.float32), 4))
    with pytest.raises(TypeError, match="NF4Dense: dtype must be float32 or float64"):
        NF4Dense(quantize_nf4(np.ones((2, 4), np.float16), 4))
    with pytest.raises(ValueError, match=r"bias must be float32 of shape \(2,\)"):
        NF4Dense(quantize_nf4(np.ones((2, 4), np.float32), 4), np.ones(2))
    assert "blocksize=64, double_quant" in repr(nf4_layer(4, 3, 0, blocksize=64))


def test_get_lora_model_on_a_quantized_model_is_qlora():
    from lowrank.tuners.lora.config import LoraConfig
    from lowrank.tuners.lora.model import get_lora_model
    model = quantize_model(lr.MLP([8, 16, 16, 2], seed=0), skip=("4",))
    peft = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    assert isinstance(peft.get_submodule("model.0.base_layer"), NF4Dense)
    assert {n for n, p in peft.named_parameters() if p.trainable} == {
        f"model.{i}.lora_{m}.default" for i in (0, 2) for m in "AB"}
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    y = peft(x)
    assert peft.backward(np.ones_like(y)).shape == (5, 8)
    assert all(p.grad is not None for p in peft.parameters() if p.trainable)


def test_merge_and_unload_over_a_4bit_base_and_parameter_counts():
    base = lr.MLP([8, 16, 1], dtype="float32", seed=0)
    float_count = base.num_parameters()
    quantize_model(base, skip=("2",))
    assert base.num_parameters() == float_count            # codes count as the weights they encode, scales as none
    model = lr.get_lora_model(base, lr.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    y = model.forward(x)
    exact = copy.deepcopy(model).merge_and_unload(keep_float=True)
    assert isinstance(exact.get_submodule("0"), lr.Dense)
    np.testing.assert_allclose(exact.forward(x), y, rtol=1e-5, atol=1e-5)
    lossy = copy.deepcopy(model).merge_and_unload()
    assert type(lossy.get_submodule("0")).__name__ == "NF4Dense"
    err = output_error(model, lossy, x)
    # ReLU is 1-Lipschitz, so |Δy| <= |W_head| · (|x| |ΔW_0|ᵀ), with |ΔW_0| at most the requantization
    # bound of W_0 + s·B·A (block absmax × the code book's half gap; double quant adds its own rounding
    # of absmax, covered by the 1 % slack)
    lora0 = model.model.get_submodule("0")
    s, A, B = lora0.scaling["default"], lora0.lora_A["default"].data, lora0.lora_B["default"].data
    W0 = lora0.base_layer.weight
    expected = NF4Tensor.quantize((W0.dequantize(np.float64) + s * B.astype(np.float64) @ A).astype(np.float32),
                                  W0.blocksize, W0.double_quant, W0.dq_blocksize)
    np.testing.assert_array_equal(lossy.get_submodule("0").weight.data, expected.data)   # the codes of Ŵ + s·B·A
    head = np.abs(lossy.get_submodule("2").weight.data.astype(np.float64))
    bound = np.abs(x.astype(np.float64)) @ (1.01 * merged_weight_bound(model.model.get_submodule("0"))).T @ head.T
    assert np.all(np.abs(lossy.forward(x) - y) <= bound + 1e-6)
    assert 0 < err["rel_fro"] <= np.linalg.norm(bound) / np.linalg.norm(y)
