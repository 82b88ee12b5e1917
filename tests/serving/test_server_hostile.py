"""Hostile input: each bad request gets OpenAI's error object with the right status, and the server
answers the next good request as if nothing happened."""
import asyncio
import socket
import time

import httpx
import pytest

from lowrank.app.serve import build_server
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
import lowrank as lr

from serving_fixtures import running, save_adapters, serve_args

BASE = "pydoc-byte-4x128"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    allowed = root / "allowed"
    paths = save_adapters(allowed, 1)
    other = lr.get_lora_model(LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=48,
                                                           num_hidden_layers=2, num_attention_heads=2)),
                              lr.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(allowed / "other_base")            # an adapter for another base, in the allowed folder
    save_adapters(root / "outside", 1)
    app, server = build_server(serve_args(adapter=f"a0={paths['a0']}", adapter_dir=allowed, max_queue=64))
    server.body_timeout = 1.0
    with running(app) as url:
        yield url, root


def good(url):
    r = httpx.post(f"{url}/v1/completions", json={"model": "a0", "prompt": "def ", "max_tokens": 3,
                                                  "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3 and httpx.get(f"{url}/health").status_code == 200


def completion(**fields):
    return {"model": "a0", "prompt": "def ", "max_tokens": 3, **fields}


BAD = [  # (body bytes or JSON, status, what the message names)
    (b"{not json", 400, "JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (completion(max_tokens="3"), 400, "max_tokens"),
    (completion(prompt=5), 400, "prompt"),
    (completion(prompt="x" * 400), 400, "context"),
    (completion(max_tokens=0), 400, "max_tokens"),
    (completion(max_tokens=-2), 400, "max_tokens"),
    (completion(max_tokens=10**12), 400, "max_tokens"),
    (b'{"model": "a0", "prompt": "def ", "temperature": NaN}', 400, "temperature"),
    (completion(temperature=-0.5), 400, "temperature"),
    (completion(top_p=0), 400, "top_p"),
    (completion(top_p=1.5), 400, "top_p"),
    (completion(stream="yes"), 400, "stream"),
    (completion(stop=[1]), 400, "stop"),
    (completion(model="nope"), 404, "nope"),
    (completion(model=["a0"]), 400, "model"),
    ({"model": "a0", "messages": "hi"}, 400, "messages"),
]


@pytest.mark.parametrize("body, status, word", BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_body_is_refused_and_the_next_request_served(setup, body, status, word):
    url, _ = setup
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}{path}", headers={"content-type": "application/json"}, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert word in error["message"] and error["code"] == status and error["type"]
    good(url)


def test_a_10_mb_body_gets_413(setup):
    url, _ = setup
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "' + b"x" * 10_000_000 + b'"}', timeout=30)
    assert r.status_code == 413
    good(url)


def test_a_slow_body_is_cut_off_by_the_timeout(setup):
    url, _ = setup
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\"")
        start = time.monotonic()
        reply = s.recv(4096)
        assert b" 408 " in reply.split(b"\r\n")[0] and time.monotonic() - start < 5
    good(url)


@pytest.mark.parametrize("where, status", [("outside/a0", 400), ("allowed/other_base", 400),
                                           ("allowed/../outside/a0", 400)])
def test_load_lora_adapter_refuses_paths_outside_and_adapters_of_another_base(setup, where, status):
    url, root = setup
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root / where)})
    assert r.status_code == status, r.text
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [BASE, "a0"]
    good(url)


def test_a_full_queue_answers_503_with_retry_after(setup):
    url, root = setup
    app, _ = build_server(serve_args(adapter=f"a0={root / 'allowed' / 'a0'}", max_batch=1, max_queue=2))

    async def burst(url):
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*[c.post(f"{url}/v1/completions", json=completion(max_tokens=8))
                                          for _ in range(12)])
    with running(app) as small:
        replies = asyncio.run(burst(small))
        busy = [r for r in replies if r.status_code == 503]
        assert busy and all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == 503 for r in busy)
        assert {r.status_code for r in replies} <= {200, 503} and len(busy) < 12
        good(small)
