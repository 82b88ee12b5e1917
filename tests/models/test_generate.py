"""``generate`` (Hugging Face's API) and ``lowrank generate``: greedy, sampling, EOS, mixed adapters, bad input.

Oracles: greedy decoding is the argmax of the full forward re-run on the growing sequence (no
cache); a mixed-adapter batch generates, row by row, exactly what each prompt generates alone
with its adapter; the CLI prints what the API returns.
"""
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import lowrank as lr
from lowrank.app.cli import main
from lowrank.app.generate import _shown
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.models.llama.generation import pick
from lowrank.nn.dispatch import kernels_for
from lowrank.io.tokenizer import BYTE_TOKENIZER_FILE, ByteTokenizer

SHIPPED = Path(lr.__file__).parent / "models" / "checkpoints" / "pydoc-byte-4x128"

V = 37
TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(dtype="float64", seed=0, **kw):
    config = LlamaConfig(**{**dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32), **kw})
    return LlamaForCausalLM(config, dtype=dtype, seed=seed)


def randomize_B(model, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    for _, layer in model.lora_layers():
        for n in layer.lora_B:
            layer.lora_B[n].data = (scale * rng.standard_normal(layer.lora_B[n].shape)).astype(layer.lora_B[n].dtype)


def lora_llama(dtype):
    """Adapters a (r=4) and b (r=2) on q/v/down_proj, c (r=3) on v_proj only; B factors random."""
    model = lr.get_lora_model(tiny_llama(dtype), lr.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                              adapter_name="a")
    model.add_adapter("b", lr.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS))
    model.add_adapter("c", lr.LoraConfig(r=3, lora_alpha=3, target_modules=["v_proj"]))
    randomize_B(model, 1)
    return model


def greedy_without_cache(forward, ids, n):
    for _ in range(n):
        ids = np.concatenate([ids, forward(ids)[:, -1].argmax(-1)[:, None]], axis=1)
    return ids


# -- the decoder's generate ----------------------------------------------------------------------
def test_greedy_is_the_argmax_of_the_full_forward_at_every_step():
    model = tiny_llama()
    ids = np.random.default_rng(0).integers(0, V, (3, 5))
    got = model.generate(ids, max_new_tokens=8)
    assert got.shape == (3, 13)
    np.testing.assert_array_equal(got, greedy_without_cache(model.forward, ids, 8))


def test_left_padded_prompts_generate_what_they_generate_alone():
    model = tiny_llama()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, V, n) for n in (6, 2, 4)]
    ids = np.zeros((3, 6), np.int64)
    mask = np.zeros((3, 6), np.int64)
    for b, p in enumerate(prompts):
        ids[b, 6 - len(p):], mask[b, 6 - len(p):] = p, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    for b, p in enumerate(prompts):
        np.testing.assert_array_equal(batch[b, 6:], model.generate(p[None], max_new_tokens=6)[0, len(p):])


def test_sampling_is_seeded_and_its_limits_reduce_to_greedy():
    model = tiny_llama()
    ids = np.random.default_rng(2).integers(0, V, (2, 4))
    greedy = model.generate(ids, max_new_tokens=6)
    a, b = (model.generate(ids, max_new_tokens=6, do_sample=True, temperature=2.0, seed=7) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, model.generate(ids, max_new_tokens=6, do_sample=True, temperature=2.0, seed=8))
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_p=1e-9, seed=3), greedy)


def test_pick_draws_from_the_top_k_and_top_p_distribution():
    """logits log([.4, .3, .2, .1]): top_k=2 -> {0: 4/7, 1: 3/7}; top_p=0.75 -> the first three (0.4 + 0.3 < 0.75)."""
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]] * 20000))
    rng = np.random.default_rng(0)
    for kw, expected in [(dict(top_k=2), [4 / 7, 3 / 7, 0, 0]), (dict(top_p=0.75), [4 / 9, 3 / 9, 2 / 9, 0]),
                         (dict(top_p=0.7), [4 / 7, 3 / 7, 0, 0]), (dict(), [0.4, 0.3, 0.2, 0.1]),
                         (dict(temperature=0.5), np.array([16, 9, 4, 1]) / 30)]:
        counts = Counter(pick(logits, True, rng=rng, **kw).tolist())
        freq = np.array([counts[i] for i in range(4)]) / len(logits)
        np.testing.assert_allclose(freq, expected, atol=0.015)
        assert all(counts[i] == 0 for i in range(4) if expected[i] == 0)


