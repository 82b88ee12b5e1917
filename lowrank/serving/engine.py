"""Continuous batching of mixed adapters: one decode loop, in one thread, serves every request.

Each turn of the loop (``Engine.step``):

1. Commands (load / unload an adapter) run between steps, so no running row sees its adapter change.
2. Waiting requests join while a slot is free and their adapter is stacked (or can be: the least
   recently used adapter no row needs is evicted and reloaded from its files when next asked for).
   The step's joining prompts are prefilled together (``slots.prefill``: right-padded, batches of similar
   lengths, each prompt one SGMV segment of its adapter) and copied into their slots (``slots.SlotCache``);
   requests that arrive during those prefills join the same step the same way, and each first token
   goes out once the step's joins are done (so the wait for the prefills counts in its time to first
   token, not between its first and second tokens). With ``max_prefill_tokens`` set, one prompt joins
   per step at least and more while the step's prompt tokens stay within it, which bounds how long
   running rows wait for joining prompts (and makes the rest wait longer for their first token); by
   default every waiting prompt that fits joins.
3. One decode step feeds every running row its last token at its own position (``slots.decode_step``),
   each row through its own adapter (BGMV), and picks the next token per row with ``generation.pick``
   and the request's own random generator.
4. A row leaves when it stops (a stop token, ``max_tokens``) or was cancelled (its client went away,
   or the server found a stop string); the last running row moves into its slot.

A greedy row therefore gets the tokens ``generate`` gives it alone (same positions, keys and mask;
only the batching of the products differs), and a seeded sampled row draws from its own
``numpy.random.default_rng(seed)`` as ``generate`` does for one prompt.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..models.llama.generation import pick
from ..tuners.lora.mixed import BASE, mixed_batch, mixed_plan
from ..tuners.lora.model import LoraModel
from .slots import SlotCache, decode_step, prefill


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


class AdapterBusy(Exception):
    """An adapter that running or waiting requests use can't be unloaded."""


@dataclass
class Request:
    """One generation: prompt ids, its adapter (BASE for none), and how to pick tokens.

    ``emit(kind, value)`` is called from the engine's thread: ("token", id) per new token, then
    ("done", finish_reason) once ("stop", "length" or "cancelled"), or ("missing", message) when its
    adapter was unloaded before it joined, or ("error", message).
    """
    prompt: list
    adapter: str
    max_tokens: int
    emit: object
    temperature: float = 0.0                       # 0: greedy
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple = ()
    tokens: list = field(default_factory=list)
    cancelled: bool = False                        # set from any thread; the row leaves at the next step
    rng: object = None

    def cancel(self):
        self.cancelled = True


