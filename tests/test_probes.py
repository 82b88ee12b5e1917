"""The probe suite of issue #29: the hostile and careless inputs of the decoder path's failure-injection review,
rerun. Each file probe runs in a fresh interpreter whose address space is capped (``resource.setrlimit``)
just above what it holds after importing lowrank, so a config or adapter that claims a huge size must be
refused with a ValueError naming the file and the key, quickly, instead of being allocated first.

Probes that live elsewhere (not repeated here):
- kills at every rename: SIGKILL of the writer at the N-th file-system step, for every N, in
  tests/io/test_hardening_files.py::test_a_model_folder_save_killed_at_every_step_is_old_new_or_refused
  (model folders: save_pretrained, and so lm pretrain's output, which it writes) and
  tests/app/test_hardening_lm_cli.py::test_a_finetune_run_killed_at_every_step_leaves_one_run_or_is_refused
  (lm finetune's output folder);
- the --out, --seed and vocabulary checks of the commands: tests/app/test_hardening_lm_cli.py and
  tests/models/test_generate.py.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lowrank as lr
from lowrank.io.tensor_files import tensor_file_bytes
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.tuners.lora.save_and_load import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME

MiB = 1 << 20
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, model_type="llama")
# The cap: the interpreter's baseline (its address space once lowrank, the Numba kernels and the code a probe
# runs are imported, measured in the child itself since it varies with the libraries present), plus 256 MiB
# of working room, plus 4x the checkpoint's bytes (its map, its float32 upcast and a spare copy); the probes
# claim 0.4 GiB to 10**19 bytes, and the two controls below show that a valid load and generate fit under
# it and that an allocation of 1 GiB does not.
ROOM = 256 * MiB
SECONDS = 20                                # the most a probe's interpreter may take, its import included

CHILD = r"""
import json, resource, sys, time
import numpy as np
import lowrank as lr
import lowrank.models.llama.checkpoint, lowrank.tuners.lora.save_and_load, lowrank.models.llama.generation
from lowrank.models.llama import LlamaForCausalLM
import lowrank.kernels.numba_cpu                  # Numba and LLVM reserve much address space: part of the baseline

def address_space() -> int:
    status = open("/proc/self/status").read()
    return int(status.split("VmSize:")[1].split()[0]) * 1024

probe = json.loads(sys.argv[1])
baseline = address_space()
cap = baseline + probe["room"]
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
start = time.perf_counter()
try:
    exec(probe["code"], {"lr": lr, "np": np, "LlamaForCausalLM": LlamaForCausalLM, "folder": probe["folder"]})
    out = {"raised": None, "message": ""}
except BaseException as e:
    out = {"raised": type(e).__name__, "value_error": isinstance(e, ValueError), "message": str(e)}
out.update(seconds=time.perf_counter() - start, baseline=baseline, cap=cap)
print("PROBE " + json.dumps(out))
"""


def run_capped(code: str, folder: Path, checkpoint_bytes: int) -> dict:
    """Run ``code`` (``folder`` bound to the probe's folder) in a fresh interpreter under the cap; its outcome."""
    probe = {"code": code, "folder": str(folder), "room": ROOM + 4 * checkpoint_bytes}
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")       # threads' arenas and stacks count as address space
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(probe)], capture_output=True, text=True,
                          env=env, timeout=SECONDS)
    lines = [l for l in done.stdout.splitlines() if l.startswith("PROBE ")]
    assert lines, f"the probe died (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(lines[-1][len("PROBE "):])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A transformers-style folder (no lowrank binding, so config.json may be edited) and its state."""
    folder = tmp_path_factory.mktemp("probe") / "model"
    folder.mkdir()
    model = LlamaForCausalLM(LlamaConfig.from_dict(SIZES), seed=0)
    (folder / "model.safetensors").write_bytes(tensor_file_bytes({k: np.asarray(v)
                                                                  for k, v in model.state_dict().items()}))
    (folder / "config.json").write_text(json.dumps(SIZES))
    return folder


def copy_of(checkpoint, where: Path, **config_changes) -> Path:
    where.mkdir(parents=True)
    os.link(checkpoint / "model.safetensors", where / "model.safetensors")
    (where / "config.json").write_text(json.dumps({**SIZES, **config_changes}))
    return where


LOAD = "LlamaForCausalLM.from_pretrained(folder)"


# -- controls: the cap lets a valid load run, and stops a real blow-up ---------------------------------
def test_a_valid_checkpoint_loads_and_generates_under_the_cap(checkpoint):
    out = run_capped(f"m = {LOAD}; m.generate(np.array([[1, 2, 3]]), max_new_tokens=8)", checkpoint,
                     folder_bytes(checkpoint))
    assert out["raised"] is None, out


