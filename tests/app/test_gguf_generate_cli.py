"""``lowrank generate --model model.gguf``: the GGUF's weights, tokenizer and chat template, as transformers
loads the same file (``gguf_file=``): greedy text equal to transformers' generate then decode, in float64.
(``lowrank serve --model model.gguf`` is checked in tests/serving/test_server_families.py.)"""
import pytest
import torch
import transformers
from gguf_fixtures import byte_bpe, sentencepiece_bpe, write_gguf

from lowrank.app.cli import main, printable

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def gguf_model(request, tmp_path_factory):
    """(folder, file name) of a random Llama over a byte-level BPE ("gpt2") or SentencePiece ("llama") vocabulary."""
    vocab = byte_bpe() if request.param == "gpt2" else sentencepiece_bpe()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=len(vocab.tokens), **SIZES)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp(request.param)
    return folder, write_gguf(folder / "model.gguf", model, vocab, "F32").name


def test_greedy_text_equals_transformers_on_the_same_gguf(gguf_model, capsys):
    folder, name = gguf_model
    auto = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float64).eval()
    prompt = "The quick brown fox"
    ids = torch.tensor([auto(prompt)["input_ids"]])
    new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)[0].tolist()
    expected = auto.decode(new, skip_special_tokens=True)
    assert main(["generate", "--model", str(folder / name), "--prompt", prompt, "--max-new-tokens", "8",
                 "--greedy", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert out.split(") ---\n", 1)[1].removesuffix("\n") == printable(expected, keep="\n\t")
    assert len(new) > ids.shape[1]


def test_qlora_finetune_on_a_q4_0_gguf_then_export_and_generate_with_the_adapter(tmp_path, capsys):
    """lm finetune --model model.gguf --method qlora trains over the file's Q4_0 blocks; the adapter it writes is
    exported for llama.cpp and used by generate on the same file; --resume accepts the run's own checkpoint."""
    torch.manual_seed(0)
    vocab = byte_bpe()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=len(vocab.tokens), **SIZES)).eval()
    model = write_gguf(tmp_path / "q4.gguf", hf, vocab, "Q4_0")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"prompt": "n={i}: ", "completion": "{i * i}"}}\n' for i in range(24)))
    out = tmp_path / "run"
    flags = ["lm", "finetune", "--model", str(model), "--data", str(data), "--method", "qlora", "--target",
             "q_proj,v_proj", "--r", "4", "--steps", "4", "--batch-size", "4", "--eval-every", "2",
             "--save-every", "2", "--out", str(out)]
    assert main(flags) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["export-gguf", str(out / "adapter"), str(tmp_path / "adapter.gguf"), "--base", str(model)]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--adapter", f"sq={out / 'adapter'}", "--prompt", "n=3: ",
                 "--max-new-tokens", "4", "--greedy"]) == 0
    assert "n=3: " in capsys.readouterr().out


def test_keep_quantized_decodes_from_the_files_blocks_with_llama_cpps_arithmetic(tmp_path, capsys):
    """--keep-quantized on a Q4_0 file: the text of the model loaded with keep_quantized and q8_activations, run
    through generate in Python; on a model folder, one line and exit status 2."""
    import numpy as np

    from lowrank.io.tokenizer import load_tokenizer
    from lowrank.models.llama import LlamaForCausalLM
    from lowrank.nn.gguf_dense import GGUFDense
    torch.manual_seed(0)
    vocab = byte_bpe()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=len(vocab.tokens), **SIZES)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    path = write_gguf(tmp_path / "q4.gguf", hf, vocab, "Q4_0")
    model = LlamaForCausalLM.from_pretrained(path, keep_quantized=True, q8_activations=True).eval()
    assert all(m.q8_activations for _, m in model.named_modules() if isinstance(m, GGUFDense))
    tok = load_tokenizer(path)
    ids = np.array([tok.encode("The quick brown fox")])
    new = np.asarray(model.generate(ids, max_new_tokens=6))[0, ids.shape[1]:]
    assert main(["generate", "--model", str(path), "--keep-quantized", "--prompt", "The quick brown fox",
                 "--max-new-tokens", "6", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.split(") ---\n", 1)[1].removesuffix("\n") == printable(
        tok.decode([*ids[0], *new], skip_special_tokens=True), keep="\n\t")
    assert main(["generate", "--model", str(tmp_path), "--keep-quantized", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--keep-quantized is for a llama.cpp .gguf model" in err and len(err.strip().splitlines()) == 1