class Engine:
    """The loop over ``model`` (a LlamaForCausalLM) with adapters ``adapters`` {name: folder}.

    ``max_batch`` rows run at once; ``max_queue`` requests wait at most; ``max_adapters`` adapters stay
    loaded (None: all); ``max_length`` positions per row (prompt + new tokens); ``max_prefill_tokens``
    prompt tokens prefilled per step at most, one prompt always joining (None: no bound);
    ``threads``: the loop's Numba and BLAS threads (None: as configured; on a shared machine 1 avoids
    oversubscribed thread pools).
    """

    def __init__(self, model, adapters: dict | None = None, *, max_batch: int = 32, max_queue: int = 256,
                 max_adapters: int | None = None, max_length: int | None = None,
                 max_prefill_tokens: int | None = None, threads: int | None = None):
        context = model.config.max_position_embeddings
        self.max_length = min(context, max_length or context)
        if max_batch < 1 or max_queue < 0 or (max_adapters is not None and max_adapters < 1) or \
                (max_prefill_tokens is not None and max_prefill_tokens < 1):
            raise ValueError(f"Engine: max_batch >= 1, max_queue >= 0, max_adapters >= 1 and max_prefill_tokens "
                             f">= 1 expected, got {max_batch}, {max_queue}, {max_adapters}, {max_prefill_tokens}")
        self.model, self.lora = model, None
        self.max_batch, self.max_queue, self.max_adapters = max_batch, max_queue, max_adapters
        self.max_prefill_tokens = max_prefill_tokens
        self.paths: dict[str, str] = {}                         # every registered adapter -> its folder
        self.loaded: collections.OrderedDict = collections.OrderedDict()   # stacked adapters, least recent first
        self.cache = SlotCache(model.config, max_batch, self.max_length, model.dtype)
        self.rows: list[Request] = []                           # row b in slot b
        self.waiting: collections.deque = collections.deque()
        self.commands: collections.deque = collections.deque()
        self.wake = threading.Condition()
        self.generated = collections.deque(maxlen=4096)         # (time, tokens) of recent steps, for tokens/s
        self.tokens_total = 0
        self._stacks_for = None
        self._thread, self._running, self.threads = None, False, threads
        for name, path in (adapters or {}).items():
            self.paths[name] = str(path)
            if max_adapters is None or len(self.loaded) < max_adapters:
                self._load(name)

    # -- from other threads -------------------------------------------------------------------
    def submit(self, request: Request):
        """Queue ``request``; QueueFull when ``max_queue`` wait already."""
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            request.rng = np.random.default_rng(request.seed)
            self.waiting.append(request)
            self.wake.notify()

    def call(self, fn, *args) -> Future:
        """Run ``fn(*args)`` in the loop's thread between steps; its Future."""
        future = Future()
        with self.wake:
            self.commands.append((future, fn, args))
            self.wake.notify()
        if self._thread is None:                 # no loop running (a test driving ``step`` by hand)
            self._run_commands()
        return future

    def register(self, name: str, path: str):
        """Load adapter ``name`` from ``path`` now (it may evict another) and serve it; ValueError if it can't load."""
        if name == BASE or name in self.paths:
            raise ValueError(f"adapter {name!r} is already served; unload it first")
        self.paths[name] = str(path)
        try:
            self._load(name)
        except Exception:
            del self.paths[name]
            raise
        self._evict(self.max_adapters)         # back to the bound: the least recently used idle adapter goes

    def unregister(self, name: str):
        """Stop serving ``name``: KeyError if unknown, AdapterBusy while a request uses it."""
        if name not in self.paths:
            raise KeyError(name)
        users = sum(r.adapter == name for r in list(self.rows) + list(self.waiting))
        if users:
            raise AdapterBusy(f"adapter {name!r} is in use by {users} requests; retry when they finish")
        if name in self.loaded:
            self.lora.delete_adapter(name)
            del self.loaded[name]
            self._stacks_for = None
        del self.paths[name]

    def start(self):
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="lowrank-engine", daemon=True)
        self._thread.start()

    def stop(self):
        with self.wake:
            self._running = False
            self.wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [n for t, n in list(self.generated) if now - t <= window]
        return sum(recent) / window

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self):
        if self.threads is None:
            return self._serve()
        from ..kernels.numba_cpu import pool
        with pool.limit(self.threads):                 # Numba's thread count is per calling thread: set it here
            self._serve()

    def _serve(self):
        while True:
            with self.wake:
                while self._running and not (self.rows or self.waiting or self.commands):
                    self.wake.wait()
                if not self._running:
                    break
            try:
                self.step()
            except Exception as e:                 # a defect: fail the running rows, keep serving
                for r in self.rows + list(self.waiting):
                    r.emit("error", f"{type(e).__name__}: {e}")
                self.rows.clear()
                self.waiting.clear()
                self.cache.lengths[:] = 0
        for r in self.rows + list(self.waiting):
            r.emit("done", "cancelled")

    def step(self):
        """Commands, joins (prefill), one decode step, leaves."""
        self._run_commands()
        self._join()
        if self.rows:
            names = [r.adapter for r in self.rows]
            with self._adapters(names):
                logits = decode_step(self.model, self.cache, [r.tokens[-1] for r in self.rows])   # (B, V)
            for b, r in enumerate(self.rows):
                self._take(r, logits[b:b + 1])
            self.generated.append((time.monotonic(), len(self.rows)))
        self._leave()

    def _run_commands(self):
        while self.commands:
            future, fn, args = self.commands.popleft()
            try:
                future.set_result(fn(*args))
            except Exception as e:
                future.set_exception(e)

    def _join(self):
        """Waiting requests join and are prefilled, again while more arrive during those prefills; then the
        first tokens go out."""
        joined, logits = [], {}
        while new := self._admit(sum(len(r.prompt) for r, _ in joined)):
            logits.update(self._prefill(new))
            joined += new
        for r, slot in joined:
            self._take(r, logits[slot])

    def _admit(self, prefilled: int) -> list:
        """Waiting requests that can join now, each made a row, as (request, slot); ``prefilled`` prompt tokens
        of this step so far count against ``max_prefill_tokens``."""
        budget = self.max_prefill_tokens or float("inf")
        new, skipped = [], []
        while self.waiting and len(self.rows) < self.max_batch:
            if prefilled and prefilled + len(self.waiting[0].prompt) > budget:
                break                                 # the rest join at the next steps
            r = self.waiting.popleft()
            if r.cancelled:
                r.emit("done", "cancelled")
                continue
            if r.adapter != BASE and r.adapter not in self.paths:
                r.emit("missing", f"the model {r.adapter!r} was unloaded before the request started")
                continue
            if len(r.prompt) >= self.max_length or not r.prompt:
                r.emit("error", f"a prompt of {len(r.prompt)} tokens needs 1 to {self.max_length - 1}")
                continue
            try:
                stacked = self._ensure_loaded(r.adapter)
            except (ValueError, TypeError, KeyError, OSError) as e:     # its files changed or went away
                r.emit("error", f"adapter {r.adapter!r} can't be loaded: {e}")
                continue
            if not stacked:
                skipped.append(r)                     # every stacked adapter is in use: wait for a row to leave
                continue
            prefilled += len(r.prompt)
            new.append((r, len(self.rows)))           # its slot
            self.rows.append(r)                       # a row now, so no later eviction takes its adapter
        self.waiting.extendleft(reversed(skipped))
        return new

    def _prefill(self, joined) -> dict:
        """Joiners (request, slot) prefilled into their slots in batches of similar lengths (sorted; padding at
        most doubles a batch's tokens) -> {slot: logits (1, V)}."""
        batches, batch = [], []
        for r, slot in sorted(joined, key=lambda rs: len(rs[0].prompt)):
            n = len(r.prompt)                                      # the longest yet: sorted
            if batch and (len(batch) + 1) * n > 2 * (sum(len(b.prompt) for b, _ in batch) + n):
                batches.append(batch)
                batch = []
            batch.append((r, slot))
        logits = {}
        for batch in batches + [batch]:
            with self._adapters([r.adapter for r, _ in batch]):
                out = prefill(self.model, self.cache, [r.prompt for r, _ in batch], [s for _, s in batch])
            logits.update((s, out[j:j + 1]) for j, (_, s) in enumerate(batch))            # (1, V) each
        return logits

    def _take(self, r: Request, logits):
        """Pick row ``r``'s next token from its logits (1, V) and hand it out."""
        sample = r.temperature > 0
        token = int(pick(logits, sample, r.temperature if sample else 1.0, None, r.top_p, r.rng)[0])
        r.tokens.append(token)
        self.tokens_total += 1
        r.emit("token", token)

    def _leave(self):
        b = 0
        while b < len(self.rows):
            r = self.rows[b]
            reason = ("cancelled" if r.cancelled else "stop" if r.tokens[-1] in r.stop_ids
                      else "length" if len(r.tokens) >= r.max_tokens
                      or len(r.prompt) + len(r.tokens) >= self.max_length else None)
            if reason is None:
                b += 1
                continue
            r.emit("done", reason)
            last = len(self.rows) - 1
            if b != last:
                self.cache.move(last, b)
            self.rows[b] = self.rows[last]
            self.rows.pop()
            self.cache.lengths[last] = 0

    # -- adapters -----------------------------------------------------------------------------
    def _ensure_loaded(self, name: str) -> bool:
        """``name`` stacked (reloading it, evicting the least recently used idle one); False if none is idle."""
        if name == BASE:
            return True
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return True
        if self.max_adapters is not None and not self._evict(self.max_adapters - 1):
            return False
        self._load(name)
        return True

    def _evict(self, keep: int | None) -> bool:
        """Unstack least recently used adapters no running row uses until at most ``keep`` stay; False if they can't."""
        if keep is None:
            return True
        busy = {r.adapter for r in self.rows}
        idle = [n for n in self.loaded if n not in busy]          # least recent first
        while len(self.loaded) > keep and idle:
            name = idle.pop(0)
            self.lora.delete_adapter(name)
            del self.loaded[name]
            self._stacks_for = None
        return len(self.loaded) <= keep

    def _load(self, name: str):
        if self.lora is None:
            self.lora = LoraModel.from_pretrained(self.model, self.paths[name], adapter_name=name)
        else:
            self.lora.load_adapter(self.paths[name], name)
        self.lora.eval()
        self.loaded[name] = None
        self._stacks_for = None

    def _adapters(self, names):
        """The LoRA layers set for rows ``names``. Each layer stacks every loaded adapter once, after each load,
        unload or eviction; every batch (a prefill's one adapter, a decode step's mix) then reads those stacks."""
        if self.lora is None:
            return _nothing()
        key = frozenset(self.loaded)
        if self._stacks_for != key:
            for _, layer in self.lora.lora_layers():
                layer.stack_cache = {}
                mixed_plan(layer, tuple(self.loaded), False, self.model.dtype, np)     # the stacks of them all
            self._stacks_for = key
        return mixed_batch(self.lora, names, len(names))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