def test_the_cap_stops_an_allocation_of_1_gib(checkpoint):
    out = run_capped("np.ones(1 << 28, np.float32)", checkpoint, folder_bytes(checkpoint))
    assert out["raised"] == "MemoryError", out


# -- model folders: shard names out of the folder, and configs claiming huge sizes ---------------------
def sharded(checkpoint, where: Path, shard: str) -> Path:
    """A folder whose index names ``shard`` for every tensor; a valid shard waits outside, and a link to it."""
    copy_of(checkpoint, where / "m")
    (where / "outside").mkdir()
    os.link(checkpoint / "model.safetensors", where / "outside" / "model.safetensors")
    (where / "m" / "link").symlink_to(where / "outside" / "model.safetensors")
    names = LlamaForCausalLM(LlamaConfig.from_dict(SIZES)).state_dict()
    (where / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in names}}))
    (where / "m" / "model.safetensors").rename(where / "m" / "kept.safetensors")
    return where / "m"


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside/model.safetensors", "../../x", "link"])
def test_probe_a_shard_outside_the_folder(tmp_path, checkpoint, shard):
    folder = sharded(checkpoint, tmp_path, shard)
    out = run_capped(LOAD, folder, folder_bytes(checkpoint))
    assert out["value_error"] and "points outside the model directory" in out["message"], out
    assert "root" not in out["message"].replace(str(tmp_path), ""), out      # no byte of /etc/passwd echoed


CLAIMS = [
    (dict(vocab_size=3_000_000), r"(3000000, 64)"),
    (dict(num_hidden_layers=10**6), "num_hidden_layers is 1000000"),
    (dict(num_hidden_layers=2**64), f"num_hidden_layers is {2**64}"),
    (dict(intermediate_size=10**9), "(1000000000, 64)"),
    (dict(hidden_size=2**40, num_attention_heads=2**20, num_key_value_heads=2**20), "hidden_size"),
    (dict(max_position_embeddings=10**12), None),           # RoPE tables are built lazily: loads
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(hidden_size=128.0), "hidden_size"),
    (dict(hidden_size=float("inf")), "hidden_size"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(initializer_range=float("nan")), "initializer_range"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0},
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "disagree"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "yarn"),
]


@pytest.mark.parametrize("changes, words", CLAIMS, ids=[next(iter(c)) + f"={list(c.values())[0]!r}"[:30]
                                                        for c, _ in CLAIMS])
def test_probe_a_config_claim(tmp_path, checkpoint, changes, words):
    folder = copy_of(checkpoint, tmp_path / "m", **changes)
    out = run_capped(LOAD, folder, folder_bytes(checkpoint))
    if words is None:
        assert out["raised"] is None, out
        return
    assert out["value_error"] and str(folder / "config.json") in out["message"] and words in out["message"], out


def test_probe_a_config_without_its_sizes(tmp_path, checkpoint):
    folder = copy_of(checkpoint, tmp_path / "m")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    out = run_capped(LOAD, folder, folder_bytes(checkpoint))
    assert out["value_error"] and "vocab_size 32000 (absent: the default), hidden_size 4096 (absent" in out["message"], out


def test_probe_a_config_that_is_not_an_object(tmp_path, checkpoint):
    folder = copy_of(checkpoint, tmp_path / "m")
    (folder / "config.json").write_text("[1, 2, 3]")
    out = run_capped(LOAD, folder, folder_bytes(checkpoint))
    assert out["value_error"] and "JSON object" in out["message"], out


# -- tensor files: a junk header before 2 GB, and headers claiming more than the file ------------------
@pytest.mark.parametrize("head", [b"root:x:0:0:root", (10**12).to_bytes(8, "little") + b"{}",
                                  (40).to_bytes(8, "little") + b'{"w":{"dtype":"F32","shape":[1000000000000],'])
def test_probe_a_2_gb_tensor_file_with_a_bad_header(tmp_path, checkpoint, head):
    folder = copy_of(checkpoint, tmp_path / "m")
    (folder / "model.safetensors").unlink()           # a link to the shared checkpoint: never write through it
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(2 << 30)                    # sparse: 2 GiB of zeros that a whole read would bring in
        f.seek(0)
        f.write(head)
    out = run_capped(LOAD, folder, folder_bytes(checkpoint))
    assert out["value_error"] and "not a valid safetensors file" in out["message"], out
    assert "root" not in out["message"].replace(str(tmp_path), "") and out["seconds"] < 5, out


