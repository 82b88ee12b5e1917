"""The OpenAI-compatible server under load: N concurrent clients over A adapters, over HTTP.

    python -m benchmarks.server                  # results/server.json + server.png (minutes on 2 cores)
    python -m benchmarks.server --quick          # seconds (CI): results/server_quick.json
    python -m benchmarks.server --shape smollm   # a 135M-parameter decoder's shape (random weights)

``lowrank serve`` runs in its own process (so the clients don't share its interpreter); the model is
the shipped byte-level checkpoint (4 layers, d = 128) or, with --shape smollm, a random decoder of
SmolLM-135M's shape (30 layers, d = 576, 9 heads, 3 key/value heads, I = 1536, V = 49152) with a
synthetic byte-level BPE of V tokens, with A random LoRA adapters (r = 8 on q/v/down_proj). Each of N
clients sends R streamed completions one after the other (a P-character prompt, M new tokens, greedy),
request i on adapter i mod A; the clients start together. Per cell (N, A):

    tok_s          completion tokens / wall seconds of the whole load
    ttft p50, p99  request sent -> the first chunk that carries a token
    itl p50, p99   inter-token latency: the gap before each later chunk, shared equally by the tokens it
                   carries (the server puts the usage so far on every chunk, vLLM's
                   continuous_usage_stats, so a chunk of k coalesced tokens gives k gaps of gap / k)
    tokens_per_chunk  how many tokens the server coalesced per chunk, on average
    serial_tok_s   the same N·R requests sent one at a time (one client)

Targets (the issue's): 16 clients over 8 adapters >= 5x serial_tok_s; >= 0.9x 16 clients on one
adapter; p99 inter-token latency at 16 clients <= 3x its p50. --clients, --adapters, --requests and
--new-tokens shrink a run (e.g. to check the smollm path in a minute).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL = dict(clients=(1, 4, 16, 64), adapters=(1, 8), requests=2, P=24, M=32)
QUICK = dict(clients=(1, 4), adapters=(1, 2), requests=1, P=8, M=16)
SHAPES = {"smollm": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)}


def make_model(folder: Path, shape: str | None) -> Path:
    """The shipped model's folder, or a random decoder of ``shape`` saved with ``synthetic_tokenizer`` in ``folder``."""
    import lowrank as lr
    if shape is None:
        return Path(lr.__file__).parent / "models" / "checkpoints" / "pydoc-byte-4x128"
    from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
    out = folder / shape
    LlamaForCausalLM(LlamaConfig(**SHAPES[shape]), seed=0).save_pretrained(out)
    synthetic_tokenizer(SHAPES[shape]["vocab_size"]).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
    return out


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE of exactly ``vocab_size`` ids, so every id a random model draws has text: the 256 byte
    symbols, then merges of printable ASCII and space (pairs, then triples: each such token is whole text, as
    most of a trained vocabulary is, so the server streams about a chunk per token), then <|endoftext|> (the
    EOS) as the last id."""
    import itertools
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    ascii_ = [chr(b) for b in range(33, 127)] + ["\u0120"]              # byte-level symbols of '!'..'~' and ' '
    vocab, merges = {c: i for i, c in enumerate(alphabet)}, []
    pairs = itertools.chain(itertools.product(ascii_, ascii_),
                            ((a + b, c) for a, b, c in itertools.product(ascii_, ascii_, ascii_)))
    while len(vocab) < vocab_size - 1:
        a, b = next(pairs)
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def make_adapters(model_dir: Path, folder: Path, count: int) -> dict:
    import lowrank as lr
    from lowrank.models.llama import LlamaForCausalLM
    rng, paths = np.random.default_rng(0), {}
    for i in range(count):
        model = lr.get_lora_model(LlamaForCausalLM.from_pretrained(model_dir),
                                  lr.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
        for _, layer in model.lora_layers():
            B = layer.lora_B["default"]
            B.data = (0.05 * rng.standard_normal(B.shape)).astype(B.dtype)
        paths[f"a{i}"] = folder / f"a{i}"
        model.save_pretrained(paths[f"a{i}"])
    return paths


def start_server(model_dir, adapters: dict, max_batch: int, max_len: int, threads: int, extra=()):
    """``lowrank serve`` in a subprocess on a free port, its Numba and BLAS pools at ``threads``, ``extra``
    arguments last; (process, base URL) once /health answers."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from lowrank.app.cli import main; raise SystemExit(main())", "serve",
           "--model", str(model_dir), "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "1024",
           "--served-model-name", "base", "--max-model-len", str(max_len), "--threads", str(threads)]
    cmd += [f"--adapter={n}={p}" for n, p in adapters.items()] + list(extra)
    env = {**os.environ, **{v: str(threads) for v in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                      "MKL_NUM_THREADS")}}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
        time.sleep(0.2)


