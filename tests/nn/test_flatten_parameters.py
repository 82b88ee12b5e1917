"""Module.flatten_parameters: the host parameters as views of one block per dtype, in module order, values
unchanged; views of a file's memory map left alone; a large block on memory advised for huge pages; and the
layers that drop float weights wholesale (quantize_model, keep_gguf_blocks) leave no view of the old block
behind, so it is freed."""
import gc
import sys
import weakref

import numpy as np
import pytest
import torch
import transformers
from gguf_fixtures import byte_bpe, write_gguf

from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.models.llama.gguf import keep_gguf_blocks
from lowrank.nn import RMSNorm
from lowrank.nn.layers import Dense
from lowrank.nn.module import HUGE_MIN, HugePages, Module, Parameter, _mapped, block_views, memory_owner
from lowrank.tuners.lora.qlora import quantize_model

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def block_of(a):
    """The array that owns ``a``'s memory (the views here are of arrays, not of files)."""
    owner = memory_owner(a)
    assert isinstance(owner, np.ndarray)
    return owner


class Mixed(Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.a = Dense(5, 3, True, seed=1)                               # float32 weight (3, 5) and bias (3,)
        self.codes = Parameter(rng.integers(0, 255, (7, 3), dtype=np.uint8), trainable=False)
        self.norm = RMSNorm(5)
        self.b = Dense(3, 9, False, dtype="float64", seed=2)


def test_views_of_one_block_per_dtype_in_module_order_values_unchanged():
    m = Mixed()
    before = {n: p.data.copy() for n, p in m.named_parameters()}
    assert m.flatten_parameters() is m
    by_dtype = {}
    for name, p in m.named_parameters():
        np.testing.assert_array_equal(p.data, before[name])
        assert p.data.flags.c_contiguous and p.data.flags.writeable
        by_dtype.setdefault(p.dtype, []).append(p.data)
    assert sorted(str(d) for d in by_dtype) == ["float32", "float64", "uint8"]
    for arrays in by_dtype.values():
        blocks = {id(block_of(a)) for a in arrays}
        assert len(blocks) == 1
        addresses = [a.ctypes.data for a in arrays]
        assert addresses == sorted(addresses)                            # module order
        assert all(addr % 64 == 0 for addr in addresses)                 # each slot on a cache line
        ends = [a.ctypes.data + a.nbytes for a in arrays]
        assert all(end <= nxt for end, nxt in zip(ends, addresses[1:]))  # no overlap
    x = np.random.default_rng(3).standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_allclose(m.a.forward(x), x @ before["a.weight"].T + before["a.bias"], rtol=1e-6, atol=1e-6)


def test_a_built_llama_is_one_block_and_trains_in_place():
    model = LlamaForCausalLM(LlamaConfig(**SIZES), seed=0)
    params = [p for _, p in model.named_parameters()]
    assert len({id(block_of(p.data)) for p in params}) == 1
    block = block_of(params[0].data)
    ids = np.random.default_rng(0).integers(0, 300, (2, 6))
    from lowrank.nn.optim import Adam
    opt = Adam(model.parameters(), lr=1e-3)
    model.forward(ids, labels=ids)
    model.backward()
    opt.step()
    assert all(block_of(p.data) is block for p in params)                # the optimizer writes into the block


def vm_flags(address: int) -> list:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(v, 16) for v in head.split("-"))
            inside = low <= address < high
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are asked for with Linux's madvise")
def test_a_large_block_is_memory_advised_for_huge_pages_and_flattens_once():
    """From HUGE_MIN bytes on, the block is private anonymous memory on a 2 MB boundary advised MADV_HUGEPAGE
    (VmFlags 'hg'), not a file's map; flatten_parameters then leaves it as it is (no second copy)."""
    rows = HUGE_MIN // (4 * 64) // 2 + 1
    m = Module()
    m.a = Parameter(np.arange(rows * 64, dtype=np.float32).reshape(rows, 64))
    m.b = Parameter(np.ones((rows, 64), np.float32))
    m.flatten_parameters()
    owner, a = memory_owner(m.a.data), m.a.data
    assert isinstance(owner, HugePages) and not _mapped(a)
    assert a.ctypes.data % (2 << 20) == 0 and "hg" in vm_flags(a.ctypes.data)
    np.testing.assert_array_equal(a, np.arange(rows * 64, dtype=np.float32).reshape(rows, 64))
    assert m.flatten_parameters().a.data is a                             # one block already: untouched
    small = block_views([(3, 5)], np.float32)[0]
    assert isinstance(memory_owner(small), np.ndarray)                    # under HUGE_MIN: NumPy's memory


