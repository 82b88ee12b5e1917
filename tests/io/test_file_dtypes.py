"""bfloat16 and float16 in adapter and model files: read exactly (upcast to the layer's dtype),
written on request, checksummed like any other tensor; dtypes lowrank can't read are named."""
import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

import lowrank as lr
from lowrank.tuners.lora.save_and_load import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, adapter_parameters
from lowrank.io.model_files import ARCH_KEY, FileFormatError, load_model, read_tensor_file, save_model, tensor_file_bytes

BF16 = np.dtype(ml_dtypes.bfloat16)
X = np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32)


def trained(seed=0, **config) -> lr.LoraModel:
    lm = lr.get_lora_model(lr.MLP([5, 4, 3], seed=1), lr.LoraConfig(r=2, target_modules=["0", "2"], **config))
    rng = np.random.default_rng(seed)
    for p in adapter_parameters(lm, "default").values():
        p.data = rng.normal(size=p.shape).astype(p.dtype)
    return lm


@pytest.mark.parametrize("dtype,np_dtype", [("bfloat16", BF16), ("float16", np.float16), ("float32", np.float32)])
def test_adapters_save_in_half_precision_and_load_exactly(tmp_path, dtype, np_dtype):
    lm = trained()
    lm.save_pretrained(tmp_path, dtype=dtype)
    tensors, _ = read_tensor_file(tmp_path / ADAPTER_SAFE_WEIGHTS_NAME)             # checksums verified on half data
    assert {a.dtype for a in tensors.values()} == {np.dtype(np_dtype)}
    loaded = lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3], seed=1), tmp_path)
    for key, p in adapter_parameters(loaded, "default").items():
        want = adapter_parameters(lm, "default")[key].data.astype(np_dtype).astype(np.float32)
        assert p.dtype == np.float32 and np.array_equal(p.data, want)     # rounded once, upcast exactly


def test_a_bfloat16_adapter_written_by_torch_loads(tmp_path):
    lm = trained(seed=4)
    lm.save_pretrained(tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / ADAPTER_SAFE_WEIGHTS_NAME)
    as_torch = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}
    safetensors.torch.save_file(as_torch, tmp_path / ADAPTER_SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
    loaded = lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3], seed=1), tmp_path)
    for key, p in adapter_parameters(loaded, "default").items():
        assert np.array_equal(p.data, as_torch[key].float().numpy())


def test_torch_reads_the_bfloat16_files_lowrank_writes(tmp_path):
    model = lr.MLP([5, 4, 3], seed=3)
    save_model(model, tmp_path / "m.safetensors", dtype="bfloat16")
    read = safetensors.torch.load_file(tmp_path / "m.safetensors")
    for name, a in model.state_dict().items():
        assert read[name].dtype == torch.bfloat16
        assert np.array_equal(read[name].float().numpy(), a.astype(BF16).astype(np.float32))
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded[0].weight.dtype == np.float32
    assert np.array_equal(loaded[0].weight.data, read["0.weight"].float().numpy())


def test_save_refuses_unknown_dtypes_and_overflow(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        trained().save_pretrained(tmp_path / "a", dtype="int8")
    model = lr.MLP([5, 4, 3], seed=3)
    model[0].weight.data[0, 0] = 1e6
    with pytest.raises(ValueError, match=r"'0.weight'.*float16"):
        save_model(model, tmp_path / "m.safetensors", dtype="float16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "m.safetensors").exists()


def test_half_precision_nonfinite_and_checksums_are_checked(tmp_path):
    a = np.array([1.0, np.inf], BF16)
    (tmp_path / "inf.safetensors").write_bytes(tensor_file_bytes({"w": a}))
    with pytest.raises(FileFormatError, match=r"\['w'\] hold NaN or Inf"):
        read_tensor_file(tmp_path / "inf.safetensors")
    assert read_tensor_file(tmp_path / "inf.safetensors", allow_nonfinite=True)[0]["w"].dtype == BF16
    data = bytearray(tensor_file_bytes({"w": np.array([1.0, 2.0], BF16)}))
    data[-1] ^= 1
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="don't match their checksums"):
        read_tensor_file(tmp_path / "flip.safetensors")


def header_file(path, dtype: str, nbytes: int, name="base_model.model.0.lora_A.weight"):
    header = json.dumps({name: {"dtype": dtype, "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * nbytes)
    return path


def test_dtypes_lowrank_cannot_read_are_named(tmp_path):
    with pytest.raises(FileFormatError, match=r"'base_model.model.0.lora_A.weight' has dtype F8_E4M3") as info:
        read_tensor_file(header_file(tmp_path / "f8.safetensors", "F8_E4M3", 4))
    assert "truncated" not in str(info.value)
    lm = trained()
    lm.save_pretrained(tmp_path / "ad")
    tensors = safetensors.numpy.load_file(tmp_path / "ad" / ADAPTER_SAFE_WEIGHTS_NAME)
    tensors["base_model.model.0.lora_A.weight"] = tensors["base_model.model.0.lora_A.weight"].astype(np.int64)
    (tmp_path / "ad" / ADAPTER_SAFE_WEIGHTS_NAME).write_bytes(safetensors.numpy.save(tensors))
    with pytest.raises(FileFormatError, match=r"'base_model.model.0.lora_A.weight' .*has dtype int64"):
        lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3], seed=1), tmp_path / "ad")


def test_a_float16_model_file_loads_into_float32_layers(tmp_path):
    model = lr.MLP([5, 4, 3], seed=3)
    save_model(model, tmp_path / "m.safetensors", dtype="float16")
    loaded = load_model(tmp_path / "m.safetensors")
    assert np.array_equal(loaded[0].weight.data, model[0].weight.data.astype(np.float16).astype(np.float32))
    assert json.loads(read_tensor_file(tmp_path / "m.safetensors")[1][ARCH_KEY])["module"]["children"][0]["dtype"] \
        == "float32"
