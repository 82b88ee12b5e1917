"""``lowrank serve``: an OpenAI-compatible HTTP server over one base model and many adapters.

    lowrank serve --model DIR|model.gguf --adapter sql=ADAPTER_DIR --adapter chat=OTHER_DIR [--port 8000]

A request's ``model`` names an adapter (or the base, by its folder's name or --served-model-name);
every request joins one running batch at the next decode step (``serving.engine``: continuous
batching, each row through its own adapter). Needs the ``serve`` extra (``pip install ".[serve]"``:
Starlette and uvicorn). Binds 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="the base model's folder (config.json, model.safetensors, "
                        "tokenizer files) or a llama.cpp .gguf file")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve the PEFT adapter folder PATH as model NAME (repeatable)")
    parser.add_argument("--served-model-name", default=None, help="the base's name in requests (default: the "
                        "model folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=32, help="rows decoded together at most (default 32)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; more get 503")
    parser.add_argument("--max-adapters", type=int, default=None, help="adapters kept loaded at most; the least "
                        "recently used is evicted and reloaded from its files when asked for (default: all)")
    parser.add_argument("--max-model-len", type=int, default=None, help="positions per request (prompt + new "
                        "tokens) at most; default: the model's context")
    parser.add_argument("--max-prefill-tokens", type=int, default=None, help="prompt tokens prefilled per decode "
                        "step at most, one prompt always joining: bounds how long running requests wait for joining "
                        "ones (default: no bound)")
    parser.add_argument("--adapter-dir", default=None, help="the folder /v1/load_lora_adapter may load from "
                        "(default: loading while serving is off)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request bodies larger get 413")
    parser.add_argument("--threads", type=int, default=None, help="the decode loop's Numba/BLAS threads "
                        "(default: as configured)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")


def adapter_pairs(entries: list) -> dict:
    """--adapter NAME=PATH entries -> {name: path}; ValueError naming a bad entry."""
    pairs = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {entry!r}: expected NAME=PATH")
        if name in pairs:
            raise ValueError(f"--adapter {name} is given twice")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--adapter {entry}: no such folder {path}")
        pairs[name] = path
    return pairs


def build_server(args):
    """(the Starlette app, the Server) for parsed ``args``, model and adapters loaded."""
    from ..serving.api import Server, build_app
    from ..serving.engine import Engine
    from .generate import model_and_tokenizer
    adapters = adapter_pairs(args.adapter)
    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {args.max_batch}, {args.max_queue}")
    if args.max_prefill_tokens is not None and args.max_prefill_tokens < 1:
        raise ValueError(f"--max-prefill-tokens must be >= 1, got {args.max_prefill_tokens}")
    model, tokenizer = model_and_tokenizer(args.model, args.dtype)         # as lowrank generate loads them
    engine = Engine(model, adapters, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_adapters=args.max_adapters, max_length=args.max_model_len,
                    max_prefill_tokens=args.max_prefill_tokens, threads=args.threads)
    name = args.served_model_name or Path(args.model).resolve().name
    if name in adapters:
        raise ValueError(f"--adapter {name} has the base model's name; rename it or set --served-model-name")
    server = Server(engine, tokenizer, name, api_key=args.api_key,
                    adapter_dir=args.adapter_dir, max_body=args.max_body_bytes)
    return build_app(server), server


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ValueError("lowrank serve needs the serve extra: pip install 'lowrank[serve]' "
                         "(starlette, uvicorn)") from None
    app, server = build_server(args)
    print(f"serving {server.base_name} and adapters {list(server.engine.paths)} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
