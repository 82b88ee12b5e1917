"""numba_cpu with its one thread pool on and off: the peers benchmark's decoder training step, in one process.

    python -m benchmarks.pool --threads 2       # results/pool_t2.json
    python -m benchmarks.pool --quick           # tiny shapes (CI)

On: every product is GEMM tasks on Numba's pool and the loops run on it (``kernels/numba_cpu/pool.py``).
Off (``config.NUMBA_PARALLEL = False``): NumPy's BLAS threads for the products, serial loops, as
before the pool. Serial loops (``config.NUMBA_POOL_LOOPS = False``): the products on the pool, the
loops on the calling thread (what pool.jit's parallel compilations add is pool_on against it). The
three are timed interleaved, each sample after ``settle_s`` of untimed steps of the same side (the
sides use different thread pools; see ``harness.interleaved``); ``ratio`` is t / t(pool_off) per
round, the median. Then each side runs ``breakdown_steps`` steps with every kernel API
call of the numba backend timed: milliseconds per step per function.
"""
from __future__ import annotations

import collections
import functools
import os
import time

import numpy as np

from . import harness
from .peers import FULL as PEERS_FULL, QUICK as PEERS_QUICK, lowrank_step, randomize_lora_B

FULL = dict(decoder=PEERS_FULL["decoder"], rounds=10, target_s=0.05, settle_s=0.3, breakdown_steps=10)
QUICK = dict(decoder=PEERS_QUICK["decoder"], rounds=3, target_s=0.002, settle_s=0.001, breakdown_steps=2)


def decoder_step(layers, d, heads, I, V, B, T, r, seed=0):
    """One LoRA (q, v) training step of the peers decoder as a closure."""
    import lowrank as lr
    cfg = lr.LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=I, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(T, 128),
                         tie_word_embeddings=False)
    model = lr.get_lora_model(lr.LlamaForCausalLM(cfg, seed=seed),
                              lr.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model, seed)
    model.train()
    ids = np.random.default_rng(seed).integers(0, V, (B, T))
    return lowrank_step(model, lr.Adam(model.parameters(), lr=1e-3), lr.CausalLMLoss(), ids, ids)


def with_config(step, **values):
    """``step`` with the given ``kernels.config`` values set before each call."""
    from lowrank.kernels import config

    def run():
        for name, value in values.items():
            setattr(config, name, value)
        return step()
    return run


def breakdown(step, steps: int) -> dict:
    """{API function: ms per step} over ``steps`` steps, every numba_cpu kernel call timed."""
    from lowrank.kernels import api, backends
    from lowrank.kernels import numba_cpu
    spent = collections.defaultdict(float)
    originals = {name: getattr(numba_cpu, name) for name in api.API}

    def timed(name, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t
        return call
    try:
        for name, fn in originals.items():
            setattr(numba_cpu, name, timed(name, fn))
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        total = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(numba_cpu, name, fn)
    rows = {name: 1e3 * t / steps for name, t in sorted(spent.items(), key=lambda kv: -kv[1])}
    return {"step_ms": 1e3 * total / steps, "outside_kernels_ms": 1e3 * (total - sum(spent.values())) / steps, **rows}


def run(c):
    from lowrank.kernels import config
    old = config.NUMBA_PARALLEL, config.NUMBA_POOL_LOOPS
    try:
        step = decoder_step(**c["decoder"])
        variants = {"pool_off": with_config(step, NUMBA_PARALLEL=False, NUMBA_POOL_LOOPS=True),
                    "pool_on": with_config(step, NUMBA_PARALLEL=True, NUMBA_POOL_LOOPS=True),
                    "serial_loops": with_config(step, NUMBA_PARALLEL=True, NUMBA_POOL_LOOPS=False)}
        res = harness.interleaved(variants, c["rounds"], "pool_off", c["target_s"], c["settle_s"])
        for name, m in res.items():
            print(f"decoder step  {name:9s} {1e3 * m['median_s']:8.2f} ms  x{m['ratio']:.3f} of pool_off")
        parts = {}
        for name, fn in variants.items():
            harness.settle(fn, c["settle_s"])
            parts[name] = breakdown(fn, c["breakdown_steps"])
        print(f"{'ms per step':28s} {'off':>8s} {'on':>8s} {'serial loops':>12s}")
        for key in parts["pool_off"]:
            print(f"{key:28s} {parts['pool_off'][key]:8.2f} {parts['pool_on'].get(key, 0.0):8.2f}"
                  f" {parts['serial_loops'].get(key, 0.0):12.2f}")
    finally:
        config.NUMBA_PARALLEL, config.NUMBA_POOL_LOOPS = old
    return {"timing": res, "breakdown": parts}


def main(argv=None):
    a = harness.parse_args(argv, __doc__, "pool")
    if a.out == os.path.join(harness.RESULTS, "pool.json"):
        a.out = os.path.join(harness.RESULTS, f"pool_t{a.threads}.json")
    cfg = QUICK if a.quick else FULL
    mach, rows = harness.run_pinned(a, run, cfg)
    harness.write_json(a.out, {"benchmark": "pool", "command": "python -m benchmarks.pool", "argv": argv,
                               "config": cfg, "machine": mach, **rows})
    print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
