"""The continuous-batching engine, driven step by step: rows that join mid-run, leave early and use
different adapters each get the tokens they get alone (``generate`` on one prompt), adapters are
evicted and reloaded without changing anyone's output, and a busy adapter refuses to unload."""
import numpy as np
import pytest

import lowrank as lr
from lowrank.io.tokenizer import ByteTokenizer
from lowrank.models.llama import LlamaForCausalLM
from lowrank.serving.engine import AdapterBusy, Engine, QueueFull, Request
from lowrank.tuners.lora.mixed import BASE

from serving_fixtures import MODEL, save_adapters, solo_tokens

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return save_adapters(tmp_path_factory.mktemp("adapters"), 3)


def request(prompt, adapter, max_tokens, events, **kwargs):
    return Request(TOK.encode(prompt), adapter, max_tokens, lambda kind, value: events.append((kind, value)),
                   stop_ids=(TOK.eos_token_id,), **kwargs)


def tokens_of(events):
    return [v for k, v in events if k == "token"]


def run(engine, steps=10_000):
    for _ in range(steps):
        if not (engine.rows or engine.waiting):
            return
        engine.step()


def engine_for(adapters, **kwargs):
    model = LlamaForCausalLM.from_pretrained(MODEL)
    model.eval()
    return Engine(model, {n: str(p) for n, p in adapters.items()}, **kwargs)


CASES = [("def ", "a0", 12), ("import os\n", "a1", 5), ("The ", BASE, 9), ("class Foo(", "a2", 14),
         ("x = ", "a0", 3), ("# a comment that is longer than the others\n", "a1", 10)]


def test_rows_joining_and_leaving_mid_run_get_their_solo_tokens(adapters):
    engine = engine_for(adapters, max_batch=4)
    events = [[] for _ in CASES]
    for i, (prompt, name, n) in enumerate(CASES[:2]):
        engine.submit(request(prompt, name, n, events[i]))
    engine.step()
    engine.step()                                        # the next requests join a running batch
    for i, (prompt, name, n) in enumerate(CASES[2:], start=2):
        engine.submit(request(prompt, name, n, events[i]))
        engine.step()
    run(engine)
    for (prompt, name, n), ev in zip(CASES, events):
        expected = solo_tokens(prompt, None if name == BASE else adapters[name], n)
        assert tokens_of(ev) == expected, (prompt, name)
        assert ev[-1] == ("done", "stop" if expected[-1] == TOK.eos_token_id else "length")
    assert engine.rows == [] and (engine.cache.lengths == 0).all()


def test_evicted_adapters_reload_from_their_files_with_the_same_outputs(adapters):
    engine = engine_for(adapters, max_batch=2, max_adapters=2)
    assert list(engine.loaded) == ["a0", "a1"]
    events = [[] for _ in CASES]
    for i, (prompt, name, n) in enumerate(CASES):
        engine.submit(request(prompt, name, n, events[i]))
    run(engine)
    assert len(engine.loaded) <= 2 and "a2" in engine.loaded       # a2 loaded, something evicted
    for (prompt, name, n), ev in zip(CASES, events):
        assert tokens_of(ev) == solo_tokens(prompt, None if name == BASE else adapters[name], n), (prompt, name)


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_are_unchanged(adapters):
    engine = engine_for(adapters)
    kept, dropped = [], []
    engine.submit(request("def ", "a0", 12, kept))
    r = request("import ", "a1", 50, dropped)
    engine.submit(r)
    engine.step()
    r.cancel()
    engine.step()
    assert dropped[-1] == ("done", "cancelled") and len(engine.rows) == 1
    run(engine)
    assert tokens_of(kept) == solo_tokens("def ", adapters["a0"], 12)


def test_a_seeded_sampled_row_draws_what_generate_draws_alone(adapters):
    model = LlamaForCausalLM.from_pretrained(MODEL)
    runner = lr.LoraModel.from_pretrained(model, adapters["a1"])
    runner.eval()
    ids = np.asarray([TOK.encode("def ")])
    alone = np.asarray(runner.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95,
                                       seed=7))[0, ids.shape[1]:].tolist()
    engine = engine_for(adapters)
    events, other = [], []
    engine.submit(request("x = 1\n", "a2", 10, other))
    engine.submit(request("def ", "a1", 10, events, temperature=0.9, top_p=0.95, seed=7))
    run(engine)
    assert tokens_of(events) == alone


def test_unloading_a_busy_adapter_refuses_without_changing_its_rows_and_the_queue_is_bounded(adapters):
    engine = engine_for(adapters, max_queue=1)
    events = []
    engine.submit(request("def ", "a0", 9, events))
    with pytest.raises(QueueFull):
        engine.submit(request("def ", "a0", 5, []))
    engine.step()
    with pytest.raises(AdapterBusy):
        engine.unregister("a0")
    run(engine)
    assert tokens_of(events) == solo_tokens("def ", adapters["a0"], 9)
    engine.unregister("a0")
    assert "a0" not in engine.paths and "a0" not in engine.loaded
    late = []                                                 # checked before the unload, queued after it
    engine.submit(request("def ", "a0", 5, late))
    run(engine)
    assert [kind for kind, _ in late] == ["missing"]


