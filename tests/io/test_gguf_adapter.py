"""llama.cpp's conventions in lowrank.io.gguf_adapter, against independent statements of them: the q/k row
order written as an index formula, the name table written out, and a LoRA adapter GGUF read back with the
``gguf`` package's reader (exact keys, value types, tensor names, shapes, types and bytes)."""
import gguf
import numpy as np
import pytest

from lowrank.io import gguf_adapter as gg


@pytest.mark.parametrize("n_head, h, cols", [(1, 2, 3), (4, 6, 5), (3, 8, 1)])
def test_permute_rows_puts_each_rotary_pair_on_adjacent_rows(n_head, h, cols):
    w = np.random.default_rng(0).standard_normal((n_head * h, cols))
    out = gg.permute_rows(w, n_head)
    for head in range(n_head):                # transformers pairs i with i + h/2; llama.cpp 2i with 2i + 1
        for i in range(h // 2):
            for j in range(2):
                np.testing.assert_array_equal(out[head * h + 2 * i + j], w[head * h + j * (h // 2) + i])
    bias = w[:, 0].copy()
    np.testing.assert_array_equal(gg.permute_rows(bias, n_head), out[:, 0])


def test_permute_rows_refuses_rows_that_do_not_split_into_head_pairs():
    with pytest.raises(ValueError, match="can't permute 6 rows for 2 heads"):
        gg.permute_rows(np.zeros((6, 2)), 2)


def test_transformers_names_map_to_llama_cpps():
    expected = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
                "model.layers.0.self_attn.q_proj": "blk.0.attn_q", "model.layers.1.self_attn.k_proj": "blk.1.attn_k",
                "model.layers.2.self_attn.v_proj": "blk.2.attn_v", "model.layers.3.self_attn.o_proj": "blk.3.attn_output",
                "model.layers.4.mlp.gate_proj": "blk.4.ffn_gate", "model.layers.5.mlp.up_proj": "blk.5.ffn_up",
                "model.layers.16.mlp.down_proj": "blk.16.ffn_down", "model.layers.0.input_layernorm": "blk.0.attn_norm",
                "model.layers.0.post_attention_layernorm": "blk.0.ffn_norm",
                "model.layers.0.self_attn.q_norm": "blk.0.attn_q_norm",
                "model.layers.0.self_attn.k_norm": "blk.0.attn_k_norm"}
    assert {n: gg.gguf_module_name(n) for n in expected} == expected
    for unknown in ("model.layers.0.self_attn", "model.layers.x.mlp.up_proj", "layers.0.mlp.up_proj", "model.rotary"):
        assert gg.gguf_module_name(unknown) is None


def test_only_llama_permutes_and_only_q_and_k():
    assert gg.heads_to_permute("blk.3.attn_q", "llama", 8, 2) == 8
    assert gg.heads_to_permute("blk.3.attn_k", "llama", 8, 2) == 2
    assert gg.heads_to_permute("blk.3.attn_v", "llama", 8, 2) is None
    assert gg.heads_to_permute("blk.3.attn_q", "qwen2", 8, 2) is None
    assert gg.heads_to_permute("blk.3.attn_k", "qwen3", 8, 2) is None
    assert [gg.gguf_architecture(t) for t in ("llama", "mistral", "qwen2", "qwen3")] == ["llama", "llama", "qwen2",
                                                                                          "qwen3"]
    with pytest.raises(ValueError, match="model_type 'gpt2' has no llama.cpp architecture"):
        gg.gguf_architecture("gpt2")


def fields(reader) -> dict:
    """{key: (value, value types)} of every key-value a GGUFReader found."""
    return {k: (f.contents(), [t.name for t in f.types]) for k, f in reader.fields.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_lora_adapter_reads_back_exactly(tmp_path, dtype):
    rng = np.random.default_rng(1)
    pairs = {"blk.0.attn_q": (rng.standard_normal((2, 8)).astype(dtype), rng.standard_normal((8, 2)).astype(dtype)),
             "blk.1.ffn_down": (rng.standard_normal((3, 12)).astype(dtype), rng.standard_normal((8, 3)).astype(dtype))}
    gg.write_lora_adapter(tmp_path / "a.gguf", "qwen2", 12.5, pairs)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert fields(reader) == {
        "GGUF.version": (3, ["UINT32"]), "GGUF.tensor_count": (4, ["UINT64"]), "GGUF.kv_count": (4, ["UINT64"]),
        "general.architecture": ("qwen2", ["STRING"]), "general.type": ("adapter", ["STRING"]),
        "adapter.type": ("lora", ["STRING"]), "adapter.lora.alpha": (12.5, ["FLOAT32"])}
    kind = {np.float32: "F32", np.float16: "F16"}[dtype]
    expected = [(f"{m}.weight.lora_{x}", a) for m, (A, B) in pairs.items() for x, a in (("a", A), ("b", B))]
    assert [t.name for t in reader.tensors] == [n for n, _ in expected]
    for t, (name, a) in zip(reader.tensors, expected):
        assert t.tensor_type.name == kind and list(t.shape) == list(a.shape[::-1])     # ggml order: fastest first
        np.testing.assert_array_equal(np.asarray(t.data), a)


def test_an_adapter_pair_of_the_wrong_shapes_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(ValueError, match=r"blk.0.attn_v: lora_a \(2, 8\) and lora_b \(8, 3\) are not"):
        gg.write_lora_adapter(tmp_path / "a.gguf", "llama", 1.0, {"blk.0.attn_v": (np.zeros((2, 8)), np.zeros((8, 3)))})
    assert not (tmp_path / "a.gguf").exists()


def test_an_existing_file_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "a.gguf"
    out.write_bytes(b"keep")
    pair = {"blk.0.attn_v": (np.ones((1, 4), np.float32), np.ones((4, 1), np.float32))}
    with pytest.raises(FileExistsError):
        gg.write_lora_adapter(out, "llama", 1.0, pair)
    assert out.read_bytes() == b"keep"
    gg.write_lora_adapter(out, "llama", 1.0, pair, overwrite=True)
    assert gguf.GGUFReader(out).fields["adapter.type"].contents() == "lora"
