"""A real model's size: lowrank against transformers + PEFT on a decoder shaped like a 135M checkpoint.

    python -m benchmarks.real_model --threads 1     # writes results/real_model_t1.json (long: a step takes seconds)
    python -m benchmarks.real_model --threads 2     # results/real_model_t2.json
    python -m benchmarks.real_model --quick         # tiny sizes, seconds (CI)

The decoder (random weights, float32, both sides the same numbers, copied by name as in ``peers``): 30 layers,
d = 576, 9 query heads over 3 key/value heads, I = 1536, V = 49,152, tied head. Rows:
  step     one Adam step of LoRA r = 8 on q_proj/v_proj, B = 4, T = 256: lowrank's forward with ``labels``
           (no (B·T, V) logits) + backward + Adam; torch: transformers' LlamaForCausalLM (sdpa) + PEFT, ``labels=``.
           Timed interleaved (harness.interleaved, torch the base, ``settle_s``); the FLOP floor is the step's
           matrix products (``step_flops``) at the GEMM peak measured in the same run (harness.blas_peak_gflops).
  memory   the peak resident memory of one step (the second; VmHWM reset before it through /proc/self/clear_refs),
           each side in its own subprocess (one that imports only its side), with and without gradient
           checkpointing; the child's peak before that step (building the model included) is recorded too.
           (Not ru_maxrss: Linux carries the parent's high-water mark into a forked child.)
  decode   greedy generation, prompt 32, 64 new tokens, batch 1 and 8, both sides without adapters, EOS off:
           tokens/s, and the bandwidth floors of a decode step: the weights' bytes read once per step at the
           copy bandwidth measured in the same run on the same threads (harness.copy_bandwidth_gbs, read + write
           bytes), and at the read bandwidth (harness.read_bandwidth_gbs: what a stream that only reads gets).
  load     the model saved by lowrank (checksums in the file) and by transformers, each load in a fresh process:
           reading model.safetensors' bytes, lowrank's from_pretrained of either folder, transformers' of its own;
           the median time over reading the file, and the resident memory a load adds over the parameters' bytes.
``--threads N`` pins Numba, every BLAS (harness.pinned_threads) and torch (``torch.set_num_threads``) to N, in
the memory children too. Before timing, the step and decode rows check that both sides compute the same numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import harness
from .peers import copy_into_torch, grads_err, randomize_lora_B, rel_err

FULL = dict(model=dict(layers=30, d=576, heads=9, kv_heads=3, I=1536, V=49152), step=dict(B=4, T=256, r=8),
            decode=dict(prompt=32, new=64, batches=(1, 8)), rounds=3, settle_s=0.3, target_s=0.05,
            memory=("lowrank", "lowrank_checkpointing", "torch", "torch_checkpointing"))
QUICK = dict(model=dict(layers=2, d=32, heads=4, kv_heads=2, I=64, V=512), step=dict(B=2, T=16, r=4),
             decode=dict(prompt=4, new=4, batches=(1, 2)), rounds=2, settle_s=0.001, target_s=0.002,
             memory=("lowrank_checkpointing", "torch"))
MEMORY_VARIANTS = FULL["memory"]
LOAD_VARIANTS = ("read", "lowrank", "lowrank_transformers_file", "torch")   # the load row's children


def config_kwargs(m, T=256):
    return dict(vocab_size=m["V"], hidden_size=m["d"], intermediate_size=m["I"], num_hidden_layers=m["layers"],
                num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"], tie_word_embeddings=True,
                max_position_embeddings=max(T, 512))


def build_ours(m, r, T, lora=True, seed=0):
    """lowrank's decoder, with LoRA r on q_proj/v_proj (lora_B random) when ``lora``."""
    import lowrank as lr
    ours = lr.LlamaForCausalLM(lr.LlamaConfig(**config_kwargs(m, T)), seed=seed)
    if lora:
        ours = lr.get_lora_model(ours, lr.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
        randomize_lora_B(ours, seed)
    return ours


def build_theirs(m, r, T, lora=True, seed=0):
    """transformers' decoder (sdpa attention, EOS off), under PEFT's LoRA when ``lora``."""
    import peft
    import torch
    import transformers
    torch.manual_seed(seed)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_kwargs(m, T), attn_implementation="sdpa",
                                                                    eos_token_id=None, bos_token_id=None,
                                                                    pad_token_id=None))
    if lora:
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    return theirs


