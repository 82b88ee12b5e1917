"""Peers: lowrank against PyTorch + PEFT doing the same work on the same threads.

    python -m benchmarks.peers --threads 1     # writes results/peers_t1.json (a few minutes on 2 cores)
    python -m benchmarks.peers --threads 2     # results/peers_t2.json
    python -m benchmarks.peers --quick         # tiny sizes, seconds (CI)
    python -m benchmarks.peers --rows layer mlp

Rows (float32; both sides hold the same weights, copied from lowrank's model into torch's by name):
  layer    one LoRA layer, W (4096, 4096), r = 16, N = 1, 256, 2048:
           eval   forward only (torch under ``inference_mode``)
           train  forward + backward: dx, dA, dB (torch: base frozen, x.requires_grad, so it computes dx too)
  mlp      one Adam step of the demo's LoRA model (32 → 200 → 2000 → 200 → 1, r = 8 on the hidden
           layers, the head trained in full, batch 64): forward + BCE loss + backward + Adam step
  decoder  one training step of a Llama decoder (4 layers, d = 256, 8 heads, I = 688, V = 259,
           B = 8, T = 128), LoRA r = 8 on q_proj/v_proj: forward + causal-LM loss + backward +
           Adam on the LoRA parameters; torch: transformers' LlamaForCausalLM + peft.get_peft_model,
           with attn_implementation "sdpa" (the default users get) and "eager"
Each row is timed interleaved (harness.interleaved, the torch variant as the base), so ``ratio`` is
the median over rounds of t(lowrank) / t(torch) measured in the same round; each sample follows
0.3 s of untimed calls of the same variant (``settle_s``), so neither library's leftover threads
(OpenBLAS's spin for about 0.1 s after a GEMM) run inside the other's timing. ``--threads N`` pins
BLAS and Numba (harness.pinned_threads) and torch (``torch.set_num_threads``) to N. Before timing,
each row checks that both sides compute the same numbers (``checks``: max relative differences).
torch, transformers and peft are optional: without them the module says so and exits 0.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from . import harness

FULL = dict(layer=dict(D=4096, r=16, Ns=(1, 256, 2048)), mlp=dict(sizes=None, r=8, batch=None),
            decoder=dict(layers=4, d=256, heads=8, I=688, V=256 + 3, B=8, T=128, r=8),
            rounds={1: 15, 256: 9, 2048: 5, "mlp": 15, "decoder": 15}, target_s=0.05, settle_s=0.3)
QUICK = dict(layer=dict(D=64, r=4, Ns=(1, 16)), mlp=dict(sizes=(8, 32, 64, 32, 1), r=4, batch=16),
             decoder=dict(layers=2, d=32, heads=4, I=88, V=256 + 3, B=2, T=16, r=4),
             rounds={1: 3, 16: 3, "mlp": 3, "decoder": 3}, target_s=0.002, settle_s=0.001)
ROWS = ("layer", "mlp", "decoder")


def _torch_name(name):
    """lowrank's parameter name -> PEFT's: PeftModel wraps the model in ``base_model``, and its
    lora_A/lora_B are Linear layers, so their arrays end in ``.weight``."""
    lora = name.rsplit(".", 2)[-2] in ("lora_A", "lora_B")
    return "base_model." + name + (".weight" if lora else "")


def copy_into_torch(ours, theirs):
    """Every parameter of lowrank's ``ours`` into PEFT's ``theirs``, by name; the names must match one to one."""
    import torch
    params = dict(theirs.named_parameters())
    mine = {_torch_name(n): p for n, p in ours.named_parameters()}
    if sorted(mine) != sorted(params):
        raise ValueError(f"peers: parameter names differ: {sorted(set(mine) ^ set(params))[:6]}")
    with torch.no_grad():
        for n, p in mine.items():
            params[n].copy_(torch.from_numpy(np.ascontiguousarray(p.data)))


def randomize_lora_B(model, seed=0):
    """B = 0 at init would hide a wrong A or scaling: give every lora_B small random values."""
    rng = np.random.default_rng(seed)
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            p.data = (0.02 * rng.standard_normal(p.shape)).astype(p.dtype)


def rel_err(a, b):
    """max |a − b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def grads_err(ours, theirs):
    """The largest rel_err between the two sides' gradients of the trainable parameters, from one
    step taken from the same weights. (Not the weights after Adam's first step: that step is
    lr · g / (|g| + eps), which turns a 1e-7 difference in a tiny g into a difference of order lr.)"""
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    return max(rel_err(p.grad, grads[_torch_name(n)].numpy()) for n, p in ours.named_parameters() if p.trainable)


