"""benchmarks.harness: interleaved timing, and settling, which keeps what one variant leaves running
(OpenBLAS's spinning workers after lowrank's GEMMs) out of the next variant's timed sample."""
import threading
import time

from benchmarks import harness

PENALTY_S = 0.03


def variants_that_disturb_each_other():
    """Two variants whose first call after the other one pays PENALTY_S (a stand-in for a thread pool
    the other left spinning); a call after one of its own costs nothing."""
    last = {"name": None}

    def make(name):
        def fn():
            disturbed = last["name"] not in (None, name)
            last["name"] = name
            if disturbed:
                time.sleep(PENALTY_S)
        return fn
    return {"a": make("a"), "b": make("b")}


def test_without_settling_the_other_variants_leftovers_land_in_the_timing():
    res = harness.interleaved(variants_that_disturb_each_other(), rounds=4, base="a", target_s=0.0)
    assert max(res["a"]["samples_s"] + res["b"]["samples_s"]) >= PENALTY_S


def test_settling_keeps_them_out():
    res = harness.interleaved(variants_that_disturb_each_other(), rounds=4, base="a", target_s=0.0, settle_s=1e-6)
    assert max(res["a"]["samples_s"] + res["b"]["samples_s"]) < PENALTY_S / 3
    assert res["b"]["rounds"] == 4 and len(res["b"]["samples_s"]) == 4


def test_settle_runs_for_at_least_the_time_asked_and_at_least_once():
    calls = []
    t0 = time.perf_counter()
    harness.settle(lambda: calls.append(1), 0.02)
    assert time.perf_counter() - t0 >= 0.02 and len(calls) >= 1
    calls.clear()
    harness.settle(lambda: calls.append(1), 0.0)
    assert calls == [1]


def test_bandwidth_splits_cover_every_item_once_on_that_many_threads():
    """The copy and read bandwidths run on the pinned thread count: each item in exactly one slice, each slice on
    its own thread."""
    for threads, size in ((1, 10), (2, 10), (3, 7)):
        seen, names = [], set()

        def work(s):
            seen.extend(range(size)[s])
            names.add(threading.current_thread().name)
            time.sleep(0.01)                 # so that no thread takes two slices
        with harness._split(threads, size, work) as run:
            run()
        assert sorted(seen) == list(range(size)) and len(names) == threads
    for threads in (1, 2):
        assert harness.copy_bandwidth_gbs(4, 2, threads) > 0 and harness.read_bandwidth_gbs(4, 2, threads) > 0
