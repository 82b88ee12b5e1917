"""benchmarks.harness: interleaved timing, and settling, which keeps what one variant leaves running
(OpenBLAS's spinning workers after lowrank's GEMMs) out of the next variant's timed sample."""
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