# -- row 1: one LoRA layer --------------------------------------------------------------------
def layer_pair(D, r, seed=0):
    """(lowrank LoraModel, PEFT model) of one bias-free D×D layer named "0" with LoRA r, alpha = 2r."""
    import peft
    import torch
    import lowrank as lr
    ours = lr.get_lora_model(lr.Sequential(lr.Dense(D, D, False, seed=seed)),
                             lr.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    randomize_lora_B(ours, seed)
    theirs = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(D, D, bias=False)),
                                 peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    copy_into_torch(ours, theirs)
    return ours, theirs


def layer_variants(ours, theirs, N, D, seed=0):
    """{eval: {lowrank, torch}, train: {lowrank, torch}} for N rows, and the outputs of one call each."""
    import torch
    rng = np.random.default_rng(seed + N)
    x = rng.standard_normal((N, D)).astype(np.float32)
    dy = (rng.standard_normal((N, D)) / np.sqrt(D)).astype(np.float32)
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    xg = xt.clone().requires_grad_(True)
    lora = [p for n, p in theirs.named_parameters() if p.requires_grad]

    def our_eval():
        return ours.eval().forward(x)

    def their_eval():
        with torch.inference_mode():
            return theirs.eval()(xt)

    def our_train():
        ours.train().zero_grad()
        ours.forward(x)
        return ours.backward(dy)                                   # dx; dA, dB land in .grad

    def their_train():
        theirs.train()
        xg.grad = None
        for p in lora:
            p.grad = None
        theirs(xg).backward(dyt)
        return xg.grad

    checks = {"eval_y": rel_err(our_eval(), their_eval().numpy()),
              "train_dx": rel_err(our_train(), their_train().numpy()),
              "train_dA_dB": grads_err(ours, theirs)}         # after the train calls above
    return {"eval": {"torch": their_eval, "lowrank": our_eval},
            "train": {"torch": their_train, "lowrank": our_train}}, checks