def test_rows_stop_at_eos_and_are_padded_and_all_finished_stops_early():
    model = tiny_llama()
    ids = np.random.default_rng(0).integers(0, V, (3, 5))
    free = model.generate(ids, max_new_tokens=8)
    eos = int(free[1, 7])                                        # row 1's third new token
    got = model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=36)
    for b in range(3):
        new, ref = got[b, 5:], free[b, 5:]
        stop = next((i for i, t in enumerate(ref) if t == eos), None)
        end = len(new) if stop is None else stop + 1
        np.testing.assert_array_equal(new[:end], ref[:end])
        assert (new[end:] == 36).all()
    unseen = next(i for i in range(V) if i not in free[1])
    one = model.generate(ids[1:2], max_new_tokens=8, eos_token_id=[unseen, eos])
    np.testing.assert_array_equal(one, free[1:2, :8])            # stopped after EOS: 3 new tokens, not 8
    for ids_as in (np.array([unseen, eos]), np.array(eos), np.int64(eos)):
        np.testing.assert_array_equal(model.generate(ids[1:2], max_new_tokens=8, eos_token_id=ids_as), one)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=-3), "max_new_tokens must be an integer >= 1"),
    (dict(do_sample=True, top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(do_sample=True, top_k=0), "top_k must be an integer >= 1"),
    (dict(do_sample=True, temperature=0.0), "temperature must be a finite number > 0"),
    (dict(input_ids=np.zeros((2, 0), np.int64)), "empty prompt"),
    (dict(attention_mask=np.array([[0, 0, 0], [1, 1, 1]])), r"empty prompt in rows \[0\]"),
    (dict(attention_mask=np.array([[1, 1, 0], [1, 1, 1]])), "pad prompts on the left"),
    (dict(input_ids=np.zeros((1, 33), np.int64)), "33 tokens, longer than the model's context of 32"),
    (dict(input_ids=np.zeros((1, 30), np.int64), max_new_tokens=5), "at most 2 new tokens"),
    (dict(input_ids=np.array([[1, V]])), r"token ids must lie in \[0, 37\)"),
    (dict(input_ids=np.array([1, 2, 3])), r"shape \(B, T\)"),
])
def test_bad_input_is_a_clear_value_error(kwargs, match):
    args = {"input_ids": np.array([[1, 2, 3], [4, 5, 6]]), "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        tiny_llama().generate(args.pop("input_ids"), **args)


# -- many adapters, one batch ---------------------------------------------------------------------
NAMES = ["a", "__base__", "b", "c", "a", "b"]


def alone(model, name, prompt, n):
    if name == "__base__":
        with model.disable_adapter():
            return model.generate(prompt[None], max_new_tokens=n)[0]
    model.set_adapter(name)
    return model.generate(prompt[None], max_new_tokens=n)[0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_mixed_batch_generates_what_each_row_generates_alone_with_its_adapter(dtype):
    model = lora_llama(dtype)
    model.eval()
    rng = np.random.default_rng(4)
    lengths = [5, 3, 5, 4, 2, 5]
    ids, mask = np.zeros((6, 5), np.int64), np.zeros((6, 5), np.int64)
    prompts = [rng.integers(0, V, n) for n in lengths]
    for b, p in enumerate(prompts):
        ids[b, 5 - len(p):], mask[b, 5 - len(p):] = p, 1
    mixed = model.generate(ids, adapter_names=NAMES, attention_mask=mask, max_new_tokens=10)
    rows = [alone(model, n, p, 10) for n, p in zip(NAMES, prompts)]
    for b in range(6):
        np.testing.assert_array_equal(mixed[b, 5:], rows[b][lengths[b]:])
    assert len({tuple(r[lengths[b]:]) for b, r in enumerate(rows) if lengths[b] == 5}) == 3   # adapters matter


def count_kernel_calls(monkeypatch, x):
    """{(kernel, rows)}: calls of the LoRA forward kernels of x's backend, keyed by the rows they got."""
    k, calls = kernels_for(x), Counter()
    for name in ("lora_forward", "lora_forward_multi", "lora_forward_sgmv"):
        def counted(*args, _f=getattr(k, name), _n=name, **kw):
            calls[(_n, args[0].shape[0])] += 1
            return _f(*args, **kw)
        monkeypatch.setattr(k, name, counted)
    return calls


def test_decode_steps_run_through_bgmv_one_row_per_sequence(monkeypatch):
    model = lora_llama("float64")
    calls = count_kernel_calls(monkeypatch, np.zeros(1))
    model.generate(np.ones((6, 4), np.int64), adapter_names=NAMES, max_new_tokens=3)
    layers = len(model.lora_layers())                            # 2 layers x (q, v, down) = 6
    assert calls[("lora_forward_multi", 6)] == 2 * layers        # 2 decode steps after the prefill's token
    assert calls[("lora_forward", 6)] == 0


def test_the_prefill_runs_through_sgmv(monkeypatch):
    model = lora_llama("float64")
    calls = count_kernel_calls(monkeypatch, np.zeros(1))
    model.generate(np.ones((6, 4), np.int64), adapter_names=NAMES, max_new_tokens=1)
    assert calls[("lora_forward_sgmv", 24)] == len(model.lora_layers())


def test_adapter_names_must_be_one_per_prompt():
    model = lora_llama("float64")
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        model.generate(np.ones((3, 2), np.int64), adapter_names=["a", "b"])
    with pytest.raises(TypeError, match=r"one per sequence \(prompts\)"):
        model.generate(np.ones((3, 2), np.int64), adapter_names="a")
    with pytest.raises(ValueError, match="unknown adapters"):
        model.generate(np.ones((1, 2), np.int64), adapter_names=["zz"])


# -- lowrank generate --------------------------------------------------------------------------
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny byte-level Llama (vocab 259) and two adapters for it, one for a wider model, as saved."""
    root = tmp_path_factory.mktemp("gen")
    kw = dict(vocab_size=259, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=24)
    LlamaForCausalLM(LlamaConfig(**kw), seed=0).save_pretrained(root / "model")
    shutil.copy(SHIPPED / BYTE_TOKENIZER_FILE, root / "model")              # a byte-level model says so
    for i, targets in enumerate([["q_proj", "v_proj"], ["v_proj", "down_proj"]]):
        m = lr.get_lora_model(LlamaForCausalLM.from_pretrained(root / "model"),
                              lr.LoraConfig(r=2, target_modules=targets))
        randomize_B(m, 10 + i, scale=3.0)
        m.save_pretrained(root / f"ad{i}")
    wide = lr.get_lora_model(LlamaForCausalLM(LlamaConfig(**{**kw, "hidden_size": 32}), seed=0),
                             lr.LoraConfig(r=2, target_modules=["q_proj"]))
    wide.save_pretrained(root / "wide")
    mlp = lr.get_lora_model(lr.MLP([16, 8, 4], seed=0), lr.LoraConfig(r=2, target_modules=["0"]))
    mlp.save_pretrained(root / "mlp")
    return root


def cli_rows(capsys, args):
    assert main(["generate", *map(str, args)]) == 0
    out = capsys.readouterr().out.split("--- prompt ")[1:]
    return [block.split(") ---\n", 1)[1].removesuffix("\n") for block in out]


def test_cli_prints_what_the_api_generates(folders, capsys):
    prompts = ["def f(", "The"]
    rows = cli_rows(capsys, ["--model", folders / "model", "--prompt", prompts[0], "--prompt", prompts[1],
                             "--max-new-tokens", 6])
    model = LlamaForCausalLM.from_pretrained(folders / "model")
    for p, row in zip(prompts, rows):
        ids = model.generate(np.asarray(TOK.encode(p))[None], max_new_tokens=6, eos_token_id=257, pad_token_id=258)
        assert row == _shown(p + TOK.decode(ids[0, len(p) + 1:]))     # control characters escaped


def test_cli_mixed_batch_rows_equal_each_adapter_run_alone(folders, capsys):
    prompts, adapters = ["x = ", "import o", "Th"], [folders / "ad0", "__base__", folders / "ad1"]
    args = ["--model", folders / "model", "--max-new-tokens", 8]
    mixed = cli_rows(capsys, args + sum([["--adapter", a, "--prompt", p] for a, p in zip(adapters, prompts)], []))
    for a, p, row in zip(adapters, prompts, mixed):
        single = cli_rows(capsys, args + ([] if a == "__base__" else ["--adapter", a]) + ["--prompt", p])
        assert single == [row]
    base = cli_rows(capsys, args + ["--prompt", prompts[0]])
    assert base != mixed[:1]                                     # the adapter changes the text


def test_cli_sampling_is_seeded(folders, capsys):
    args = ["--model", folders / "model", "--prompt", "ab", "--max-new-tokens", 8, "--temperature", 1.5,
            "--top-k", 50, "--top-p", 0.95]
    assert cli_rows(capsys, args + ["--seed", 1]) == cli_rows(capsys, args + ["--seed", 1])


@pytest.mark.parametrize("case, match", [
    ("wide", "shape"),
    ("targets", "does not fit the model"),
    ("no_config", "config.json"),
    ("long", "longer than the model's context of 24"),
    ("long_new", r"\+ --max-new-tokens 4 exceeds the model's context of 24 positions; ask for at most 2"),
    ("empty", "empty prompt"),
    ("zero_new", "--max-new-tokens must be >= 1"),
    ("top_p", r"--top-p must lie in \(0, 1\]"),
    ("count", "need one --prompt or --chat each"),
])
def test_cli_bad_input_is_one_line_and_exit_2(folders, tmp_path, capsys, case, match):
    args = {"model": folders / "model", "prompt": "ab", "max-new-tokens": 4}
    extra = []
    if case == "wide":
        extra = ["--adapter", folders / "wide"]
    elif case == "targets":
        extra = ["--adapter", folders / "mlp"]                   # an MLP's adapter: target_modules ['0']
    elif case == "no_config":
        args["model"] = tmp_path
    elif case == "long":
        args["prompt"] = "x" * 24                                # + BOS: 25 tokens
    elif case == "long_new":
        args["prompt"] = "x" * 21                                # + BOS: 22 tokens, room for 2 more
    elif case == "empty":
        args["prompt"] = ""
    elif case == "zero_new":
        args["max-new-tokens"] = 0
    elif case == "top_p":
        extra = ["--top-p", 1.5]
    elif case == "count":
        extra = ["--adapter", folders / "ad0", "--adapter", folders / "ad1"]
    argv = ["generate"] + sum([[f"--{k}", str(v)] for k, v in args.items()], []) + [str(e) for e in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowrank generate: error: ") and "Traceback" not in err
    assert re.search(match, err), err


def test_stacked_factors_are_reused_only_within_one_generation():
    """Each layer stacks its adapters' factors once per generate call; afterwards a changed weight is
    seen at once (no stale stacks outside generation)."""
    model = lora_llama("float64")
    ids = np.random.default_rng(7).integers(0, 37, (3, 4))
    names = ["a", "b", "a"]
    before = model.generate(ids, max_new_tokens=3, adapter_names=names)
    assert all(layer.stack_cache is None for _, layer in model.lora_layers())
    logits = model.forward(ids, adapter_names=names)
    for _, layer in model.lora_layers():
        layer.lora_B["a"].data *= 3                                       # in place, as an optimizer would
    changed = model.forward(ids, adapter_names=names)
    assert np.abs(changed[0] - logits[0]).max() > 1e-6 and np.allclose(changed[1], logits[1])
    after = model.generate(ids, max_new_tokens=3, adapter_names=names)            # built from the new weights
    assert after.shape == before.shape
    np.testing.assert_array_equal(after, greedy_without_cache(lambda x: model.forward(x, adapter_names=names), ids, 3))


def test_stacked_B_factors_are_laid_out_as_the_kernels_read_them():
    """BGMV's expand reads B_kᵀ row by row; the plan stores B_stack (K, D_out, r) over a C-contiguous
    (K, r, D_out), so the kernels' ``B_stack.transpose(0, 2, 1)`` is that memory (no copy per step),
    and each B_k still equals its adapter's lora_B."""
    from lowrank.tuners.lora.mixed import mixed_plan
    model = lora_llama("float32")
    name, layer = next(iter(model.lora_layers()))
    plan = mixed_plan(layer, ("a", "b", "__base__"), True, np.float32, np)
    Bt = plan.B_stack.transpose(0, 2, 1)
    assert Bt.flags.c_contiguous, name
    for i, n in enumerate(plan.names):
        np.testing.assert_array_equal(plan.B_stack[i, :, :layer.r[n]], layer.lora_B[n].data)


# -- absurd sampling settings and sizes (issue #29) --------------------------------------------
def test_a_tiny_temperature_is_greedy_not_token_0():
    """T -> 0 is the argmax's limit; logits / 1e-308 used to overflow to inf, give NaN probabilities and
    draw token 0 every step."""
    logits = np.array([[0.5, 3.0, -1.0, 2.0], [9.0, -2.0, 9.5, 0.0]])
    for T in (1e-308, 5e-324, 1e-30):
        got = pick(logits, True, temperature=T, rng=np.random.default_rng(0))
        np.testing.assert_array_equal(got, [1, 2])
        got = pick(logits, True, temperature=T, top_k=2, top_p=0.5, rng=np.random.default_rng(0))
        np.testing.assert_array_equal(got, [1, 2])
    model = tiny_llama()
    ids = np.random.default_rng(2).integers(0, V, (2, 4))
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=5, do_sample=True, temperature=1e-308, seed=0),
                                  model.generate(ids, max_new_tokens=5))


