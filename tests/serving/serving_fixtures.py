"""Fixtures of the serving tests: the shipped byte-level model and random adapters for it, saved to a folder,
and each prompt's tokens generated alone (the oracle every batched row must match)."""
import contextlib
import functools
import socket
import threading
import time
from pathlib import Path

import numpy as np

import lowrank as lr
from lowrank.io.tokenizer import ByteTokenizer
from lowrank.models.llama import LlamaForCausalLM

MODEL = Path(lr.__file__).parent / "models" / "checkpoints" / "pydoc-byte-4x128"


def save_adapters(folder: Path, count: int, seed: int = 0) -> dict:
    """``count`` adapters a0, a1, ... with random non-zero B (ranks 2..5) saved under ``folder``; {name: path}."""
    paths = {}
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = LlamaForCausalLM.from_pretrained(MODEL)
        config = lr.LoraConfig(r=2 + i % 4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        model = lr.get_lora_model(base, config)
        for _, layer in model.lora_layers():
            B = layer.lora_B["default"]
            B.data = (0.2 * rng.standard_normal(B.shape)).astype(B.dtype)
        paths[f"a{i}"] = folder / f"a{i}"
        model.save_pretrained(paths[f"a{i}"])
    return paths


@functools.lru_cache(maxsize=16)
def _runner(adapter_path):
    """The base model alone, or with the one adapter in ``adapter_path``, as ``lowrank generate`` loads them."""
    model = LlamaForCausalLM.from_pretrained(MODEL)
    model.eval()
    runner = model if adapter_path is None else lr.LoraModel.from_pretrained(model, adapter_path)
    runner.eval()
    return runner


def solo_tokens(prompt: str, adapter_path, max_tokens: int, bos: bool = True) -> list:
    """The greedy new tokens of ``prompt`` run alone, as ``lowrank generate`` runs it (stopping at EOS)."""
    tok = ByteTokenizer()
    runner = _runner(None if adapter_path is None else str(adapter_path))
    ids = np.asarray([tok.encode(prompt, add_special_tokens=bos)])
    out = np.asarray(runner.generate(ids, max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id))[0, ids.shape[1]:].tolist()
    return out[:out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on 127.0.0.1 and a free port in a thread; yields the base URL; stops cleanly."""
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


def serve_args(**kwargs):
    """Parsed ``lowrank serve`` arguments for the shipped model (a later ``model=`` overrides it)."""
    import argparse
    from lowrank.app import serve
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    argv = ["--model", str(MODEL)]
    for key, value in kwargs.items():
        for v in value if isinstance(value, list) else [value]:
            argv += [f"--{key.replace('_', '-')}", str(v)]
    return parser.parse_args(argv)
