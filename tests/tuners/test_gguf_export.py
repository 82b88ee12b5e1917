"""PEFT adapters exported for llama.cpp (lowrank.tuners.lora.gguf_export), checked three independent ways:

- the adapter GGUF read back with ``gguf``'s reader: exactly the expected keys, names and shapes, lora_a equal to
  PEFT's A, and each layer's llama.cpp update (alpha / r) · B A, with B's rows put back in transformers' order
  by an index formula written here, equal to PEFT's own s · B A (rsLoRA, rank_pattern and alpha_pattern in);
- llama.cpp's arithmetic on the GGUF base: the exported pairs added to the base's GGUF tensors as llama.cpp adds
  them (W + alpha / r · B A, in the file's permuted order), the file loaded by transformers' own GGUF reader
  (which undoes the permutation itself), gives the PEFT adapter's logits;
- lowrank itself: the GGUF base (``LlamaForCausalLM.from_pretrained("base.gguf")``) with the exported adapter
  loaded from its GGUF (``gguf_load.lora_model_from_gguf``) gives the PEFT adapter's logits;
- ``--merge``: the merged GGUF loaded by transformers gives the PEFT adapter's logits (F32 to float32 rounding;
  F16 and Q8_0 values within their rounding of the merged weights), and carries the base's tokenizer, which
  transformers' GGUF tokenizer reads back to the same token ids.

Families: Llama, Mistral (head_dim 6 ≠ d/H), Qwen2 (tied head, q/k/v biases) and Qwen3 (q/k norms; head_dim
128, the only one transformers' GGUF reader builds for qwen3).
"""
import json

import gguf
import numpy as np
import peft
import pytest
import torch
import transformers

from lowrank.io.gguf_adapter import write_gguf
from lowrank.models.llama import LlamaForCausalLM
from lowrank.tuners.lora import gguf_export as ge
from lowrank.tuners.lora.gguf_load import lora_model_from_gguf
from peft_random import randomize_peft

SIZES = dict(vocab_size=13, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=50.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None, head_dim=6)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=128)),
}
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
RSLORA = dict(r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True, rank_pattern={"k_proj": 3},
              alpha_pattern={"down_proj": 5, "layers.1.self_attn.q_proj": 7})
PLAIN = dict(r=2, lora_alpha=4, target_modules="all-linear")
PROJECTIONS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def build(family, tmp_path, lora=RSLORA, seed=0, vocab_size=SIZES["vocab_size"]):
    """(PEFT model in float32, base folder, adapter folder): a random base saved and reloaded (so the adapter
    names it as base_model_name_or_path), and a random PEFT adapter saved beside it."""
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    hf = model_class(config_class(**{**SIZES, "vocab_size": vocab_size}, **extra))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "base")
    hf = model_class.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    pm = peft.get_peft_model(hf, peft.LoraConfig(**lora))
    randomize_peft(pm, lambda n: ".lora_" in n, seed=seed + 1, scale=0.3)
    pm.save_pretrained(tmp_path / "adapter")
    return pm.eval(), tmp_path / "base", tmp_path / "adapter"


def peft_layers(pm) -> dict:
    """{gguf module name: PEFT's LoRA layer} of the adapted projections."""
    out = {}
    for name, m in pm.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A and "model.layers." in name:
            layer, part = name.split("model.layers.")[1].split(".", 1)
            out[f"blk.{layer}.{PROJECTIONS[part]}"] = m
    return out


def peft_deltas(pm) -> dict:
    """{gguf module name: PEFT's own s · B A (D_out, D_in)} in float64, transformers' row order."""
    out = {}
    for name, m in peft_layers(pm).items():
        A, B = (x["default"].weight.detach().double() for x in (m.lora_A, m.lora_B))
        out[name] = (m.scaling["default"] * (B @ A)).numpy()
    return out