# -- row 2: one Adam step of the demo's MLP ----------------------------------------------------
def mlp_pair(sizes, r, lr_, seed=0):
    """The demo's LoRA model on both sides (targets: the hidden Dense layers; head in modules_to_save)."""
    import peft
    import torch
    import lowrank as lr
    names = [str(2 * i) for i in range(len(sizes) - 1)]
    cfg = dict(r=r, lora_alpha=2 * r, target_modules=names[:-1], modules_to_save=[names[-1]])
    ours = lr.get_lora_model(lr.MLP(sizes, seed=seed), lr.LoraConfig(**cfg))
    randomize_lora_B(ours, seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    theirs = peft.get_peft_model(torch.nn.Sequential(*layers), peft.LoraConfig(**cfg))
    copy_into_torch(ours, theirs)
    return ours, lr.Adam(ours.parameters(), lr=lr_), theirs, torch.optim.Adam(
        [p for p in theirs.parameters() if p.requires_grad], lr=lr_)


def lowrank_step(model, opt, loss_fn, X, y):
    """One lowrank training step as a closure: zero grads, forward, loss, backward, Adam."""
    def step():
        opt.zero_grad()
        loss = loss_fn.forward(model.forward(X), y)
        model.backward(loss_fn.backward())
        opt.step()
        return loss
    return step


def mlp_variants(sizes, r, batch, lr_=3e-3, seed=0):
    """{lowrank, torch} one-step closures on the same batch, and the check of one step from equal states."""
    import torch
    import lowrank as lr
    ours, opt, theirs, topt = mlp_pair(sizes, r, lr_, seed)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = (rng.random((batch, 1)) < 0.5).astype(np.float32)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    loss_fn, tloss_fn = lr.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss()
    ours.train()
    theirs.train()

    our_step = lowrank_step(ours, opt, loss_fn, X, y)

    def their_step():
        topt.zero_grad(set_to_none=True)
        loss = tloss_fn(theirs(Xt), yt)
        loss.backward()
        topt.step()
        return loss.item()

    checks = {"loss": rel_err(our_step(), their_step()), "grads": grads_err(ours, theirs)}
    return {"torch": their_step, "lowrank": our_step}, checks


# -- row 3: one training step of a Llama decoder -------------------------------------------------
def decoder_variants(layers, d, heads, I, V, B, T, r, lr_=1e-3, seed=0):
    """{torch_sdpa, torch_eager, lowrank} one-step closures and the check of the first step."""
    import peft
    import torch
    import transformers
    import lowrank as lr
    kw = dict(vocab_size=V, hidden_size=d, intermediate_size=I, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=heads, max_position_embeddings=max(T, 128), tie_word_embeddings=False)
    lcfg = dict(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
    ours = lr.get_lora_model(lr.LlamaForCausalLM(lr.LlamaConfig(**kw), seed=seed), lr.LoraConfig(**lcfg))
    randomize_lora_B(ours, seed)
    opt, loss_fn = lr.Adam(ours.parameters(), lr=lr_), lr.CausalLMLoss()
    ids = np.random.default_rng(seed).integers(0, V, (B, T))
    ids_t = torch.from_numpy(ids)
    ours.train()

    our_step = lowrank_step(ours, opt, loss_fn, ids, ids)

    def theirs_for(attn):
        torch.manual_seed(seed)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, attn_implementation=attn))
        pm = peft.get_peft_model(hf, peft.LoraConfig(**lcfg))
        copy_into_torch(ours, pm)
        pm.train()
        topt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr_)

        def step():
            topt.zero_grad(set_to_none=True)
            loss = pm(input_ids=ids_t, labels=ids_t).loss
            loss.backward()
            topt.step()
            return loss.item()
        return pm, step

    (sdpa, sdpa_step), (eager, eager_step) = theirs_for("sdpa"), theirs_for("eager")
    first = loss_fn.forward(ours.forward(ids), ids)                  # the same starting weights everywhere
    with torch.no_grad():
        checks = {f"loss_{a}": rel_err(first, m(input_ids=ids_t, labels=ids_t).loss.item())
                  for a, m in (("sdpa", sdpa), ("eager", eager))}
    our_step(), sdpa_step()
    checks["lora_grads_sdpa"] = grads_err(ours, sdpa)
    return {"torch_sdpa": sdpa_step, "torch_eager": eager_step, "lowrank": our_step}, checks


# -- running -------------------------------------------------------------------------------------
def run(cfg, rows=ROWS, log=print, check_threads=lambda: None):
    """Check, then time every selected row interleaved; returns (rows, checks).
    ``check_threads()`` is called after each timing, to record the threads torch really used."""
    out, checks = [], {}

    def record(row, res, base, **k):
        check_threads()
        for variant, m in res.items():
            out.append(dict(row=row, variant=variant, **k, median_ms=1e3 * m["median_s"], min_ms=1e3 * m["min_s"],
                            ratio_to_torch=m["ratio"], vs=base, rounds=m["rounds"], inner=m["inner"],
                            samples_ms=[1e3 * t for t in m["samples_s"]]))
            log(f"{row:8s} {k['mode']:10s} N={k.get('N', '-')!s:5s} {variant:12s} {out[-1]['median_ms']:10.3f} ms  "
                f"x{m['ratio']:6.3f} of {base}")

    if "layer" in rows:
        c = cfg["layer"]
        ours, theirs = layer_pair(c["D"], c["r"])
        for N in c["Ns"]:
            groups, checks[f"layer N={N}"] = layer_variants(ours, theirs, N, c["D"])
            log(f"checks layer N={N}: {checks[f'layer N={N}']}")
            for mode, variants in groups.items():
                res = harness.interleaved(variants, cfg["rounds"][N], "torch", cfg["target_s"], cfg["settle_s"])
                record("layer", res, "torch", mode=mode, N=N, D=c["D"], r=c["r"])
    if "mlp" in rows:
        from lowrank.app.experiment import DemoConfig
        demo, c = DemoConfig(), cfg["mlp"]
        sizes, batch = tuple(c["sizes"] or demo.sizes), c["batch"] or demo.batch_size
        variants, checks["mlp"] = mlp_variants(sizes, c["r"], batch, demo.peft_lr)
        log(f"checks mlp: {checks['mlp']}")
        res = harness.interleaved(variants, cfg["rounds"]["mlp"], "torch", cfg["target_s"], cfg["settle_s"])
        record("mlp", res, "torch", mode="adam_step", sizes=list(sizes), r=c["r"], batch=batch)
    if "decoder" in rows:
        c = cfg["decoder"]
        variants, checks["decoder"] = decoder_variants(**c)
        log(f"checks decoder: {checks['decoder']}")
        res = harness.interleaved(variants, cfg["rounds"]["decoder"], "torch_sdpa", cfg["target_s"],
                                   cfg["settle_s"])
        record("decoder", res, "torch_sdpa", mode="train_step", **c)
    return out, checks


