"""Serving many LoRA adapters from one base: decode throughput of a mixed batch (Punica, S-LoRA).

    python -m benchmarks.serving                   # results/serving.json + serving.png (a few minutes on 2 cores)
    python -m benchmarks.serving --targets all-linear
    python -m benchmarks.serving --quick           # a tiny model, seconds (CI): results/serving_quick.json

A batch of B = 16 prompts (P = 32 tokens each) generates N = 32 new tokens greedily
(``generate``: one prefill, then N − 1 decode steps of one token per sequence, a KV cache).
The 16 rows are spread evenly over K = 1, 2, 4, 8, 16 adapters (LoRA r = 8 on q/v, or all linear),
on the LM demo's model size (4 layers, d = 256, 8 heads, I = 512, V = 259; random weights):

    single     all 16 rows on one adapter, the single-adapter (fused) kernel: the target's reference
    mixed_K    one batch, row b on adapter b mod K: base products shared, BGMV for the rank-r part
    loop_K     one batch per adapter, K batches of 16/K rows run one after the other (what a server
               without multi-adapter kernels does; loop_16 is 16 batches of one row)
    merged     one adapter folded into W (``merge_and_unload``): the base model's cost, no LoRA work
    base       the base model alone, no adapter (for scale)

Decode throughput = B · (N − 1) / (seconds in the decode forwards); end-to-end = B · N / (prefill +
decode). The variants run interleaved, order rotated each round (harness's rule); ratios are the
median over rounds of t(single) / t(variant) from the same round, with their min..max. Seconds are
taken twice: wall-clock, and this process's CPU time (``time.process_time``; threads are pinned,
default 1), which the other jobs of a shared machine disturb much less. Targets:
mixed_16 >= 0.9x single's decode throughput and >= 3x loop_16's. Before timing, the mixed batch's
tokens are checked against the loop's (``tokens_match``: each row equal to its adapter run alone).
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np

from . import harness

FULL = dict(layers=4, d=256, heads=8, I=512, V=259, B=16, P=32, N=32, r=8, Ks=(1, 2, 4, 8, 16), rounds=9,
            dtype="float32")
QUICK = dict(layers=2, d=32, heads=4, I=64, V=259, B=4, P=6, N=5, r=2, Ks=(1, 2, 4), rounds=2, dtype="float64")
TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}


def build(cfg, targets):
    """(LoraModel with adapters a0 .. a{K_max−1}, a plain model with a0 merged, prompts (B, P))."""
    import lowrank as lr
    from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=cfg["V"], hidden_size=cfg["d"], intermediate_size=cfg["I"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         max_position_embeddings=cfg["P"] + cfg["N"])
    lora_config = lr.LoraConfig(r=cfg["r"], lora_alpha=2 * cfg["r"], target_modules=TARGETS[targets])
    models = []
    for _ in range(2):                                          # the same weights twice: served, merged
        base = LlamaForCausalLM(config, dtype=cfg["dtype"], seed=0)
        model = lr.get_lora_model(base, lora_config, adapter_name="a0")
        for k in range(1, max(cfg["Ks"])):
            model.add_adapter(f"a{k}", lora_config)
        rng = np.random.default_rng(1)                          # B random (not 0): the adapters change the tokens
        for _, layer in model.lora_layers():
            for n in layer.lora_B:
                layer.lora_B[n].data = rng.normal(0, 0.05, layer.lora_B[n].shape).astype(cfg["dtype"])
        model.set_adapter("a0")
        model.eval()
        models.append(model)
    prompts = np.random.default_rng(2).integers(0, cfg["V"], (cfg["B"], cfg["P"]))
    return models[0], models[1].merge_and_unload(["a0"]), prompts


class Timed:
    """A forward that adds its seconds, wall-clock and CPU, to ``prefill`` (its first call) or ``decode``."""

    def __init__(self, forward):
        self.forward, self.prefill, self.decode, self.calls = forward, np.zeros(2), np.zeros(2), 0

    def __call__(self, *args, **kwargs):
        t0 = np.array([time.perf_counter(), time.process_time()])
        out = self.forward(*args, **kwargs)
        dt = np.array([time.perf_counter(), time.process_time()]) - t0
        if self.calls == 0:
            self.prefill += dt
        else:
            self.decode += dt
        self.calls += 1
        return out


def run_generate(model, prompts, N, **kwargs):
    """(ids, prefill s, decode s) of one greedy ``model.generate`` (a LoraModel's or a decoder's), its
    decoder's forwards timed; seconds as (wall, CPU)."""
    decoder = model.model if hasattr(model, "peft_config") else model          # LoraModel -> its decoder
    timed = Timed(decoder.forward)
    ids = model.generate(prompts, max_new_tokens=N, forward=timed, **kwargs)
    return ids, timed.prefill, timed.decode


