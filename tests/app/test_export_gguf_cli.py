"""``lowrank export-gguf``: the adapter (or with --merge the merged model) written as a GGUF that gguf's reader
reads back; bad input is one line on stderr and exit 2, and an existing file is kept."""
import gguf
import numpy as np
import pytest

import lowrank as lr
from lowrank.app.cli import main
from peft_random import randomize_lowrank

SIZES = dict(vocab_size=11, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)


def saved(tmp_path, **lora):
    """(base folder, adapter folder): a random lowrank Llama and a random LoRA adapter naming it as its base."""
    base = tmp_path / "base"
    model = lr.LlamaForCausalLM(lr.LlamaConfig(**SIZES), seed=0)
    model.save_pretrained(base)
    config = lr.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
                              "base_model_name_or_path": str(base), **lora})
    lm = lr.get_lora_model(model, config)
    randomize_lowrank(lm, lambda n: ".lora_" in n, seed=2, scale=0.3)
    lm.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowrank export-gguf: error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("dtype, kind", [([], "F32"), (["--dtype", "float16"], "F16")])
def test_the_adapter_is_written_for_llama_cpp(tmp_path, capsys, dtype, kind):
    _, adapter = saved(tmp_path)
    out = tmp_path / "adapter.gguf"
    assert main(["export-gguf", str(adapter), str(out), *dtype]) == 0      # base from base_model_name_or_path
    assert "wrote" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["adapter.lora.alpha"].contents() == 4.0
    assert sorted(t.name for t in reader.tensors) == sorted(f"blk.{i}.{p}.weight.lora_{x}" for i in range(2)
                                                            for p in ("attn_q", "attn_v") for x in "ab")
    assert {t.tensor_type.name for t in reader.tensors} == {kind}


@pytest.mark.parametrize("kind, types", [("f16", {"F16", "F32"}), ("q8_0", {"Q8_0", "F32"})])
def test_merge_writes_the_model(tmp_path, kind, types):
    base, adapter = saved(tmp_path)
    out = tmp_path / "merged.gguf"
    assert main(["export-gguf", str(adapter), str(out), "--base", str(base), "--merge", "--type", kind]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == {"f16": 1, "q8_0": 7}[kind]
    assert {t.tensor_type.name for t in reader.tensors} == types
    assert len(reader.tensors) == 3 + 2 * 9                    # token_embd, output_norm, output; 9 per layer


@pytest.mark.parametrize("lora, message", [
    (dict(use_dora=True), "DoRA magnitudes (use_dora) can't be exported"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save ['lm_head'] can't be exported"),
])
def test_what_llama_cpp_cannot_load_is_one_line_and_exit_2(tmp_path, capsys, lora, message):
    _, adapter = saved(tmp_path, **lora)
    assert main(["export-gguf", str(adapter), str(tmp_path / "a.gguf")]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "a.gguf").exists()


def test_a_missing_base_or_adapter_is_one_line_and_exit_2(tmp_path, capsys):
    _, adapter = saved(tmp_path, base_model_name_or_path="org/elsewhere")
    assert main(["export-gguf", str(adapter), str(tmp_path / "a.gguf")]) == 2
    assert "base_model_name_or_path 'org/elsewhere' is not a folder holding config.json" in one_line_error(capsys)
    assert main(["export-gguf", str(tmp_path / "nothing"), str(tmp_path / "a.gguf")]) == 2
    assert "adapter_config.json: file not found" in one_line_error(capsys)


def test_an_existing_file_is_kept_unless_overwrite(tmp_path, capsys):
    _, adapter = saved(tmp_path)
    out = tmp_path / "a.gguf"
    out.write_bytes(b"keep")
    assert main(["export-gguf", str(adapter), str(out)]) == 1
    assert "refusing to overwrite" in one_line_error(capsys)
    assert out.read_bytes() == b"keep"
    assert main(["export-gguf", str(adapter), str(out), "--overwrite"]) == 0
    assert gguf.GGUFReader(out).fields["adapter.type"].contents() == "lora"
    np.testing.assert_array_equal(gguf.GGUFReader(out).tensors[0].data.shape, (2, 32))
