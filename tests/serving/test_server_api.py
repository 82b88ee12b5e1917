"""The HTTP API through the official ``openai`` client: completions and chat, streamed and not, each
adapter and the base, stop strings, /v1/models, loading and unloading while serving, the API key.
The oracle is each prompt generated alone (``generate``), decoded by the byte tokenizer."""
import json

import httpx
import openai
import pytest

from lowrank.app.serve import build_server
from lowrank.io.tokenizer import ByteTokenizer

from serving_fixtures import running, save_adapters, serve_args, solo_tokens

TOK = ByteTokenizer()
BASE = "pydoc-byte-4x128"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<bot>{% endif %}")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    paths = save_adapters(tmp_path_factory.mktemp("adapters"), 4)
    (paths["a0"] / "chat_template.jinja").write_text(TEMPLATE)
    return paths


@pytest.fixture(scope="module")
def url(adapters):
    args = serve_args(adapter=[f"{n}={adapters[n]}" for n in ("a0", "a1", "a2")],
                      adapter_dir=adapters["a0"].parent, max_batch=8)
    app, _ = build_server(args)
    with running(app) as base_url:
        yield base_url


def client(url, **kwargs):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def solo_text(prompt, path, n, bos=True):
    tokens = solo_tokens(prompt, path, n, bos)
    return TOK.decode(tokens), ("stop" if tokens[-1] == TOK.eos_token_id else "length"), len(tokens)