def build(m, r, T, lora=True, seed=0):
    """(lowrank model, PEFT or transformers model) holding the same weights (lowrank's, copied by name)."""
    import torch
    ours, theirs = build_ours(m, r, T, lora, seed), build_theirs(m, r, T, lora, seed)
    if lora:
        copy_into_torch(ours, theirs)
    else:
        with torch.no_grad():
            params = dict(theirs.named_parameters())
            for n, p in ours.named_parameters():
                params[n].copy_(torch.from_numpy(p.data))
    return ours, theirs


def our_step_closure(ours, ids, lr_=1e-3):
    """One lowrank Adam step on ``ids`` (B, T) as its own labels: the fused head + loss, no logits."""
    import lowrank as lr
    opt = lr.Adam(ours.parameters(trainable_only=True), lr=lr_)
    ours.train()

    def step():
        opt.zero_grad()
        loss = ours.forward(ids, labels=ids)
        ours.backward()
        opt.step()
        return loss
    return step


def their_step_closure(theirs, ids, lr_=1e-3):
    """One transformers + PEFT Adam step on the same ids and labels."""
    import torch
    topt = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=lr_)
    ids_t = torch.from_numpy(ids)
    theirs.train()

    def step():
        topt.zero_grad(set_to_none=True)
        loss = theirs(input_ids=ids_t, labels=ids_t).loss
        loss.backward()
        topt.step()
        return loss.item()
    return step


def step_flops(m, B, T, r) -> float:
    """The step's matrix products: forward, dx of every layer (the frozen tied head's too), LoRA's dA and dB;
    attention's QKᵀ and PV over the full T×T (as both sides compute them), four such products in backward."""
    N, d, h = B * T, m["d"], m["d"] // m["heads"]
    q, kv = m["heads"] * h, m["kv_heads"] * h
    linear = d * q + 2 * d * kv + q * d + 3 * d * m["I"]               # weights of one layer's products
    attention = 2 * B * m["heads"] * T * T * h                         # one of QKᵀ, PV
    lora = 2 * N * r * (d + q) + 2 * N * r * (d + kv)                  # x Aᵀ then h Bᵀ, for q and v
    forward = m["layers"] * (2 * N * linear + 2 * attention + lora) + 2 * N * m["V"] * d
    backward = m["layers"] * (2 * N * linear + 4 * attention + 2 * lora) + 2 * N * m["V"] * d
    return float(forward + backward)


def decode_bytes(m, itemsize=4) -> int:
    """Bytes a decode step must read: every layer's weights and the head (V, d); the embedding rows are few."""
    d, h = m["d"], m["d"] // m["heads"]
    linear = d * m["heads"] * h * 2 + 2 * d * m["kv_heads"] * h + 3 * d * m["I"] + 2 * d
    return (m["layers"] * linear + m["V"] * d + d) * itemsize


# -- the memory row: one subprocess per side -----------------------------------------------------
def _status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def memory_child(variant, cfg, threads):
    """In a child process, one side only: build, one warm-up step, reset VmHWM, one step; prints a JSON line."""
    m, s = cfg["model"], cfg["step"]
    ids = np.random.default_rng(0).integers(0, m["V"], (s["B"], s["T"]))
    checkpointing = variant.endswith("checkpointing")
    with harness.pinned_threads(threads):
        if variant.startswith("lowrank"):
            model = build_ours(m, s["r"], s["T"])
            if checkpointing:
                model.get_base_model().gradient_checkpointing_enable()
            step = our_step_closure(model, ids)
        else:
            import torch
            torch.set_num_threads(threads)
            model = build_theirs(m, s["r"], s["T"])
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            step = their_step_closure(model, ids)
        step()
        before, process_peak = _status_kb("VmRSS"), _status_kb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                             # VmHWM := VmRSS
        step()
        print(json.dumps(dict(variant=variant, rss_before_mb=before / 1024, step_peak_mb=_status_kb("VmHWM") / 1024,
                              process_peak_mb=process_peak / 1024, torch_imported="torch" in sys.modules)))


