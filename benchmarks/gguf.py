"""GGUF benchmark: llama.cpp's block formats multiplied in place against the float32 base product.

    python -m benchmarks.gguf            # (4096, 4096) at N = 1 and 256, 1 thread; results/gguf.json
    python -m benchmarks.gguf --quick    # (512, 1024) at N = 1 and 64, seconds (CI); results/gguf_quick.json
    python -m benchmarks.gguf --threads 2
    python -m benchmarks.gguf --decode   # greedy decode, a 135M-shape Llama's F32 and Q4_0 GGUFs; gguf_decode.json
    python -m benchmarks.gguf --decode --quick   # a 2-layer model, seconds (CI); results/gguf_decode_quick.json

Variants, interleaved by ``benchmarks.harness`` (ratio = per-round t / t(base), median), per format
Q8_0, Q4_0, Q4_1 and Q4_K and per N:
  base   x·Wᵀ with W float32 (the dequantized weight), BLAS
  numba  numba_cpu gguf_matmul(x, blocks): the fused GEMV for small N, tiles of W and BLAS above
  q8     numba_cpu gguf_matmul_q8(x, blocks), llama.cpp's arithmetic (x rounded to Q8_0, integer dots by
         AVX-512 VNNI): Q4_0 and Q4_1 at N = 1, where it has a kernel
Targets (the issue's, 4096², 1 thread): N = 1: Q4_0 <= 0.35 (its bytes are 0.14 of float32's), Q8_0 <= 0.5;
N = 256: every format <= 1.25. ``--threads`` defaults to 1 here, the targets' setting.
Bytes per weight are counted from the real blocks.

``--decode``: a random Llama shaped like a 135M checkpoint (30 layers, d = 576, 9 query heads over 3 key/value
heads, I = 1536, V = 49,152, tied head; N(0, 0.02) weights) written as a GGUF with its matrices in F32 and in Q4_0
(gguf's quantizer), loaded by ``LlamaForCausalLM.from_pretrained(path)`` (Q4_0: then ``keep_gguf_blocks`` with
``q8_activations``, so every matrix and the tied head multiply the file's blocks as llama.cpp does, activations
rounded to Q8_0), greedy decode of 64 new tokens after a prompt of 32,
1 thread, the two files interleaved. tokens/s two ways: new / (whole generate), and the decode alone,
(new − 1) / (t(generate new) − t(generate 1)). The floor: the tensor bytes a decode step reads (every tensor in
the file once: the tied head reads the whole embedding) at the copy bandwidth measured in the same run.
``--llama-bench BIN``: llama.cpp's llama-bench on the same files, on as many threads (``-p 0 -n 64 -d 32``: 64
tokens generated after 32 in the context), once before and once after lowrank's rounds; its tokens/s beside
lowrank's decode-alone figure, against the issue's targets (Q4_0 >= 0.5x, F32 >= 0.8x llama.cpp's). The files
carry no vocabulary (tokenizer.ggml.model "no_vocab" and vocab_size), which both load.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType, quants

from lowrank.kernels.numba_cpu import gguf as nb

from . import harness

DECODE = dict(model=dict(layers=30, d=576, heads=9, kv_heads=3, I=1536, V=49152), prompt=32, new=64,
              qtypes=("F32", "Q4_0"), rounds=3)
DECODE_QUICK = dict(model=dict(layers=2, d=64, heads=4, kv_heads=2, I=128, V=512), prompt=4, new=4,
                    qtypes=("F32", "Q4_0"), rounds=2)
FULL = dict(shape=(4096, 4096), Ns=(1, 256), qtypes=("Q8_0", "Q4_0", "Q4_1", "Q4_K"), rounds=7, settle_s=0.3)
QUICK = dict(shape=(512, 1024), Ns=(1, 64), qtypes=("Q8_0", "Q4_0", "Q4_1", "Q4_K"), rounds=3, settle_s=0.001)
Q8_KERNELS = ("Q4_0", "Q4_1")                                       # gguf_matmul_q8's VNNI GEMV
TARGETS = {(1, "Q4_0"): 0.35, (1, "Q8_0"): 0.5, **{(256, q): 1.25 for q in FULL["qtypes"]}}


def weight_blocks(qtype: str, shape, rng) -> np.ndarray:
    """(D_out, D_in / B · S) uint8 blocks of a Gaussian weight: quantized by gguf, or for Q4_K (gguf-py has no
    Q4_K quantizer) random bytes with f16 d and dmin that give weights of about unit size."""
    D_out, D_in = shape
    if qtype != "Q4_K":
        return quants.quantize(rng.standard_normal(shape).astype(np.float32), GGMLQuantizationType[qtype])
    raw = rng.integers(0, 256, (D_out * D_in // 256, 144), dtype=np.uint8)
    raw[:, :4] = rng.uniform(0.002, 0.02, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(D_out, -1)


def run(cfg) -> list[dict]:
    """One row per (format, N, variant) with the harness's medians and ratios."""
    D_out, D_in = cfg["shape"]
    rng = np.random.default_rng(1)
    rows = []
    for qtype in cfg["qtypes"]:
        blocks = weight_blocks(qtype, (D_out, D_in), rng)
        W = nb.gguf_dequantize(blocks, qtype, (D_out, D_in))          # the float32 base the ratio is taken against
        for N in cfg["Ns"]:
            x = rng.standard_normal((N, D_in)).astype(np.float32)
            variants = {"base": lambda: x @ W.T, "numba": lambda: nb.gguf_matmul(x, blocks, qtype, (D_out, D_in))}
            if N == 1 and qtype in Q8_KERNELS:
                variants["q8"] = lambda: nb.gguf_matmul_q8(x, blocks, qtype, (D_out, D_in))
            res = harness.interleaved(variants, cfg["rounds"], "base", settle_s=cfg["settle_s"])
            for name, r in res.items():
                rows.append(dict(qtype=qtype, N=N, D_out=D_out, D_in=D_in, variant=name,
                                 bytes_per_weight=blocks.nbytes / (D_out * D_in) if name != "base" else 4.0, **r))
                print(f"{qtype:5s} N={N:4d} {name:6s} median {r['median_s'] * 1e3:9.3f} ms   ratio {r['ratio']:.3f}")
    return rows