# -- adapters: ranks claimed by adapter_config.json -----------------------------------------------------
@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory):
    """An r = 4 adapter on q_proj, v_proj of the checkpoint, its tensors without lowrank's config hash (as
    PEFT writes them, so that a config edited by hand reaches the rank checks)."""
    folder = tmp_path_factory.mktemp("adapter") / "a"
    lm = lr.get_lora_model(LlamaForCausalLM.from_pretrained(checkpoint),
                           lr.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lm.save_pretrained(folder)
    tensors = lr.io.tensor_files.read_tensor_file(folder / ADAPTER_SAFE_WEIGHTS_NAME)[0]
    (folder / ADAPTER_SAFE_WEIGHTS_NAME).write_bytes(tensor_file_bytes(tensors))
    return folder


@pytest.mark.parametrize("changes, words", [
    (dict(r=10**9), "r is 1000000000"),
    (dict(r=300_000), "r is 300000"),
    (dict(rank_pattern={"q_proj": 10**9}), "rank_pattern['q_proj'] is 1000000000"),
    (dict(rank_pattern={"o_proj": 10**9}, target_modules=["q_proj", "v_proj", "o_proj"]), "missing tensors"),
    (dict(alpha_pattern={"q_proj": float("inf")}), "alpha_pattern"),
    (dict(r=0), "r must be an integer >= 1"),
])
def test_probe_an_adapter_claim(tmp_path, checkpoint, adapter, changes, words):
    folder = tmp_path / "a"
    folder.mkdir()
    os.link(adapter / ADAPTER_SAFE_WEIGHTS_NAME, folder / ADAPTER_SAFE_WEIGHTS_NAME)
    config = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, **changes}))
    code = f"lr.LoraModel.from_pretrained(LlamaForCausalLM.from_pretrained({str(checkpoint)!r}), folder)"
    out = run_capped(code, folder, folder_bytes(checkpoint) + folder_bytes(adapter))
    assert out["value_error"] and ADAPTER_CONFIG_NAME in out["message"] and words in out["message"], out
    assert out["seconds"] < 5, out


# -- generate: absurd sampling settings (the API; the CLI passes them through unchanged) -----------------
def tiny():
    config = LlamaConfig(**{k: v for k, v in SIZES.items() if k != "model_type"})
    return LlamaForCausalLM(config, seed=0)


PROMPT = np.array([[1, 2, 3]])


@pytest.mark.parametrize("temperature", [1e-308, 5e-324, 1e-30])
def test_probe_a_tiny_temperature_is_greedy(temperature):
    model = tiny()
    got = model.generate(PROMPT, max_new_tokens=6, do_sample=True, temperature=temperature, seed=0)
    np.testing.assert_array_equal(got, model.generate(PROMPT, max_new_tokens=6))


@pytest.mark.parametrize("kwargs, words", [
    (dict(do_sample=True, temperature=float("inf")), "temperature"),
    (dict(do_sample=True, temperature=float("nan")), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_p=-0.1), "top_p"),
    (dict(do_sample=True, top_p=float("nan")), "top_p"),
    (dict(do_sample=True, top_k=0), "top_k"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(do_sample=True, top_k=2.5), "top_k"),
    (dict(eos_token_id=10**30), "eos_token_id"),
    (dict(eos_token_id=-1), "eos_token_id"),
    (dict(pad_token_id=10**30, eos_token_id=1), "pad_token_id"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "max_new_tokens"),
])
def test_probe_an_absurd_sampling_setting_is_refused_naming_it(kwargs, words):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=words):
        tiny().generate(PROMPT, **{"max_new_tokens": 4, **kwargs})
    assert time.perf_counter() - start < 5


# -- memory: a bfloat16 checkpoint loads in a small multiple of its float32 size --------------------------
MEASURE = r"""
import sys
import lowrank.models.llama.checkpoint
from lowrank.models.llama import LlamaForCausalLM

def status(key) -> int:
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

baseline = status("VmRSS")
model = LlamaForCausalLM.from_pretrained(sys.argv[1])
print(status("VmHWM") - baseline, sum(p.data.nbytes for p in model.parameters()))
"""    # VmHWM, this process's peak RSS (ru_maxrss would count the parent's RSS at the fork before exec)


def test_a_bfloat16_checkpoint_loads_in_less_than_twice_its_float32_bytes(tmp_path):
    """What a load must hold at once: the file's map (half the float32 bytes) and the float32 parameters;
    not also the constructor's random parameters beside them (the review measured 7.3x the file)."""
    config = LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config, seed=0).save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "bf16")], capture_output=True, text=True,
                          env=env, timeout=SECONDS, check=True)
    peak, float32_bytes = map(int, done.stdout.split())
    assert float32_bytes > 40 * MiB
    assert peak < 2.0 * float32_bytes, f"peak {peak / MiB:.0f} MiB for {float32_bytes / MiB:.0f} MiB of float32"