def variants(lora, merged, prompts, cfg):
    """{name: fn() -> (ids (B, P + N), prefill s, decode s)}."""
    B, N = cfg["B"], cfg["N"]

    def single():
        lora.set_adapter("a0")
        return run_generate(lora, prompts, N)

    def mixed(K):
        return run_generate(lora, prompts, N, adapter_names=[f"a{b % K}" for b in range(B)])

    def loop(K):
        ids, pre, dec = np.zeros((B, prompts.shape[1] + N), np.int64), np.zeros(2), np.zeros(2)
        for k in range(K):
            rows = np.arange(k, B, K)                           # the rows of adapter a{k}, as in mixed(K)
            lora.set_adapter(f"a{k}")
            ids[rows], p, d = run_generate(lora, prompts[rows], N)
            pre, dec = pre + p, dec + d
        lora.set_adapter("a0")
        return ids, pre, dec

    def bare():
        with lora.disable_adapter():
            return run_generate(lora, prompts, N)

    out = {"single": single, "merged": lambda: run_generate(merged, prompts, N), "base": bare}
    for K in cfg["Ks"]:
        out[f"mixed_{K}"] = functools.partial(mixed, K)
        out[f"loop_{K}"] = functools.partial(loop, K)
    return out


def check_tokens(fns, cfg):
    """{K: mixed_K's ids == loop_K's ids}, and merged == single (one adapter, two ways)."""
    checks = {f"mixed_{K}_equals_loop_{K}": bool(np.array_equal(fns[f"mixed_{K}"]()[0], fns[f"loop_{K}"]()[0]))
              for K in cfg["Ks"]}
    checks["merged_equals_single"] = bool(np.array_equal(fns["merged"]()[0], fns["single"]()[0]))
    return checks


def measure(fns, rounds):
    """{name: [(prefill, decode wall s, prefill, decode CPU s)] per round}, interleaved, the order rotated."""
    names = list(fns)
    for n in names:
        fns[n]()                                                # warm-up (Numba compiles, caches fill)
    samples = {n: [] for n in names}
    for k in range(rounds):
        for n in names[k % len(names):] + names[:k % len(names)]:
            _, pre, dec = fns[n]()
            samples[n].append((pre[0], dec[0], pre[1], dec[1]))
    return samples


def summarize(samples, cfg):
    """One row per variant: medians, tokens/s and throughput ratios to single (median, min, max over
    rounds), from wall-clock seconds and from CPU seconds (what a busy shared machine disturbs less)."""
    B, N = cfg["B"], cfg["N"]
    ref = np.array(samples["single"])
    rows = []
    for name, s in samples.items():
        s = np.array(s)                                         # (rounds, 4): prefill, decode (wall), (CPU)
        wall, cpu = ref[:, 1] / s[:, 1], ref[:, 3] / s[:, 3]    # decode throughput relative to single, per round
        kind, _, K = name.partition("_")
        rows.append({"variant": name, "kind": kind, "adapters": int(K) if K else 1,
                     "prefill_ms": 1e3 * float(np.median(s[:, 0])), "decode_ms": 1e3 * float(np.median(s[:, 1])),
                     "decode_tok_s": B * (N - 1) / float(np.median(s[:, 1])),
                     "decode_tok_s_cpu": B * (N - 1) / float(np.median(s[:, 3])),
                     "e2e_tok_s": B * N / float(np.median(s[:, :2].sum(1))),
                     "decode_vs_single": float(np.median(wall)), "decode_vs_single_range": [float(wall.min()),
                                                                                            float(wall.max())],
                     "decode_vs_single_cpu": float(np.median(cpu)), "decode_vs_single_cpu_range": [float(cpu.min()),
                                                                                                    float(cpu.max())],
                     "rounds": len(s)})
    return rows


