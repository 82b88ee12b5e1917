"""The server on models other than the shipped byte-level one: a transformers Llama folder with a BPE
tokenizer and a ChatML template (tests/tiny_models.py), and llama.cpp GGUF files (Q8_0 matrices, a
byte-level BPE or a SentencePiece-style vocabulary, and a chat template; tests/gguf_fixtures.py). Through the openai client,
each greedy completion and chat equals the model (with the adapter) generating the same ids alone, as
``lowrank generate`` runs it; a chat uses the adapter's template, else the base's."""
import json

import numpy as np
import openai
import pytest
import torch
import transformers

import lowrank as lr
from lowrank.app.serve import build_server
from lowrank.io.tokenizer import load_tokenizer
from lowrank.models.llama import LlamaForCausalLM

from gguf_fixtures import byte_bpe, sentencepiece_bpe, write_gguf
from serving_fixtures import running, serve_args
from tiny_models import tiny_llama

ADAPTER_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}[assistant] {% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(x, y):"}]


def bpe_folder(root):
    return tiny_llama(root / "bpe", seed=1, context=96)


def gguf_file(root, vocab):
    torch.manual_seed(2)
    config = transformers.LlamaConfig(vocab_size=len(vocab.tokens), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=96)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return write_gguf(root / "tiny.gguf", model, vocab, "Q8_0")


def save_adapter(model_path, folder, seed, template_in=None):
    """A random LoRA adapter (non-zero B) for the model at ``model_path``; with ``template_in`` =
    "tokenizer_config.json", its own chat template there (as a fine-tune saves it)."""
    model = lr.get_lora_model(LlamaForCausalLM.from_pretrained(model_path),
                              lr.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    rng = np.random.default_rng(seed)
    for _, layer in model.lora_layers():
        B = layer.lora_B["default"]
        B.data = (0.3 * rng.standard_normal(B.shape)).astype(B.dtype)
    model.save_pretrained(folder)
    if template_in == "tokenizer_config.json":
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": ADAPTER_TEMPLATE}))
    return folder


def solo(model_path, adapter, ids, n):
    """(text, finish_reason, completion tokens) of ``ids`` generated alone, greedily, as lowrank generate does."""
    tok = load_tokenizer(model_path)
    model = LlamaForCausalLM.from_pretrained(model_path)
    model.eval()
    runner = model if adapter is None else lr.LoraModel.from_pretrained(model, adapter)
    runner.eval()
    out = np.asarray(runner.generate(np.asarray([ids]), max_new_tokens=n, eos_token_id=tok.stop_token_ids,
                                     pad_token_id=tok.pad_token_id))[0, len(ids):].tolist()
    stops = [i for i, t in enumerate(out) if t in tok.stop_token_ids]
    new = out[:stops[0] + 1] if stops else out
    return tok.decode(new, skip_special_tokens=True), ("stop" if stops else "length"), len(new)


@pytest.fixture(scope="module", params=["bpe", "gguf", "gguf-sentencepiece"])
def served(request, tmp_path_factory):
    """(model path, {adapter name: folder}, base URL): the base, adapter "plain" (no template) and "own"
    (its template in tokenizer_config.json)."""
    root = tmp_path_factory.mktemp(request.param)
    model_path = bpe_folder(root) if request.param == "bpe" else \
        gguf_file(root, byte_bpe() if request.param == "gguf" else sentencepiece_bpe())
    adapters = {"plain": save_adapter(model_path, root / "plain", 0),
                "own": save_adapter(model_path, root / "own", 1, "tokenizer_config.json")}
    app, server = build_server(serve_args(model=model_path, adapter=[f"{n}={p}" for n, p in adapters.items()],
                                          served_model_name="base"))
    with running(app) as url:
        yield model_path, adapters, url


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", ["base", "plain", "own"])
def test_completions_equal_the_model_alone(served, model):
    model_path, adapters, url = served
    prompt = "def add(x, y):\n    return"
    ids = load_tokenizer(model_path).encode(prompt)
    text, finish, n = solo(model_path, adapters.get(model), ids, 12)
    out = client(url).completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (text, finish)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), n)
    chunks = list(client(url).completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text


@pytest.mark.parametrize("model", ["base", "plain", "own"])
def test_chat_uses_the_adapters_template_else_the_bases(served, model):
    model_path, adapters, url = served
    tok = load_tokenizer(model_path)
    template = ADAPTER_TEMPLATE if model == "own" else None        # "plain" has none: the base's
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, chat_template=template)
    text, finish, n = solo(model_path, adapters.get(model), ids, 10)
    out = client(url).chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0)
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (text, finish)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), n)