def targets(rows, cfg) -> dict:
    """numba / base at the issue's points that this run measured, labelled with their targets."""
    label = "x".join(map(str, cfg["shape"]))
    out = {}
    for r in rows:
        if r["variant"] != "base":
            goal = TARGETS.get((r["N"], r["qtype"])) if cfg["shape"] == FULL["shape"] else None
            kernel = "gguf_matmul_q8" if r["variant"] == "q8" else "gguf_matmul"
            out[f"numba {kernel} {r['qtype']} / base {label} N={r['N']}"
                + (f" (<= {goal})" if goal is not None else "")] = r["ratio"]
    return out


def write_random_llama(path, m: dict, qtype: str, seed: int = 0) -> int:
    """A GGUF at ``path`` of a random Llama of sizes ``m`` (layers, d, heads, kv_heads, I, V; tied head), matrices
    in ``qtype`` (F32 or a format gguf quantizes), norms F32; the same weights for every qtype at one seed.
    Returns the bytes of its tensors."""
    import gguf
    d, hd, L = m["d"], m["d"] // m["heads"], m["layers"]
    shapes = {"token_embd.weight": (m["V"], d), "output_norm.weight": (d,)}
    for i in range(L):
        shapes.update({f"blk.{i}.{n}.weight": s for n, s in (
            ("attn_norm", (d,)), ("ffn_norm", (d,)), ("attn_q", (m["heads"] * hd, d)),
            ("attn_k", (m["kv_heads"] * hd, d)), ("attn_v", (m["kv_heads"] * hd, d)),
            ("attn_output", (d, m["heads"] * hd)), ("ffn_gate", (m["I"], d)), ("ffn_up", (m["I"], d)),
            ("ffn_down", (d, m["I"])))})
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 2048), ("embedding_length", d), ("block_count", L),
                       ("feed_forward_length", m["I"]), ("head_count", m["heads"]), ("head_count_kv", m["kv_heads"]),
                       ("rope_dimension_count", hd), ("key_length", hd), ("value_length", hd)):
        getattr(w, f"add_{key}")(value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(m["V"])
    w.add_tokenizer_model("no_vocab")          # no tokens: llama.cpp then makes V dummy ones
    rng, total = np.random.default_rng(seed), 0
    for name, shape in shapes.items():
        W = np.ones(shape, np.float32) if len(shape) == 1 else (0.02 * rng.standard_normal(shape)).astype(np.float32)
        if len(shape) == 2 and qtype != "F32":
            W = quants.quantize(W, GGMLQuantizationType[qtype])
            w.add_tensor(name, W, raw_dtype=GGMLQuantizationType[qtype])
        else:
            w.add_tensor(name, W)
        total += W.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return total


def llama_bench(binary, path, threads, cfg) -> list:
    """llama.cpp's tokens/s samples for generating cfg["new"] tokens after cfg["prompt"] in the context."""
    out = subprocess.run([binary, "-m", str(path), "-t", str(threads), "-p", "0", "-n", str(cfg["new"]),
                          "-d", str(cfg["prompt"]), "-r", str(cfg["rounds"]), "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    return [float(v) for v in json.loads(out)[0]["samples_ts"]]


def run_decode(cfg, mach, binary=None) -> list[dict]:
    """One row per file type: tokens/s of greedy decode on the loaded GGUF, and its floor (module docstring);
    with ``binary`` (llama-bench), llama.cpp's tokens/s on the same file."""
    import tempfile

    from lowrank.models.llama import LlamaForCausalLM
    from lowrank.models.llama.gguf import keep_gguf_blocks
    models, nbytes, floors, kept, paths, theirs = {}, {}, {}, {}, {}, {}
    tmp = tempfile.TemporaryDirectory()
    for qtype in cfg["qtypes"]:
        paths[qtype] = f"{tmp.name}/model-{qtype}.gguf"
        nbytes[qtype] = write_random_llama(paths[qtype], cfg["model"], qtype)
        models[qtype] = LlamaForCausalLM.from_pretrained(paths[qtype])
        kept[qtype] = len(keep_gguf_blocks(models[qtype], paths[qtype], q8_activations=True)) if qtype != "F32" else 0
        models[qtype].eval()
        floors[qtype] = nbytes[qtype] / (mach["copy_gbs"] * 1e9)
        theirs[qtype] = llama_bench(binary, paths[qtype], mach["threads"], cfg) if binary else []
    prompt = np.random.default_rng(0).integers(0, cfg["model"]["V"], (1, cfg["prompt"]))
    same = models[cfg["qtypes"][0]].generate(prompt, max_new_tokens=cfg["new"])
    variants = {}
    for qtype, model in models.items():
        variants[qtype] = lambda model=model: model.generate(prompt, max_new_tokens=cfg["new"])
        variants[f"{qtype} prefill"] = lambda model=model: model.generate(prompt, max_new_tokens=1)
    res = harness.interleaved(variants, cfg["rounds"], cfg["qtypes"][0], target_s=0.0)
    for qtype in cfg["qtypes"] if binary else ():
        theirs[qtype] += llama_bench(binary, paths[qtype], mach["threads"], cfg)
    tmp.cleanup()
    rows = []
    for qtype in cfg["qtypes"]:
        full, pre = np.array(res[qtype]["samples_s"]), np.array(res[f"{qtype} prefill"]["samples_s"])
        step_s = float(np.median((full - pre) / (cfg["new"] - 1)))
        tokens = models[qtype].generate(prompt, max_new_tokens=cfg["new"])
        row = dict(qtype=qtype, **cfg["model"], prompt=cfg["prompt"], new=cfg["new"], tensor_bytes=nbytes[qtype],
                   weights_as_blocks=kept[qtype],
                   generate_median_s=res[qtype]["median_s"], tokens_per_s=cfg["new"] / res[qtype]["median_s"],
                   decode_step_s=step_s, decode_tokens_per_s=1 / step_s, floor_step_s=floors[qtype],
                   floor_tokens_per_s=1 / floors[qtype], step_over_floor=step_s / floors[qtype],
                   same_tokens_as_first=float((tokens == same).mean()),
                   samples_s=res[qtype]["samples_s"], prefill_samples_s=res[f"{qtype} prefill"]["samples_s"])
        if theirs[qtype]:
            row.update(llama_cpp_samples_ts=theirs[qtype], llama_cpp_tokens_per_s=float(np.median(theirs[qtype])),
                       of_llama_cpp=row["decode_tokens_per_s"] / float(np.median(theirs[qtype])))
        rows.append(row)
        print(f"{qtype:5s} {nbytes[qtype] / 2**20:8.1f} MiB  generate {row['tokens_per_s']:6.1f} tok/s  decode "
              f"{row['decode_tokens_per_s']:6.1f} tok/s ({step_s * 1e3:.2f} ms a step; floor "
              f"{floors[qtype] * 1e3:.2f} ms = {row['floor_tokens_per_s']:.1f} tok/s, x{row['step_over_floor']:.2f})")
        if theirs[qtype]:
            target = 0.8 if qtype == "F32" else 0.5
            print(f"      llama.cpp {row['llama_cpp_tokens_per_s']:6.1f} tok/s (samples {np.min(theirs[qtype]):.1f}-"
                  f"{np.max(theirs[qtype]):.1f}): lowrank {row['of_llama_cpp']:.2f}x (target >= {target}: "
                  f"{'met' if row['of_llama_cpp'] >= target else 'NOT met'})")
    return rows


def main_decode(a, argv):
    """``--decode``: run_decode pinned, with this run's machine floors; results/gguf_decode[_quick].json."""
    cfg, t0 = (DECODE_QUICK if a.quick else DECODE), time.time()
    with harness.pinned_threads(a.threads) as info:
        print(f"threads pinned: {info}")
        mach = harness.machine(a.threads, info, quick=a.quick)
        print(f"copy bandwidth {mach['copy_gbs']:.1f} GB/s")
        rows = run_decode(cfg, mach, a.llama_bench)
    payload = dict(command="python -m benchmarks.gguf --decode" + (" --quick" if a.quick else ""), argv=argv,
                   machine=mach, config=cfg, rows=rows, wall_s=time.time() - t0)
    harness.write_json(a.out, payload)
    print(f"wrote {a.out} in {time.time() - t0:.1f} s")
    return payload


def add_arguments(p):
    p.add_argument("--decode", action="store_true", help="greedy decode of a 135M-shape Llama's F32 and Q4_0 GGUFs "
                   "against its bandwidth floor (results/gguf_decode.json)")
    p.add_argument("--llama-bench", metavar="BIN", help="with --decode: llama.cpp's llama-bench binary, run on the "
                   "same files")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = harness.parse_args(argv, __doc__, lambda a: "gguf_decode" if a.decode else "gguf", threads=1,  # the issue's
                           add_arguments=add_arguments)                                             # setting
    if a.decode:
        return main_decode(a, argv)
    cfg, out = (QUICK if a.quick else FULL), a.out
    t0 = time.time()
    mach, rows = harness.run_pinned(a, run, cfg)
    tg = targets(rows, cfg)
    for name, v in tg.items():
        print(f"target  {name:55s} {v:.3f}")
    payload = dict(command="python -m benchmarks.gguf" + (" --quick" if a.quick else ""), argv=argv,
                   machine=mach, config=cfg, rows=rows, targets=tg, wall_s=time.time() - t0)
    harness.write_json(out, payload)
    print(f"wrote {out} in {time.time() - t0:.1f} s")
    return payload


if __name__ == "__main__":
    main()