def targets_met(rows, samples):
    """mixed_K (K the most adapters) against single and against loop_K, per round, wall and CPU."""
    by = {r["variant"]: r for r in rows}
    K = max(r["adapters"] for r in rows if r["kind"] == "mixed")
    mixed, loop = np.array(samples[f"mixed_{K}"]), np.array(samples[f"loop_{K}"])
    out = {"adapters": K}
    for clock, col in (("wall", 1), ("cpu", 3)):
        vs_loop = float(np.median(loop[:, col] / mixed[:, col]))
        vs_single = by[f"mixed_{K}"]["decode_vs_single" + ("_cpu" if clock == "cpu" else "")]
        out[clock] = {"mixed_vs_single": vs_single, "mixed_vs_loop": vs_loop,
                      "mixed_vs_single_ok": vs_single >= 0.9, "mixed_vs_loop_ok": vs_loop >= 3.0}
    return out


def plot(path, rows, cfg, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by = {r["variant"]: r for r in rows}
    Ks = list(cfg["Ks"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for kind, style in (("mixed", "o-"), ("loop", "s--")):
        ax.plot(Ks, [by[f"{kind}_{K}"]["decode_tok_s"] for K in Ks], style,
                label={"mixed": "one mixed batch (BGMV)", "loop": "one batch per adapter"}[kind])
    for name, style in (("single", "k-"), ("merged", "g:"), ("base", "c-.")):
        ax.axhline(by[name]["decode_tok_s"], ls=style[1:], color=style[0], lw=1, label=f"{name} (1 adapter)"
                   if name != "base" else "base model, no adapter")
    ax.set_xscale("log", base=2)
    ax.set_xticks(Ks)
    ax.set_xticklabels([str(K) for K in Ks])
    ax.set_xlabel(f"adapters among the {cfg['B']} sequences of the batch")
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny model: finishes in seconds (CI)")
    p.add_argument("--threads", type=int, default=1, help="BLAS and Numba threads (default 1)")
    p.add_argument("--targets", choices=sorted(TARGETS), default="qv", help="LoRA on q/v (default) or all linear")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 2)")
    p.add_argument("--out", default=None, help="JSON path (default results/serving[_all-linear][_quick].json)")
    a = p.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    cfg["rounds"] = a.rounds or cfg["rounds"]
    stem = "serving" + ("" if a.targets == "qv" else f"_{a.targets}") + ("_quick" if a.quick else "")
    out = a.out or os.path.join(harness.RESULTS, f"{stem}.json")
    with harness.pinned_threads(a.threads) as info:
        lora, merged, prompts = build(cfg, a.targets)
        fns = variants(lora, merged, prompts, cfg)
        checks = check_tokens(fns, cfg)
        samples = measure(fns, cfg["rounds"])
        mach = harness.machine(a.threads, info, cfg["dtype"], quick=True)
    rows = summarize(samples, cfg)
    met = targets_met(rows, samples)
    title = (f"{cfg['layers']} layers, d={cfg['d']}, B={cfg['B']}, prompt {cfg['P']}, {cfg['N']} new tokens, "
             f"r={cfg['r']} on {a.targets}, {a.threads} thread(s), {cfg['dtype']}")
    print(title)
    print(f"{'variant':<10} {'decode tok/s':>12} {'vs single (min..max)':>22} {'CPU: tok/s':>10} "
          f"{'vs single (min..max)':>22} {'e2e tok/s':>9} {'prefill ms':>10}")
    for r in rows:
        (lo, hi), (clo, chi) = r["decode_vs_single_range"], r["decode_vs_single_cpu_range"]
        print(f"{r['variant']:<10} {r['decode_tok_s']:>12.0f} {r['decode_vs_single']:>7.2f}x ({lo:.2f}..{hi:.2f}) "
              f"{r['decode_tok_s_cpu']:>10.0f} {r['decode_vs_single_cpu']:>7.2f}x ({clo:.2f}..{chi:.2f}) "
              f"{r['e2e_tok_s']:>9.0f} {r['prefill_ms']:>10.1f}")
    K = met["adapters"]
    for clock in ("wall", "cpu"):
        m = met[clock]
        print(f"targets ({clock} clock): mixed_{K} = {m['mixed_vs_single']:.2f}x single (>= 0.9: "
              f"{m['mixed_vs_single_ok']}), {m['mixed_vs_loop']:.1f}x loop_{K} (>= 3: {m['mixed_vs_loop_ok']})")
    print(f"tokens: {checks}")
    harness.write_json(out, {"benchmark": "serving", "config": {**cfg, "targets": a.targets}, "machine": mach,
                             "checks": checks, "targets": met, "rows": rows, "samples_s": samples})
    plot(out.removesuffix(".json") + ".png", rows, cfg, title)
    print(f"wrote {out} and {out.removesuffix('.json')}.png")
    return rows


if __name__ == "__main__":
    main()