@pytest.mark.parametrize("kwargs, match", [
    (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number > 0"),
    (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(eos_token_id=10 ** 30), r"eos_token_id must be token ids in \[0, 37\).*, got 10{30}$"),
    (dict(eos_token_id=[3, -1]), r"eos_token_id must be token ids in \[0, 37\)"),
    (dict(eos_token_id=V), r"eos_token_id must be token ids in \[0, 37\)"),
    (dict(eos_token_id=2.5), r"eos_token_id must be token ids"),
    (dict(eos_token_id=3, pad_token_id=V), r"pad_token_id must be a token id in \[0, 37\)"),
])
def test_absurd_sampling_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_llama().generate(np.array([[1, 2, 3]]), max_new_tokens=2, **kwargs)


def test_the_kv_cache_grows_with_the_tokens_generated_not_max_new_tokens():
    """A huge max_new_tokens that EOS cuts short allocates what the generated tokens need: the cache for
    10**6 positions would be 2·L·B·H_kv·T·h·8 = 2·2·1·2·10**6·4·8 bytes = 256 MB."""
    import tracemalloc
    model = tiny_llama(max_position_embeddings=10 ** 6 + 8)
    ids = np.random.default_rng(0).integers(0, V, (1, 5))
    free = model.generate(ids, max_new_tokens=8)
    eos = int(free[0, 8])                                        # the 4th new token
    tracemalloc.start()
    try:
        got = model.generate(ids, max_new_tokens=10 ** 6, eos_token_id=eos)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, free[:, :9])
    assert peak < 1_000_000, peak