def summary(rows):
    """One line per timed case: lowrank's ms, torch's ms, and lowrank / torch (per round, median)."""
    table = []
    for row in rows:
        if row["variant"] != "lowrank":
            continue
        key = {k: v for k, v in row.items() if k in ("row", "mode", "N")}
        peers = [p for p in rows if p["variant"].startswith("torch") and
                 all(p.get(k) == v for k, v in key.items())]
        for p in peers:                          # round by round: both timed in the same round
            per_round = np.array(row["samples_ms"]) / np.array(p["samples_ms"])
            table.append(dict(**key, torch=p["variant"], lowrank_ms=row["median_ms"], torch_ms=p["median_ms"],
                              ratio=float(np.median(per_round)), ratio_min=float(per_round.min()),
                              ratio_max=float(per_round.max())))
    return table


def main(argv=None):
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"benchmarks.peers needs torch, transformers and peft (pip install torch transformers peft): {e}")
        return None
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: finishes in seconds (CI)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch, BLAS and Numba threads")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows to run")
    p.add_argument("--out", default=None, help="JSON path (default results/peers_t{N}[_quick].json)")
    a = p.parse_args(argv)
    a.out = a.out or os.path.join(harness.RESULTS, f"peers_t{a.threads}{'_quick' if a.quick else ''}.json")
    cfg, t0 = (QUICK if a.quick else FULL), time.time()
    torch_threads, seen = torch.get_num_threads(), set()

    def pinned_run(c):
        # harness pins torch's OpenMP pool through threadpoolctl (after Numba, whose start used to reset it);
        # torch's own setting is pinned here as well, and what torch really used is recorded (check_threads).
        torch.set_num_threads(a.threads)
        return run(c, a.rows, check_threads=lambda: seen.add(torch.get_num_threads()))
    try:
        mach, (rows, checks) = harness.run_pinned(a, pinned_run, cfg)
        mach.update(torch_threads=sorted(seen), torch=torch.__version__,
                    transformers=transformers.__version__, peft=peft.__version__)
    finally:
        torch.set_num_threads(torch_threads)
    table = summary(rows)
    for t in table:
        print(f"{t['row']:8s} {t['mode']:10s} N={t.get('N', '-')!s:5s} lowrank {t['lowrank_ms']:10.3f} ms  "
              f"{t['torch']:11s} {t['torch_ms']:10.3f} ms  lowrank/torch {t['ratio']:.3f} "
              f"(rounds {t['ratio_min']:.2f}..{t['ratio_max']:.2f})")
    payload = dict(command="python -m benchmarks.peers" + (" --quick" if a.quick else ""), argv=sys.argv[1:] if argv is None else list(argv),
                   machine=mach, config=cfg, rows=rows, summary=table, checks=checks,
                   wall_s=time.time() - t0)
    harness.write_json(a.out, payload)
    print(f"wrote {a.out} in {time.time() - t0:.1f} s")
    return payload


if __name__ == "__main__":
    main()