def _child(flags, threads, quick) -> dict:
    """This module run in a fresh process with ``flags`` (a child's hidden flags): its last line of output, parsed."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.real_model", *flags, "--threads", str(threads)]
                         + (["--quick"] if quick else []), capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_row(cfg, threads, quick):
    rows = []
    for variant in cfg["memory"]:
        rows.append(_child(["--memory-child", variant], threads, quick))
        print(f"memory {variant:22s} step peak {rows[-1]['step_peak_mb']:8.1f} MB (RSS before it "
              f"{rows[-1]['rss_before_mb']:.1f} MB; the child's peak before it, building included, "
              f"{rows[-1]['process_peak_mb']:.1f} MB)")
    return rows


# -- the load row: a fresh process per load -------------------------------------------------------
def load_child(variant, folder, threads):
    """In a child process: time one load of ``folder`` (a save_pretrained folder) and the resident memory it adds;
    'read' reads model.safetensors' bytes, the others build the model from the folder. Prints a JSON line."""
    with harness.pinned_threads(threads):
        if variant.startswith("lowrank"):
            import lowrank as lr
            load = lambda: lr.LlamaForCausalLM.from_pretrained(folder)            # noqa: E731
        elif variant == "torch":
            import torch
            import transformers
            torch.set_num_threads(threads)
            load = lambda: transformers.LlamaForCausalLM.from_pretrained(folder)  # noqa: E731
        else:
            load = (Path(folder) / "model.safetensors").read_bytes
        before = _status_kb("VmRSS")
        t = time.perf_counter()
        held = load()
        load_s = time.perf_counter() - t
        print(json.dumps(dict(variant=variant, load_s=load_s, rss_added_mb=(_status_kb("VmRSS") - before) / 1024)))
        del held


def load_row(cfg, threads, quick):
    """The model saved by lowrank (its checksums in the file) and by transformers (none) into a temporary folder,
    then each of LOAD_VARIANTS in its own process, ``rounds`` rounds in turn (the files in the page cache, as the
    first read leaves them): the median load time over reading the file's bytes, the resident memory a load
    adds over the parameters' bytes."""
    m, T = cfg["model"], cfg["step"]["T"]
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"lowrank": os.path.join(tmp, "lowrank"), "transformers": os.path.join(tmp, "transformers")}
        ours = build_ours(m, 8, T, lora=False)
        param_mb = sum(p.data.nbytes for p in ours.parameters()) / 2**20
        ours.save_pretrained(folders["lowrank"])
        build_theirs(m, 8, T, lora=False).save_pretrained(folders["transformers"])
        del ours
        samples = {v: [] for v in LOAD_VARIANTS}
        for k in range(cfg["rounds"]):
            for v in LOAD_VARIANTS[k % len(LOAD_VARIANTS):] + LOAD_VARIANTS[:k % len(LOAD_VARIANTS)]:   # in turn
                folder = folders["lowrank" if v in ("read", "lowrank") else "transformers"]
                samples[v].append(_child(["--load-child", v, "--load-folder", folder], threads, quick))
    read_s = float(np.median([r["load_s"] for r in samples["read"]]))
    rows = []
    for v, runs in samples.items():
        load_s = float(np.median([r["load_s"] for r in runs]))
        added = float(np.median([r["rss_added_mb"] for r in runs]))
        rows.append(dict(variant=v, load_s=load_s, over_read=load_s / read_s, rss_added_mb=added,
                         rss_over_params=added / param_mb, param_mb=param_mb, samples_s=[r["load_s"] for r in runs]))
        print(f"load   {v:26s} {load_s:7.3f} s ({load_s / read_s:.2f}x reading the file); resident memory "
              f"+{added:.1f} MB ({added / param_mb:.2f}x the parameters' {param_mb:.1f} MB)")
    return rows