def test_the_cache_reallocates_geometrically_and_keeps_what_it_holds():
    from lowrank.nn.kv_cache import KVCache
    model = tiny_llama(max_position_embeddings=64)
    ids = np.random.default_rng(0).integers(0, V, (2, 3))
    caches = []
    real = KVCache.for_model
    import lowrank.models.llama.generation as generation
    generation.KVCache.for_model = lambda *a, **k: caches.append(real(*a, **k)) or caches[-1]
    try:
        got = model.generate(ids, max_new_tokens=40)
    finally:
        generation.KVCache.for_model = real
    np.testing.assert_array_equal(got, greedy_without_cache(model.forward, ids, 40))   # grown caches hold the past
    cache, = caches
    assert cache.length == 3 + 39 and cache.max_length == 43
    assert cache.length <= cache.capacity < 2 * cache.length           # doubled as needed, never the whole bound


def test_cli_a_tiny_temperature_generates_the_greedy_text_not_nul_bytes(capsys):
    """On the shipped model --temperature 1e-308 used to overflow to inf, sample token 0 every step and print
    "hi\\x00\\x00..."."""
    args = ["--model", SHIPPED, "--prompt", "hi", "--max-new-tokens", 8]
    assert cli_rows(capsys, args + ["--temperature", 1e-308]) == cli_rows(capsys, args + ["--greedy"])


def test_cli_refuses_a_byte_model_whose_embedding_has_ids_without_text_before_generating(folders, tmp_path,
                                                                                        capsys, monkeypatch):
    """ids >= 259 have no bytes: a byte-level folder with vocab_size 300 used to generate, then fail to decode."""
    kw = dict(vocab_size=300, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=24)
    LlamaForCausalLM(LlamaConfig(**kw), seed=0).save_pretrained(tmp_path / "wide_vocab")
    shutil.copy(SHIPPED / BYTE_TOKENIZER_FILE, tmp_path / "wide_vocab")
    monkeypatch.setattr(LlamaForCausalLM, "generate", lambda *a, **k: pytest.fail("generated before the check"))
    assert main(["generate", "--model", str(tmp_path / "wide_vocab"), "--prompt", "ab"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "byte_tokenizer.json" in err and "vocab_size is 300" in err, err