def test_the_batch_is_bounded_and_waiting_rows_join_as_others_leave(adapters):
    engine = engine_for(adapters, max_batch=2)
    events = [[] for _ in CASES]
    for i, (prompt, name, n) in enumerate(CASES):
        engine.submit(request(prompt, name, n, events[i]))
    sizes = []
    while engine.rows or engine.waiting:
        engine.step()
        sizes.append(len(engine.rows))
    assert max(sizes) == 2 and len(engine.waiting) == 0
    for (prompt, name, n), ev in zip(CASES, events):
        assert tokens_of(ev) == solo_tokens(prompt, None if name == BASE else adapters[name], n), (prompt, name)


def test_an_adapter_registered_while_serving_keeps_max_adapters_stacked(adapters, tmp_path):
    extra = save_adapters(tmp_path, 4, seed=5)["a3"]
    engine = engine_for({n: adapters[n] for n in ("a0", "a1")}, max_adapters=2)
    engine.register("a3", str(extra))
    assert len(engine.loaded) == 2 and "a3" in engine.loaded and set(engine.paths) == {"a0", "a1", "a3"}
    events = [[] for _ in range(3)]
    for ev, name in zip(events, ("a0", "a1", "a3")):
        engine.submit(request("def ", name, 6, ev))
    run(engine)
    assert len(engine.loaded) <= 2
    for ev, path in zip(events, (adapters["a0"], adapters["a1"], extra)):
        assert tokens_of(ev) == solo_tokens("def ", path, 6)


@pytest.mark.parametrize("budget, joins", [(None, [2, 4]), (16, [2, 2, 1, 1]), (4, [1, 1, 1, 1, 1, 1])])
def test_prompts_join_within_the_steps_prefill_budget(adapters, budget, joins):
    engine = engine_for(adapters, max_prefill_tokens=budget)
    events = [[] for _ in CASES]
    per_step = []
    for group in (CASES[:2], CASES[2:]):                      # prompts of 5, 11 | 5, 11, 5 and 45 tokens
        for prompt, name, n in group:
            engine.submit(request(prompt, name, n, events[CASES.index((prompt, name, n))]))
        while engine.waiting:
            before = len(engine.waiting)
            engine.step()
            per_step.append(before - len(engine.waiting))
    assert per_step == joins                                  # one prompt always joins, others within the budget
    run(engine)
    for (prompt, name, n), ev in zip(CASES, events):
        assert tokens_of(ev) == solo_tokens(prompt, None if name == BASE else adapters[name], n), (prompt, name)


@pytest.mark.parametrize("cases, forwards", [(CASES[:3], 1), ([CASES[0], CASES[4], CASES[5]], 2)])
def test_the_steps_joiners_prefill_together_and_their_first_tokens_go_out_after(adapters, cases, forwards):
    engine = engine_for(adapters)
    log = []
    forward = engine.model.model.forward
    engine.model.model.forward = lambda *args, **kwargs: (log.append("prefill"), forward(*args, **kwargs))[1]
    events = [[] for _ in cases]
    for (prompt, name, n), ev in zip(cases, events):
        engine.submit(request(prompt, name, n, ev))
        engine.submit(Request(TOK.encode(prompt), name, n, lambda kind, value: log.append(kind)))
    engine.step()             # six join (5, 11, 5 tokens: one batch; 5, 5, 45: two), then one decode step
    assert log == ["prefill"] * forwards + ["token"] * 3 + ["token"] * 3     # the logged three of the six
    run(engine)
    for (prompt, name, n), ev in zip(cases, events):
        assert tokens_of(ev) == solo_tokens(prompt, None if name == BASE else adapters[name], n), (prompt, name)


def test_requests_arriving_during_a_prefill_join_the_same_step(adapters):
    engine = engine_for(adapters)
    log, events = [], [[] for _ in CASES[:3]]
    forward = engine.model.model.forward

    def prefill(*args, **kwargs):
        log.append("prefill")
        if len(log) == 1:                          # a client's request lands while the first prompts prefill
            engine.submit(request(*CASES[2], events[2]))
        return forward(*args, **kwargs)

    engine.model.model.forward = prefill
    for case, ev in zip(CASES[:2], events):
        engine.submit(request(*case, ev))
    engine.step()
    assert log == ["prefill", "prefill"] and len(engine.rows) == 3 and not engine.waiting
    assert [len(tokens_of(ev)) for ev in events] == [2, 2, 2]      # first tokens after both prefills, then a decode
    run(engine)
    for (prompt, name, n), ev in zip(CASES, events):
        assert tokens_of(ev) == solo_tokens(prompt, None if name == BASE else adapters[name], n), (prompt, name)