@pytest.mark.parametrize("model", [BASE, "a0", "a1", "a2"])
def test_completions_streamed_and_not_equal_the_solo_tokens(url, adapters, model):
    text, finish, n = solo_text("def ", None if model == BASE else adapters[model], 20)
    c = client(url)
    out = c.completions.create(model=model, prompt="def ", max_tokens=20, temperature=0)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (text, finish)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(TOK.encode("def ")), n)
    chunks = list(c.completions.create(model=model, prompt="def ", max_tokens=20, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == finish


def test_chat_uses_the_adapters_template_and_the_base_without_one_is_refused(url, adapters):
    messages = [{"role": "user", "content": "Write a loop"}]
    rendered = "<user>Write a loop\n<bot>"
    text, finish, n = solo_text(rendered, adapters["a0"], 16, bos=False)
    c = client(url)
    out = c.chat.completions.create(model="a0", messages=messages, max_tokens=16, temperature=0)
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (text, finish)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == n
    chunks = list(c.chat.completions.create(model="a0", messages=messages, max_tokens=16, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    with pytest.raises(openai.BadRequestError, match="chat template"):
        c.chat.completions.create(model=BASE, messages=messages, max_tokens=4)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_text_before_it(url, adapters, stream):
    full, _, _ = solo_text("import ", adapters["a1"], 24)
    stop = full[6:8]
    expected = full[:full.find(stop)]
    out = client(url).completions.create(model="a1", prompt="import ", max_tokens=24, temperature=0,
                                         stop=[stop, "\x00never"], stream=stream)
    chunks = list(out) if stream else [out]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_models_lists_the_base_then_each_adapter_with_its_parent(url):
    models = client(url).models.list().data
    assert [m.id for m in models] == [BASE, "a0", "a1", "a2"]
    assert [getattr(m, "parent") for m in models] == [None, BASE, BASE, BASE]
    assert {getattr(m, "max_model_len") for m in models} == {256}              # the shipped model's context


def test_load_and_unload_while_serving(url, adapters):
    c = client(url)
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": str(adapters["a3"])})
    assert r.status_code == 200, r.text
    text, _, _ = solo_text("x = ", adapters["a3"], 10)
    assert c.completions.create(model="extra", prompt="x = ", max_tokens=10, temperature=0).choices[0].text == text
    with c.completions.create(model="a2", prompt="# ", max_tokens=200, temperature=0, stream=True) as stream:
        chunks = iter(stream)
        text = next(chunks).choices[0].text                     # a2 has a running request now
        busy = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a2"})
        assert busy.status_code == 409 and busy.json()["error"]["code"] == 409
        text += "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == solo_text("# ", adapters["a2"], 200)[0]     # the refused unload changed nothing
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="extra", prompt="x = ", max_tokens=2)
    assert [m.id for m in c.models.list().data] == [BASE, "a0", "a1", "a2"]


def test_the_api_key_is_required_when_set(adapters):
    app, _ = build_server(serve_args(api_key="sekret"))
    with running(app) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").completions.create(model=BASE, prompt="a", max_tokens=1)
        out = client(url, api_key="sekret").completions.create(model=BASE, prompt="a", max_tokens=2)
        assert out.usage.completion_tokens >= 1
        assert httpx.get(f"{url}/health").status_code == 200


def test_greedy_text_equals_what_lowrank_generate_prints(url, adapters, capsys):
    from lowrank.app.cli import main
    from serving_fixtures import MODEL
    for name, prompt in (("a1", "def main("), ("a2", "The ")):
        assert main(["generate", "--model", str(MODEL), "--adapter", str(adapters[name]), "--prompt", prompt,
                     "--max-new-tokens", "16"]) == 0
        printed = capsys.readouterr().out.split("---\n", 1)[1].rstrip("\n")
        served = client(url).completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0)
        assert printed == prompt + served.choices[0].text


def test_serve_refuses_bad_arguments_with_exit_status_2(capsys):
    from lowrank.app.cli import main
    from serving_fixtures import MODEL
    assert main(["serve", "--model", str(MODEL), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve", "--model", str(MODEL), "--adapter", "x=/nonexistent/folder"]) == 2


def test_a_seeded_sampled_request_is_reproducible_and_draws_what_generate_draws_alone(url, adapters):
    import numpy as np
    import lowrank as lr
    from lowrank.models.llama import LlamaForCausalLM
    from serving_fixtures import MODEL
    runner = lr.LoraModel.from_pretrained(LlamaForCausalLM.from_pretrained(MODEL), adapters["a1"])
    runner.eval()
    ids = np.asarray([TOK.encode("def ")])
    alone = np.asarray(runner.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, seed=11,
                                       eos_token_id=TOK.eos_token_id))[0, ids.shape[1]:].tolist()
    alone = alone[:alone.index(TOK.eos_token_id) + 1] if TOK.eos_token_id in alone else alone
    settings = dict(model="a1", prompt="def ", max_tokens=12, temperature=0.8, top_p=0.9, seed=11)
    texts = [client(url).completions.create(**settings).choices[0].text for _ in range(2)]
    chunks = client(url).completions.create(**settings, stream=True)
    texts.append("".join(ch.choices[0].text for ch in chunks if ch.choices))
    assert texts == [TOK.decode(alone)] * 3


def test_a_stream_is_server_sent_events_ending_in_done_and_metrics_count_the_tokens(url, adapters):
    before = metrics(url)
    body = {"model": "a0", "prompt": "def ", "max_tokens": 7, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    counts = [ch["usage"]["completion_tokens"] for ch in chunks]             # continuous_usage_stats: every chunk
    assert counts == sorted(counts) and counts[-2] == 7 and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]) == solo_text("def ", adapters["a0"], 7)[0]
    after = metrics(url)
    assert after["lowrank_generated_tokens_total"] - before["lowrank_generated_tokens_total"] == 7
    assert after["lowrank_tokens_per_second"] > 0
    served = len(client(url).models.list().data) - 1                       # the adapters, not the base
    assert after["lowrank_adapters_loaded"] == after["lowrank_adapters_served"] == served


def metrics(url) -> dict:
    """/metrics' Prometheus text -> {name: value}, every sample line checked for '# TYPE' above it."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    typed = {line.split()[2] for line in lines if line.startswith("# TYPE ")}
    samples = dict(line.split() for line in lines if not line.startswith("#"))
    assert set(samples) <= typed
    return {k: float(v) for k, v in samples.items()}


def test_serve_binds_127_0_0_1_by_default():
    assert serve_args().host == "127.0.0.1"
