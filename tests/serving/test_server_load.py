"""A bounded load test on localhost: concurrent requests over 8 adapters and the base, mixed prompt and
output lengths, streamed and not, some cancelled midway. Every request completes (or is cancelled as
asked), every greedy output equals its prompt generated alone, and the server is healthy and idle after;
again with --max-adapters 3, so that adapters are evicted and reloaded from their files while serving."""
import asyncio
import time

import httpx
import numpy as np
import openai
import pytest

from lowrank.app.serve import build_server
from lowrank.io.tokenizer import ByteTokenizer

from serving_fixtures import running, save_adapters, serve_args, solo_tokens

TOK = ByteTokenizer()
BASE = "pydoc-byte-4x128"
REQUESTS, ADAPTERS = 64, 8


def plan(seed=3):
    """(prompt, model, max_tokens, streamed, cancel after this many chunks or None) per request."""
    rng = np.random.default_rng(seed)
    words = ["def ", "import ", "class ", "return ", "# the ", "x = ", "for i in ", "while "]
    out = []
    for i in range(REQUESTS):
        prompt = "".join(rng.choice(words, size=rng.integers(1, 6)))
        model = BASE if i % 9 == 8 else f"a{i % ADAPTERS}"
        cancel = 2 if i % 10 == 3 else None
        out.append((prompt, model, int(rng.integers(2, 14)) if cancel is None else 200, bool(i % 2), cancel))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return save_adapters(tmp_path_factory.mktemp("adapters"), ADAPTERS)


async def one(client, prompt, model, max_tokens, streamed, cancel):
    kwargs = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    if not streamed and cancel is None:
        return (await client.completions.create(**kwargs)).choices[0].text
    text, chunks = "", 0
    stream = await client.completions.create(stream=True, **kwargs)
    async for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
        chunks += 1
        if cancel is not None and chunks >= cancel:
            await stream.close()                            # the client goes away midway
            return None
    return text


@pytest.mark.parametrize("max_adapters", [None, 3])         # 3: adapters evicted and reloaded while serving
def test_concurrent_mixed_adapters_each_equal_their_solo_output(adapters, max_adapters):
    requests = plan()
    expected = [None if cancel else TOK.decode(solo_tokens(p, None if m == BASE else adapters[m], n))
                for p, m, n, _, cancel in requests]
    limits = {} if max_adapters is None else {"max_adapters": max_adapters}
    args = serve_args(adapter=[f"{n}={p}" for n, p in adapters.items()], max_batch=32, max_queue=64, **limits)
    app, server = build_server(args)
    loads, load = [], server.engine._load
    server.engine._load = lambda name: (loads.append(name), load(name))[1]
    with running(app) as url:
        async def all_of_them():
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            return await asyncio.wait_for(asyncio.gather(*[one(client, *r) for r in requests]), 150)
        start = time.monotonic()
        got = asyncio.run(all_of_them())
        elapsed = time.monotonic() - start
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g == e, (i, requests[i])
        deadline = time.monotonic() + 10                 # cancelled rows leave at the next step
        while (server.engine.rows or server.engine.waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = httpx.get(f"{url}/metrics").text
        assert "lowrank_running_rows 0\n" in metrics and "lowrank_queue_depth 0\n" in metrics
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert server.engine.tokens_total > 0 and elapsed < 150
        if max_adapters is not None:                          # each adapter loaded in turn, evicting another
            assert len(server.engine.loaded) <= max_adapters and len(loads) >= ADAPTERS - max_adapters
            evicted = next(n for n in adapters if n not in server.engine.loaded)
            again = httpx.post(f"{url}/v1/completions", json={"model": evicted, "prompt": "def ", "max_tokens": 9,
                                                              "temperature": 0}, timeout=30).json()
            assert again["choices"][0]["text"] == TOK.decode(solo_tokens("def ", adapters[evicted], 9))
            assert loads[-1] == evicted and len(server.engine.loaded) <= max_adapters   # reloaded from its files