async def request(client, url, prompt, model, M):
    """One streamed completion: (completion tokens, chunks with tokens, ttft seconds, [inter-token gaps])."""
    body = {"model": model, "prompt": prompt, "max_tokens": M, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    start, arrivals = time.perf_counter(), []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append((time.perf_counter() - start, json.loads(line[6:])["usage"]["completion_tokens"]))
    return (arrivals[-1][1] if arrivals else 0, *token_gaps(arrivals))


def token_gaps(arrivals) -> tuple:
    """(chunks that carry tokens, ttft, inter-token gaps) from each chunk's (seconds since the request, completion
    tokens so far): a chunk carrying k tokens after a gap g counts k gaps of g / k; ttft None without tokens."""
    chunks, ttft, gaps, last, tokens = 0, None, [], None, 0
    for t, total in arrivals:
        k, tokens = total - tokens, max(total, tokens)
        if k <= 0:
            continue
        chunks += 1
        if last is None:
            ttft = t
        else:
            gaps += [(t - last) / k] * k
        last = t
    return chunks, ttft, gaps


async def load(url, clients: int, requests: int, adapters: int, P: int, M: int, seed: int = 0):
    """N clients, each sending ``requests`` in turn; (tokens, chunks, seconds, ttfts, inter-token gaps)."""
    import httpx
    rng = np.random.default_rng(seed)
    prompts = ["".join(chr(c) for c in rng.integers(97, 123, P)) for _ in range(clients * requests)]
    models = ["base" if adapters == 0 else f"a{i % adapters}" for i in range(clients * requests)]

    async def client_loop(c, k):
        return [await request(c, url, prompts[k * requests + j], models[k * requests + j], M) for j in range(requests)]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        start = time.perf_counter()
        results = await asyncio.gather(*[client_loop(c, k) for k in range(clients)])
        seconds = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    return (sum(r[0] for r in flat), sum(r[1] for r in flat), seconds, [r[2] for r in flat if r[2] is not None],
            [g for r in flat for g in r[3]])


def cell(url, N, A, cfg) -> dict:
    tokens, chunks, seconds, ttft, gaps = asyncio.run(load(url, N, cfg["requests"], A, cfg["P"], cfg["M"]))
    s_tokens, _, s_seconds, _, _ = asyncio.run(load(url, 1, N * cfg["requests"], A, cfg["P"], cfg["M"]))
    ms = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else float("nan")
    return {"clients": N, "adapters": A, "requests": N * cfg["requests"], "tokens": tokens,
            "tok_s": tokens / seconds, "serial_tok_s": s_tokens / s_seconds,
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "itl_p50_ms": ms(gaps, 50),
            "itl_p99_ms": ms(gaps, 99), "itl_samples": len(gaps), "tokens_per_chunk": tokens / max(chunks, 1)}


TARGETS = {"speedup_16x8_vs_serial": (">=", 5.0), "ratio_8_vs_1_adapter_at_16": (">=", 0.9),
           "itl_p99_over_p50_16x8": ("<=", 3.0)}


def targets(rows) -> dict:
    """The issue's three figures at 16 clients, each with its bound and whether it is met ({} without those cells)."""
    at = {(r["clients"], r["adapters"]): r for r in rows}
    if (16, 8) not in at or (16, 1) not in at:
        return {}
    r8, r1 = at[16, 8], at[16, 1]
    figures = {"speedup_16x8_vs_serial": r8["tok_s"] / r8["serial_tok_s"],
               "ratio_8_vs_1_adapter_at_16": r8["tok_s"] / r1["tok_s"],
               "itl_p99_over_p50_16x8": r8["itl_p99_ms"] / r8["itl_p50_ms"]}
    return {name: {"value": v, "bound": f"{TARGETS[name][0]} {TARGETS[name][1]}",
                   "met": v >= TARGETS[name][1] if TARGETS[name][0] == ">=" else v <= TARGETS[name][1]}
            for name, v in figures.items()}


def plot(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for A in sorted({r["adapters"] for r in rows}):
        sel = [r for r in rows if r["adapters"] == A]
        ax.plot([r["clients"] for r in sel], [r["tok_s"] for r in sel], "o-", label=f"{A} adapters, concurrent")
        ax.plot([r["clients"] for r in sel], [r["serial_tok_s"] for r in sel], "x--",
                label=f"{A} adapters, one at a time")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("tokens / s")
    ax.legend()
    ax.set_title("lowrank serve: continuous batching of mixed adapters")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two small cells: seconds (CI)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a random decoder of this shape")
    p.add_argument("--threads", type=int, default=1, help="the server's Numba/BLAS threads (default 1)")
    p.add_argument("--out", default=None, help="JSON path (default results/server[_quick].json)")
    p.add_argument("--clients", default=None, help="comma-separated client counts (default: the config's)")
    p.add_argument("--adapters", default=None, help="comma-separated adapter counts (default: the config's)")
    p.add_argument("--requests", type=int, default=None, help="requests per client (default: the config's)")
    p.add_argument("--new-tokens", type=int, default=None, help="M, new tokens per request (default: the config's)")
    p.add_argument("--max-prefill-tokens", type=int, default=None, help="the server's --max-prefill-tokens "
                   "(default: unbounded)")
    a = p.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    for key, given in (("clients", a.clients), ("adapters", a.adapters)):
        if given is not None:
            cfg[key] = tuple(int(x) for x in given.split(","))
    cfg.update({k: v for k, v in (("requests", a.requests), ("M", a.new_tokens)) if v is not None})
    stem = "server" + (f"_{a.shape}" if a.shape else "") + ("_quick" if a.quick else "")
    out = Path(a.out or Path(__file__).parent / "results" / f"{stem}.json")
    rows, load_start = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp), a.shape)
        adapters = make_adapters(model_dir, Path(tmp), max(cfg["adapters"]))
        extra = [] if a.max_prefill_tokens is None else ["--max-prefill-tokens", str(a.max_prefill_tokens)]
        proc, url = start_server(model_dir, adapters, max(cfg["clients"]), cfg["P"] + cfg["M"] + 8, a.threads, extra)
        try:
            asyncio.run(load(url, 2, 1, max(cfg["adapters"]), cfg["P"], 4))      # warm-up: compile the kernels
            for A in cfg["adapters"]:
                for N in cfg["clients"]:
                    rows.append(cell(url, N, A, cfg))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    payload = {"command": " ".join(["python -m benchmarks.server", *(sys.argv[1:] if argv is None else argv)]),
               "config": cfg, "rows": rows, "targets": targets(rows),
               "machine": {"cores": os.cpu_count(), "server_threads": a.threads, "loadavg_at_start": load_start,
                           "loadavg_at_end": os.getloadavg()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    plot(out.with_suffix(".png"), rows)
    for name, t in payload["targets"].items():
        print(f"{name}: {t['value']:.2f} (target {t['bound']}: {'met' if t['met'] else 'NOT met'})")
    return payload


if __name__ == "__main__":
    main()