def test_mapped_weights_stay_mapped_converted_ones_are_one_block(tmp_path):
    config = transformers.LlamaConfig(**SIZES, tie_word_embeddings=False)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config)
    theirs.save_pretrained(tmp_path / "f32")
    theirs.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    f32 = LlamaForCausalLM.from_pretrained(tmp_path / "f32")
    assert all(_mapped(p.data) for _, p in f32.named_parameters())       # zero-copy: the file's map, as it was
    bf16 = LlamaForCausalLM.from_pretrained(tmp_path / "bf16")
    assert len({id(block_of(p.data)) for _, p in bf16.named_parameters()}) == 1
    assert not any(_mapped(p.data) for _, p in bf16.named_parameters())
    ids = np.random.default_rng(0).integers(0, 300, (2, 7))
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids)).logits.float().numpy()
    np.testing.assert_allclose(bf16.forward(ids), expected, rtol=2e-2, atol=2e-2)


def test_quantize_model_frees_the_old_block():
    model = LlamaForCausalLM(LlamaConfig(**SIZES), seed=0)
    old = weakref.ref(block_of(model.model.norm.weight.data))
    quantize_model(model)
    gc.collect()
    assert old() is None                       # the norms and embedding moved out of it: nothing holds it
    floats = [p.data for _, p in model.named_parameters() if p.dtype == np.float32]
    assert len({id(block_of(a)) for a in floats}) == 1


def gguf_path(folder, qtype, tied):
    vocab = byte_bpe()
    config = transformers.LlamaConfig(**{**SIZES, "vocab_size": len(vocab.tokens)}, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return write_gguf(folder / f"m-{qtype}.gguf", transformers.LlamaForCausalLM(config), vocab, qtype)


def test_keep_gguf_blocks_frees_the_old_block(tmp_path):
    path = gguf_path(tmp_path, "Q8_0", tied=False)
    model = LlamaForCausalLM.from_pretrained(path)                        # dequantized, one float block
    old = weakref.ref(block_of(model.model.norm.weight.data))
    assert len(keep_gguf_blocks(model, path)) > 0
    gc.collect()
    assert old() is None


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_a_gguf_loads_into_one_block(tmp_path, qtype):
    model = LlamaForCausalLM.from_pretrained(gguf_path(tmp_path, qtype, tied=True))
    assert len({id(block_of(p.data)) for _, p in model.named_parameters()}) == 1


def test_a_second_flatten_moves_nothing():
    m = Mixed().flatten_parameters()
    before = {n: p.data.ctypes.data for n, p in m.named_parameters()}
    m.flatten_parameters()
    assert {n: p.data.ctypes.data for n, p in m.named_parameters()} == before
    m.a.weight.data = m.a.weight.data.copy()                  # one array out of the block: the float32s move
    m.flatten_parameters()
    floats = [p.data for _, p in m.named_parameters() if p.dtype == np.float32]
    assert len({id(block_of(a)) for a in floats}) == 1


def test_kept_gguf_blocks_are_one_block_written_once(tmp_path):
    path = gguf_path(tmp_path, "Q4_0", tied=True)
    model = LlamaForCausalLM.from_pretrained(path)
    kept = keep_gguf_blocks(model, path)
    blocks = [p.data for _, p in model.named_parameters() if p.dtype == np.uint8]
    assert len(blocks) == len(kept) > 0
    assert len({id(block_of(a)) for a in blocks}) == 1
