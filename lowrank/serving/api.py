"""The OpenAI-compatible HTTP API over an ``engine.Engine`` (Starlette on uvicorn).

    GET  /health                   liveness: 200 while the decode loop runs
    GET  /metrics                  Prometheus text: queue depth, running rows, tokens/s, adapters loaded
    GET  /v1/models                the base, then each adapter with ``parent`` = the base (vLLM's listing)
    POST /v1/completions           prompt -> text; ``model`` picks the adapter (the base's name: none)
    POST /v1/chat/completions      messages -> the adapter's chat template, else the base's -> text
    POST /v1/load_lora_adapter     {"lora_name", "lora_path"}: a folder inside --adapter-dir
    POST /v1/unload_lora_adapter   {"lora_name"}: 409 while requests use it

``stream: true`` answers with server-sent events, one chunk per piece of text, ending in
``data: [DONE]``; tokens that arrive while the client's chunk is being sent go out together in
the next chunk. ``stream_options``: ``include_usage`` adds a usage chunk at the end (OpenAI's),
``continuous_usage_stats`` puts the usage so far on every chunk (vLLM's), so a client can count the
tokens of each chunk. Text is decoded as ids arrive (``io.tokenizer.DecodeStream``); with ``stop``
strings, the last len(longest stop) − 1 characters are held back until they can't start one, and a
stop string found ends the request (its row leaves at the next step) with finish_reason "stop".
A client that goes away cancels its request the same way.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ..io.chat_template import load_chat_template, render_chat_template
from ..io.tokenizer import TOKENIZER_CONFIG_FILE, DecodeStream, read_json
from ..tuners.lora.mixed import BASE
from .engine import AdapterBusy, QueueFull, Request
from .protocol import ApiError, messages, prompt_text, sampling, stop_at


class Server:
    """What the routes share: the engine, the tokenizer and the server's limits."""

    def __init__(self, engine, tokenizer, base_name: str, *, api_key: str | None = None, adapter_dir=None,
                 max_body: int = 1 << 20, body_timeout: float = 10.0):
        self.engine, self.tokenizer, self.base_name = engine, tokenizer, base_name
        self.api_key, self.max_body, self.body_timeout = api_key, max_body, body_timeout
        self.adapter_dir = None if adapter_dir is None else Path(adapter_dir).resolve()
        self.created = int(time.time())

    # -- request plumbing ---------------------------------------------------------------------
    def authorize(self, request: HttpRequest):
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")

    async def body(self, request: HttpRequest):
        """The JSON body: 413 past ``max_body`` bytes, 408 when it takes longer than ``body_timeout``, 400 if bad."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"the body has {length} bytes, more than the limit of {self.max_body}")
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise ApiError(413, f"the body is more than the limit of {self.max_body} bytes")
                chunks.append(chunk)
        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the body did not arrive within {self.body_timeout} s") from None
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}") from None

    def adapter_for(self, model: str) -> str:
        if model == self.base_name:
            return BASE
        if model in self.engine.paths:
            return model
        raise ApiError(404, f"the model {model!r} does not exist; served: {[self.base_name, *self.engine.paths]}",
                       "model")

    def max_tokens(self, prompt_len: int, asked: int | None, default: int | None) -> int:
        room = self.engine.max_length - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this server's context holds "
                                f"{self.engine.max_length} positions, so at most {self.engine.max_length - 1}",
                           "prompt")
        n = asked if asked is not None else min(default or room, room)
        if n > room:
            raise ApiError(400, f"max_tokens {n} + the prompt's {prompt_len} tokens exceed the context of "
                                f"{self.engine.max_length} positions; ask for at most {room}", "max_tokens")
        return n

    def chat_ids(self, adapter: str, msgs: list) -> list:
        template, where = None, "chat_template"
        try:
            if adapter != BASE:                           # as lowrank generate: chat_template.jinja, else its config
                folder = Path(self.engine.paths[adapter])
                config = folder / TOKENIZER_CONFIG_FILE
                template, where = load_chat_template(folder, read_json(config) if config.is_file() else {})
        except (ValueError, OSError) as e:
            raise ApiError(500, f"adapter {adapter!r}'s chat template can't be read: {str(e)[:300]}") from None
        if template is None:
            template, where = getattr(self.tokenizer, "chat_template", None), "the base's chat_template"
        if template is None:
            raise ApiError(400, "neither the adapter nor the base model has a chat template; use /v1/completions",
                           "model")
        special = dict(getattr(self.tokenizer, "special_tokens_map", {}) or {})
        try:
            text = render_chat_template(template, msgs, where=where, add_generation_prompt=True, **special)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)[:300], "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- generation ---------------------------------------------------------------------------
    def submit(self, ids: list, adapter: str, s, max_tokens: int):
        """Queue the request now (503 with Retry-After when the queue is full); (engine request, its events)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(kind, value):
            with contextlib.suppress(RuntimeError):           # the loop closed: nobody listens any more
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        r = Request(ids, adapter, max_tokens, emit, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                    stop_ids=tuple(getattr(self.tokenizer, "stop_token_ids", ()) or ()))
        try:
            self.engine.submit(r)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", headers={"Retry-After": "1"}) from None
        return r, events

    async def pieces(self, r: Request, events, s, http: HttpRequest):
        """Yield (text piece, finish, tokens) as text arrives: ``tokens`` the completion tokens decoded so far,
        ``finish`` None until the last piece, then (finish_reason, completion tokens)."""
        decoder = DecodeStream(self.tokenizer, skip_special_tokens=True)
        hold = max((len(x) for x in s.stop), default=1) - 1
        text, sent, tokens, checked = "", 0, 0, time.monotonic()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    kind = None
                if time.monotonic() - checked > 0.5:           # the client went away: its row leaves
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                if kind is None:
                    continue
                batch = [(kind, value)]
                while not events.empty():                      # tokens that arrived meanwhile: one chunk
                    batch.append(events.get_nowait())
                finish, cut = None, None
                for kind, value in batch:
                    if kind == "missing":                  # unloaded between the check and the queue
                        raise ApiError(404, value, "model")
                    if kind == "error":
                        raise ApiError(500, f"generation failed: {value}")
                    if kind == "token":
                        text += decoder.put(value)
                        tokens += 1
                    else:
                        text += decoder.end()
                    cut = stop_at(text, s.stop) if s.stop else None
                    if cut is not None or kind == "done":
                        finish = "stop" if cut is not None or value != "length" else "length"
                        break
                if finish is not None:
                    text = text if cut is None else text[:cut]
                    yield text[sent:], (finish, tokens), tokens
                    return
                if len(text) - hold > sent:
                    yield text[sent:len(text) - hold], None, tokens
                    sent = len(text) - hold
        finally:
            r.cancel()                                          # a no-op once the row has left

    async def respond(self, http: HttpRequest, chat: bool):
        self.authorize(http)
        body = await self.body(http)
        s = sampling(body)
        adapter = self.adapter_for(s.model)
        if chat:
            ids = self.chat_ids(adapter, messages(body))
        else:
            ids = self.tokenizer.encode(prompt_text(body))
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt")
        n = self.max_tokens(len(ids), s.max_tokens, None if chat else 16)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": s.model}
        pieces = self.pieces(*self.submit(ids, adapter, s, n), s, http)
        if s.stream:
            return StreamingResponse(self._sse(pieces, head, chat, len(ids), stream_usage(body)),
                                     media_type="text/event-stream")
        text, finish = "", None
        async for piece, end, _ in pieces:
            text += piece
            finish = end or finish
        if finish is None:                                      # the client went away
            return PlainTextResponse("", status_code=499)
        choice = {"index": 0, "finish_reason": finish[0]}
        choice.update({"message": {"role": "assistant", "content": text}} if chat
                      else {"text": text, "logprobs": None})
        return JSONResponse({**head, "choices": [choice], "usage": _usage(len(ids), finish[1])})

    async def _sse(self, pieces, head, chat: bool, prompt_len: int, usage: tuple):
        """Server-sent events: a chunk per piece, the finish chunk, then (``include_usage``) a usage chunk and
        ``[DONE]``; with ``continuous_usage_stats`` (vLLM's option) every chunk carries the usage so far."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        final_usage, every_chunk = usage

        def chunk(text, finish, tokens, first=False):
            if chat:
                delta = {} if finish is not None else {"role": "assistant", "content": text} if first else \
                    {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            extra = {"usage": _usage(prompt_len, tokens)} if every_chunk else {}
            return f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"
        first = True
        try:
            async for piece, end, tokens in pieces:
                if piece or first:
                    yield chunk(piece, None, tokens, first)
                    first = False
                if end is not None:
                    yield chunk("", end[0], tokens)
                    if final_usage:
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(prompt_len, end[1])})}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    # -- adapters ---------------------------------------------------------------------------------
    async def load(self, http: HttpRequest):
        self.authorize(http)
        body = await self.body(http)
        name, path = (body.get("lora_name"), body.get("lora_path")) if isinstance(body, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(path, str):
            raise ApiError(400, "the body must be {'lora_name': str, 'lora_path': str}")
        if self.adapter_dir is None:
            raise ApiError(400, "loading adapters while serving needs --adapter-dir (the folder they may come from)")
        folder = Path(path).resolve()
        if not folder.is_relative_to(self.adapter_dir):
            raise ApiError(400, f"lora_path must lie inside the adapter directory {self.adapter_dir}", "lora_path")
        if name == self.base_name or name in self.engine.paths:
            raise ApiError(400, f"the model {name!r} is already served", "lora_name")
        try:
            await asyncio.wrap_future(self.engine.call(self.engine.register, name, str(folder)))
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise ApiError(400, f"can't load adapter {name!r}: {str(e)[:300]}", "lora_path") from None
        return JSONResponse({"status": "ok", "message": f"adapter {name!r} loaded"})

    async def unload(self, http: HttpRequest):
        self.authorize(http)
        body = await self.body(http)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise ApiError(400, "the body must be {'lora_name': str}")
        try:
            await asyncio.wrap_future(self.engine.call(self.engine.unregister, name))
        except KeyError:
            raise ApiError(404, f"no adapter {name!r} is served", "lora_name") from None
        except AdapterBusy as e:
            raise ApiError(409, str(e), "lora_name") from None
        return JSONResponse({"status": "ok", "message": f"adapter {name!r} unloaded"})

    async def models(self, http: HttpRequest):
        self.authorize(http)
        card = {"object": "model", "created": self.created, "owned_by": "lowrank",
                "max_model_len": self.engine.max_length}
        data = [{"id": self.base_name, **card, "root": self.base_name, "parent": None}]
        data += [{"id": n, **card, "root": p, "parent": self.base_name} for n, p in list(self.engine.paths.items())]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, http: HttpRequest):
        alive = self.engine._thread is not None and self.engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    async def metrics(self, http: HttpRequest):
        e = self.engine
        rows = [("queue_depth", "gauge", "requests waiting to join the batch", len(e.waiting)),
                ("running_rows", "gauge", "rows in the running batch", len(e.rows)),
                ("tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
                 e.tokens_per_second()),
                ("generated_tokens_total", "counter", "tokens generated since start", e.tokens_total),
                ("adapters_loaded", "gauge", "adapters stacked in memory", len(e.loaded)),
                ("adapters_served", "gauge", "adapters the server answers for", len(e.paths))]
        text = "".join(f"# HELP lowrank_{n} {h}\n# TYPE lowrank_{n} {t}\nlowrank_{n} {v}\n" for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def stream_usage(body: dict) -> tuple:
    """(a usage chunk at the end, usage on every chunk) as ``stream_options`` asks."""
    options = body.get("stream_options")
    options = options if isinstance(options, dict) else {}
    return options.get("include_usage") is True, options.get("continuous_usage_stats") is True


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _handled(fn):
    """A route whose ApiError becomes OpenAI's error object, and whose defects a 500 (the server serves on)."""
    async def route(request):
        try:
            return await fn(request)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except Exception as e:                      # a defect: answer it, keep serving
            return JSONResponse(ApiError(500, f"{type(e).__name__}: {str(e)[:300]}").body(), status_code=500)
    return route


def build_app(server: Server) -> Starlette:
    """The Starlette app; its lifespan starts and stops the engine's loop."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()
    routes = [Route("/health", _handled(server.health)), Route("/metrics", _handled(server.metrics)),
              Route("/v1/models", _handled(server.models)),
              Route("/v1/completions", _handled(lambda r: server.respond(r, chat=False)), methods=["POST"]),
              Route("/v1/chat/completions", _handled(lambda r: server.respond(r, chat=True)), methods=["POST"]),
              Route("/v1/load_lora_adapter", _handled(server.load), methods=["POST"]),
              Route("/v1/unload_lora_adapter", _handled(server.unload), methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)