# -- the rows ------------------------------------------------------------------------------------
def run(cfg, mach):
    import torch
    m, s, dec = cfg["model"], cfg["step"], cfg["decode"]
    out, checks = {}, {}
    ours, theirs = build(m, s["r"], s["T"])
    ids = np.random.default_rng(0).integers(0, m["V"], (s["B"], s["T"]))
    ours.zero_grad()
    loss = ours.forward(ids, labels=ids)                             # the check: one backward from equal weights
    ours.backward()
    their_loss = theirs.train()(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss
    their_loss.backward()
    checks["step_loss"] = rel_err(loss, their_loss.item())
    checks["step_lora_grads"] = grads_err(ours, theirs)
    variants = {"torch": their_step_closure(theirs, ids), "lowrank": our_step_closure(ours, ids)}
    res = harness.interleaved(variants, cfg["rounds"], "torch", cfg["target_s"], cfg["settle_s"])
    floor_s = step_flops(m, s["B"], s["T"], s["r"]) / (mach["blas_peak_gflops"] * 1e9)
    out["step"] = dict(**s, floor_s=floor_s, flops=step_flops(m, s["B"], s["T"], s["r"]),
                       **{k: dict(median_s=v["median_s"], min_s=v["min_s"], ratio_to_torch=v["ratio"],
                                  over_floor=v["median_s"] / floor_s, samples_s=v["samples_s"]) for k, v in res.items()})
    print(f"step   lowrank {res['lowrank']['median_s']:.3f} s  torch {res['torch']['median_s']:.3f} s  "
          f"lowrank/torch {res['lowrank']['ratio']:.3f}  FLOP floor {floor_s:.3f} s "
          f"(lowrank x{res['lowrank']['median_s'] / floor_s:.2f}, torch x{res['torch']['median_s'] / floor_s:.2f})")
    del ours, theirs, variants
    ours, theirs = build(m, s["r"], s["T"], lora=False)
    ours.eval()
    theirs.eval()
    step_floor = decode_bytes(m) / (mach["copy_gbs"] * 1e9)
    read_floor = decode_bytes(m) / (mach["read_gbs"] * 1e9)
    out["decode"] = []
    for B in dec["batches"]:
        prompt = np.random.default_rng(B).integers(0, m["V"], (B, dec["prompt"]))
        prompt_t = torch.from_numpy(prompt)

        def our_decode():
            return ours.generate(prompt, max_new_tokens=dec["new"])

        def their_decode():
            with torch.inference_mode():
                return theirs.generate(prompt_t, max_new_tokens=dec["new"], min_new_tokens=dec["new"],
                                       do_sample=False, attention_mask=torch.ones_like(prompt_t))
        same = float((np.asarray(our_decode()) == their_decode().numpy()).mean())
        checks[f"decode_b{B}_same_tokens"] = same
        res = harness.interleaved({"torch": their_decode, "lowrank": our_decode}, cfg["rounds"], "torch",
                                  cfg["target_s"], cfg["settle_s"])
        row = dict(batch=B, prompt=dec["prompt"], new=dec["new"], floor_step_s=step_floor,
                   read_floor_step_s=read_floor, same_tokens=same)
        for k, v in res.items():
            row[k] = dict(median_s=v["median_s"], tokens_per_s=B * dec["new"] / v["median_s"],
                          step_s=v["median_s"] / dec["new"], over_floor=v["median_s"] / dec["new"] / step_floor,
                          over_read_floor=v["median_s"] / dec["new"] / read_floor,
                          ratio_to_torch=v["ratio"], samples_s=v["samples_s"])
        out["decode"].append(row)
        print(f"decode B={B}: lowrank {row['lowrank']['tokens_per_s']:.1f} tok/s, torch {row['torch']['tokens_per_s']:.1f} "
              f"tok/s; a step {row['lowrank']['step_s'] * 1e3:.2f} ms against floors of {step_floor * 1e3:.2f} ms "
              f"(copy: x{row['lowrank']['over_floor']:.2f}; torch x{row['torch']['over_floor']:.2f}) and "
              f"{read_floor * 1e3:.2f} ms (read: x{row['lowrank']['over_read_floor']:.2f}); same tokens {same:.3f}")
    return out, checks


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: finishes in seconds (CI)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch, BLAS and Numba threads")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; 2 with --quick)")
    p.add_argument("--out", default=None, help="JSON path (default results/real_model_t{N}[_quick].json)")
    p.add_argument("--memory-child", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--load-child", choices=LOAD_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--load-folder", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    if a.memory_child:                       # before torch is imported: lowrank's children hold lowrank only
        return memory_child(a.memory_child, cfg, a.threads)
    if a.load_child:
        return load_child(a.load_child, a.load_folder, a.threads)
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        print(f"benchmarks.real_model needs torch, transformers and peft (pip install torch transformers peft): {e}")
        return None
    cfg["rounds"] = a.rounds or cfg["rounds"]
    a.out = a.out or os.path.join(harness.RESULTS, f"real_model_t{a.threads}{'_quick' if a.quick else ''}.json")
    t0, torch_threads = time.time(), torch.get_num_threads()

    def pinned_run(c):
        torch.set_num_threads(a.threads)
        return run(c, mach_box)
    try:
        with harness.pinned_threads(a.threads) as info:
            mach_box = harness.machine(a.threads, info, quick=a.quick)
            print(f"threads pinned: {info}\n{harness.floors_line(mach_box)}")
            rows, checks = pinned_run(cfg)
            mach_box.update(torch_threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(torch_threads)
    rows["memory"] = memory_row(cfg, a.threads, a.quick)
    rows["load"] = load_row(cfg, a.threads, a.quick)
    mach_box.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    payload = dict(command="python -m benchmarks.real_model" + (" --quick" if a.quick else "") + f" --threads {a.threads}",
                   argv=sys.argv[1:] if argv is None else list(argv), machine=mach_box, config=cfg, rows=rows,
                   checks=checks, wall_s=time.time() - t0)
    print(f"checks: {checks}")
    harness.write_json(a.out, payload)
    print(f"wrote {a.out} in {time.time() - t0:.1f} s")
    return payload


if __name__ == "__main__":
    main()