def to_transformers_rows(w, n_head):
    """Undo llama.cpp's order: file row head·h + 2i + j holds transformers' row head·h + j·h/2 + i."""
    h, out = w.shape[0] // n_head, np.empty_like(w)
    for head in range(n_head):
        for i in range(h // 2):
            for j in range(2):
                out[head * h + j * (h // 2) + i] = w[head * h + 2 * i + j]
    return out


def heads(family, gguf_name):
    """The head count whose rows llama.cpp's converter permutes in ``gguf_name``, or None."""
    if ARCH[family] != "llama":
        return None
    return {"attn_q": SIZES["num_attention_heads"], "attn_k": SIZES["num_key_value_heads"]}.get(gguf_name.split(".")[-1])


def read_pairs(path) -> tuple[float, dict]:
    reader = gguf.GGUFReader(path)
    t = {x.name: np.asarray(x.data) for x in reader.tensors}
    alpha = reader.fields["adapter.lora.alpha"].contents()
    return alpha, {n[:-len(".weight.lora_a")]: (t[n], t[n[:-1] + "b"]) for n in t if n.endswith(".lora_a")}


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


IDS = np.random.default_rng(3).integers(0, SIZES["vocab_size"], (2, 9))


@pytest.mark.parametrize("lora", [RSLORA, PLAIN], ids=["rslora-patterns", "plain"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_exported_adapter_reads_back_with_the_expected_keys_names_shapes_and_updates(tmp_path, family, lora):
    pm, base, adapter = build(family, tmp_path, lora)
    ge.export_gguf_adapter(adapter, tmp_path / "a.gguf", base=base)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    default_s = lora["lora_alpha"] / (np.sqrt(lora["r"]) if lora.get("use_rslora") else lora["r"])
    assert {k: f.contents() for k, f in reader.fields.items()} == {
        "GGUF.version": 3, "GGUF.tensor_count": 28, "GGUF.kv_count": 4, "general.architecture": ARCH[family],
        "general.type": "adapter", "adapter.type": "lora",
        "adapter.lora.alpha": pytest.approx(lora["r"] * default_s, rel=1e-7)}
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    alpha, pairs = read_pairs(tmp_path / "a.gguf")
    expected = peft_deltas(pm)
    assert sorted(pairs) == sorted(expected) and len(expected) == 14
    peft_A = {n: m.lora_A["default"].weight.detach().numpy() for n, m in peft_layers(pm).items()}
    for name, (A, B) in pairs.items():
        r = 3 if name.endswith("attn_k") and lora is RSLORA else 2
        assert A.dtype == B.dtype == np.float32 and A.shape[0] == B.shape[1] == r
        assert (B.shape[0], A.shape[1]) == expected[name].shape
        np.testing.assert_array_equal(A, peft_A[name])                   # A is never folded nor permuted
        n_head = heads(family, name)
        B = B.astype(np.float64) if n_head is None else to_transformers_rows(B.astype(np.float64), n_head)
        delta = alpha / r * (B @ A)                                       # what llama.cpp adds: alpha / r · B A
        np.testing.assert_allclose(delta, expected[name], rtol=0, atol=1e-6 * np.abs(expected[name]).max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_adapter_applied_as_llama_cpp_does_to_the_gguf_base_gives_the_peft_logits(tmp_path, family):
    pm, base, adapter = build(family, tmp_path)
    ge.export_gguf_adapter(adapter, tmp_path / "a.gguf", base=base)
    alpha, pairs = read_pairs(tmp_path / "a.gguf")
    model = LlamaForCausalLM.from_pretrained(base)
    tensors = ge.model_tensors(model, "f32")                             # the GGUF base, F32
    assert not set(f"{n}.weight" for n in pairs) - set(tensors)
    for name, (A, B) in pairs.items():                                   # llama.cpp: W x + alpha / r · B (A x)
        tensors[f"{name}.weight"] = tensors[f"{name}.weight"] + (alpha / B.shape[1] * (B.astype(np.float64) @ A)
                                                                 ).astype(np.float32)
    arch = ARCH[family]
    write_gguf(tmp_path / "m" / "with-lora.gguf", arch, ge.model_metadata(model.config, arch, "t", 0), tensors)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", gguf_file="with-lora.gguf",
                                                               dtype=torch.float32)
    expected, got = logits(pm, IDS), logits(theirs, IDS)
    with pm.disable_adapter():
        base_logits = logits(pm, IDS)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-5 * scale
    assert np.abs(base_logits - expected).max() > 1e-2 * scale          # the adapter mattered


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_merge_writes_a_model_gguf_that_gives_the_peft_logits(tmp_path, family, kind):
    pm, base, adapter = build(family, tmp_path, PLAIN)
    ge.export_merged_gguf(adapter, tmp_path / "m" / "merged.gguf", base=base, dtype=kind)
    reader = gguf.GGUFReader(tmp_path / "m" / "merged.gguf")
    arch = ARCH[family]
    f = {k: v.contents() for k, v in reader.fields.items()}
    c = FAMILIES[family][2]
    head_dim = c.get("head_dim") or SIZES["hidden_size"] // SIZES["num_attention_heads"]
    assert {k: v for k, v in f.items() if k.startswith(f"{arch}.")} == {
        f"{arch}.vocab_size": 13, f"{arch}.context_length": 64, f"{arch}.embedding_length": 32,
        f"{arch}.feed_forward_length": 64, f"{arch}.block_count": 2, f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2, f"{arch}.rope.freq_base": pytest.approx(c.get("rope_theta", 10000.0)),
        f"{arch}.attention.layer_norm_rms_epsilon": pytest.approx(1e-6), f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.attention.key_length": head_dim, f"{arch}.attention.value_length": head_dim}
    assert f["general.architecture"] == arch and f["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[kind]
    merged = {n: w.detach().double().numpy() for n, w in pm.merge_and_unload().state_dict().items()}
    for t in reader.tensors:                                             # values: the merged weights, llama.cpp order
        module, suffix = t.name.rsplit(".", 1)
        hf_name = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}.get(module)
        if hf_name is None:
            layer, part = module.split(".")[1:]
            hf_name = f"model.layers.{layer}." + {**{v: k for k, v in PROJECTIONS.items()},
                                                   "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                                                   "attn_q_norm": "self_attn.q_norm",
                                                   "attn_k_norm": "self_attn.k_norm"}[part]
        want = merged[f"{hf_name}.{suffix}"]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        assert got.shape == want.shape, t.name
        if heads(family, module) is not None:
            got = to_transformers_rows(got, heads(family, module))
        matrix = want.ndim == 2
        expected_type = "F32" if not matrix or kind == "f32" else \
            ("Q8_0" if kind == "q8_0" and want.shape[1] % 32 == 0 else "F16")
        assert t.tensor_type.name == expected_type, t.name
        bound = {"F32": 1e-7, "F16": 1e-3, "Q8_0": 1 / 127}[expected_type] * np.abs(want).max()
        assert np.abs(got - want).max() <= bound, t.name
    assert "output.weight" in {t.name for t in reader.tensors} or family == "qwen2"     # tied: no output tensor
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", gguf_file="merged.gguf",
                                                               dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(FAMILIES[family][1].from_pretrained(base), adapter).eval()
    expected, got = logits(pm, IDS), logits(theirs, IDS)
    with pm.disable_adapter():
        base_logits = logits(pm, IDS)
    if kind == "f32":
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    else:                                # rounded weights (checked above): nearer the adapter's logits than the base's
        assert np.abs(got - expected).max() < 0.5 * np.abs(base_logits - expected).max()


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("lora, message", [
    (dict(PLAIN, use_dora=True), "DoRA magnitudes (use_dora) can't be exported"),
    (dict(PLAIN, modules_to_save=["lm_head"]), "modules_to_save ['lm_head'] can't be exported"),
    (dict(PLAIN, bias="lora_only"), "bias='lora_only' trains biases"),
    (dict(PLAIN, target_modules=["embed_tokens", "q_proj"]), "embedding LoRA (base_model.model.model.embed_tokens"),
    (dict(PLAIN, target_modules=["lm_head"]), "LoRA on lm_head can't be exported: the base ties it"),
])
def test_what_llama_cpp_cannot_load_is_refused_by_name_and_nothing_written(tmp_path, lora, message):
    _, base, adapter = build("qwen2", tmp_path, lora)
    with pytest.raises(ValueError) as e:
        ge.export_gguf_adapter(adapter, tmp_path / "a.gguf", base=base)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "a.gguf").exists()


def test_lm_head_lora_of_an_untied_base_is_exported_as_output(tmp_path):
    pm, base, adapter = build("llama", tmp_path, dict(PLAIN, target_modules=["lm_head", "v_proj"]))
    ge.export_gguf_adapter(adapter, tmp_path / "a.gguf", base=base)
    alpha, pairs = read_pairs(tmp_path / "a.gguf")
    head = pm.base_model.model.lm_head
    expected = head.scaling["default"] * (head.lora_B["default"].weight @ head.lora_A["default"].weight).detach()
    A, B = pairs["output"]
    np.testing.assert_allclose(alpha / B.shape[1] * (B @ A), expected.numpy(), rtol=1e-6, atol=1e-7)


def test_the_base_comes_from_the_adapter_config_or_a_clear_error(tmp_path):
    _, base, adapter = build("llama", tmp_path, PLAIN)
    assert ge.export_gguf_adapter(adapter, tmp_path / "a.gguf")["architecture"] == "llama"     # its base_model_name_or_path
    edit_config(adapter, base_model_name_or_path="org/not-here")
    with pytest.raises(ValueError, match="base_model_name_or_path 'org/not-here' is not a folder holding config.json "
                                         "or a .gguf file; pass the base model with --base"):
        ge.export_gguf_adapter(adapter, tmp_path / "b.gguf")
    with pytest.raises(FileNotFoundError, match="config.json: file not found"):
        ge.export_gguf_adapter(adapter, tmp_path / "b.gguf", base=tmp_path)


def test_an_adapter_for_another_base_is_refused_naming_the_layer(tmp_path):
    _, _, adapter = build("llama", tmp_path / "one", PLAIN)
    _, other, _ = build("qwen3", tmp_path / "two", PLAIN)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj has lora_A \(2, 32\) and lora_B \(16, 2\), "
                                         r"expected \(2, 32\) and \(256, 2\)"):
        ge.export_gguf_adapter(adapter, tmp_path / "a.gguf", base=other)


@pytest.mark.parametrize("extra, message", [
    (dict(sliding_window=4), "sliding_window 4 (< max_position_embeddings 64) can't be written"),
    (dict(rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=4.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=32)),
     "rope_type 'llama3' can't be written as a GGUF here"),
])
def test_merge_refuses_what_the_file_would_compute_differently(tmp_path, monkeypatch, extra, message):
    family = "mistral" if "sliding_window" in extra else "llama"
    monkeypatch.setitem(FAMILIES, family, (*FAMILIES[family][:2], {**FAMILIES[family][2], **extra}))
    _, base, adapter = build(family, tmp_path, PLAIN)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ge.export_merged_gguf(adapter, tmp_path / "m.gguf", base=base)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lowrank_loading_its_gguf_adapter_onto_the_gguf_base_gives_the_peft_logits(tmp_path, family):
    pm, base, adapter = build(family, tmp_path)
    ge.export_gguf_adapter(adapter, tmp_path / "a.gguf", base=base)
    ge.write_model_gguf(LlamaForCausalLM.from_pretrained(base), tmp_path / "base.gguf", "f32")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base.gguf")
    lm = lora_model_from_gguf(model, tmp_path / "a.gguf")
    assert lm.peft_config["default"].rank_pattern == {r"model\.layers\.0\.self_attn\.k_proj": 3,
                                                      r"model\.layers\.1\.self_attn\.k_proj": 3}
    expected = logits(pm, IDS)
    assert np.abs(lm.forward(IDS) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_gguf_adapter_for_another_architecture_is_refused_and_the_model_kept(tmp_path):
    _, base, adapter = build("qwen2", tmp_path, PLAIN)
    ge.export_gguf_adapter(adapter, tmp_path / "a.gguf", base=base)
    _, llama_base, _ = build("llama", tmp_path / "llama", PLAIN)
    model = LlamaForCausalLM.from_pretrained(llama_base)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="an adapter for a 'qwen2' base; this base is 'llama'"):
        lora_model_from_gguf(model, tmp_path / "a.gguf")
    assert {n: p.data for n, p in model.named_parameters()}.keys() == before.keys()
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, before[n])


def save_byte_level_bpe(folder) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's pre-tokenizer) trained on a few sentences, saved as tokenizer.json in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello lowrank", "low rank adapters"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def test_merge_carries_the_bases_tokenizer(tmp_path):
    _, base, adapter = build("qwen2", tmp_path, PLAIN, vocab_size=300)
    fast = save_byte_level_bpe(base)
    ge.export_merged_gguf(adapter, tmp_path / "m" / "merged.gguf", base=base, dtype="f32")
    reader = gguf.GGUFReader(tmp_path / "m" / "merged.gguf")
    f = {k: v.contents() for k, v in reader.fields.items()}
    vocab = fast.get_vocab()
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "default"
    assert f["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get) + [f"[PAD{i}]" for i in range(len(vocab), 300)]
    assert f["tokenizer.ggml.eos_token_id"] == vocab["<|endoftext|>"]
    merges = json.loads(fast.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "m", gguf_file="merged.gguf")
    for text in ["hello world", "the lazy fox jumps over low rank dogs"]:
        assert theirs.encode(text, add_special_tokens=False) == fast.encode(text, add_special_tokens=False)


def test_a_gguf_base_serves_for_the_adapter_and_the_merge(tmp_path):
    from gguf_fixtures import byte_bpe, write_gguf as write_fixture_gguf
    vocab = byte_bpe()
    pm, base, adapter = build("llama", tmp_path, vocab_size=len(vocab.tokens))
    write_fixture_gguf(tmp_path / "base.gguf", transformers.LlamaForCausalLM.from_pretrained(base), vocab)
    ge.export_gguf_adapter(adapter, tmp_path / "from-folder.gguf", base=base)
    ge.export_gguf_adapter(adapter, tmp_path / "from-gguf.gguf", base=tmp_path / "base.gguf")
    assert (tmp_path / "from-gguf.gguf").read_bytes() == (tmp_path / "from-folder.gguf").read_bytes()
    assert ge.export_merged_gguf(adapter, tmp_path / "m" / "merged.gguf", base=tmp_path / "base.gguf", dtype="f32")[
        "tokenizer"]
    ours, theirs = (gguf.GGUFReader(p).fields for p in (tmp_path / "m" / "merged.gguf", tmp_path / "base.gguf"))
    tokenizer_keys = sorted(k for k in theirs if k.startswith("tokenizer."))
    assert sorted(k for k in ours if k.startswith("tokenizer.")) == tokenizer_keys and len(tokenizer_keys) >= 6
    for key in tokenizer_keys:
        assert ours[key].contents() == theirs[key].contents() and ours[key].types == theirs[key].types, key
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", gguf_file="merged.gguf",
                                                               dtype=torch.float32)
    ids = np.random.default_rng(5).integers(0, len(vocab.tokens), (2, 9))
    expected = logits(pm, ids)
    assert np.abs(logits(merged, ids) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_gguf_adapter_of_the_same_architecture_but_other_shapes_is_refused(tmp_path):
    _, base, adapter = build("mistral", tmp_path, PLAIN)                 # "llama" in GGUF, head_dim 6: k (12, 32)
    ge.export_gguf_adapter(adapter, tmp_path / "a.gguf", base=base)
    _, llama_base, _ = build("llama", tmp_path / "llama", PLAIN)         # head_dim 8: k (16, 32)
    with pytest.raises(ValueError, match=r"a.gguf: model.layers.0.self_attn.k_proj has lora_a \(2, 32\) and lora_b "
                                         r"\(12, 2\), expected \(2, 32\) and \(16, 2\) on this base"):
        lora_model_from_gguf(LlamaForCausalLM.from_pretrained(llama_base), tmp_path / "a.gguf")
