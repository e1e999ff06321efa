"""The linearizability checker and the history recorder: known-good, known-bad, properties."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.histgen import generate
from tests.support.history import History
from tests.support.lincheck import check

pytestmark = pytest.mark.unit


class Script:
    """Tiny DSL: ``s.call(p, "put", "k", "a")`` ... ``s.ok(p, 1)``; one open op per process."""

    def __init__(self) -> None:
        clock = iter(range(1, 10**9))
        self.h = History(clock=lambda: next(clock))
        self.open: dict[int, int] = {}

    def call(self, p: int, op: str, key: str = "k", value=None, expected=None) -> Script:
        self.open[p] = self.h.invoke(p, op, key, value, expected)
        return self

    def ok(self, p: int, result=None) -> Script:
        self.h.ok(self.open.pop(p), result)
        return self

    def info(self, p: int) -> Script:
        self.h.info(self.open.pop(p))
        return self

    def fail(self, p: int) -> Script:
        self.h.fail(self.open.pop(p))
        return self

    def seq(self, p: int, op: str, key: str = "k", value=None, expected=None, result=None):
        return self.call(p, op, key, value, expected).ok(p, result)


# --------------------------------------------------------------------------- good


def test_empty_history_is_linearizable():
    assert check(History()).ok


def test_sequential():
    s = Script()
    s.seq(0, "get", result=(None, 0))
    s.seq(0, "put", value="a", result=1)
    s.seq(1, "get", result=("a", 1))
    s.seq(1, "cas", value="b", expected=1, result=(True, 2))
    s.seq(0, "cas", value="c", expected=1, result=(False, 2))
    s.seq(0, "get", result=("b", 2))
    s.seq(2, "delete", result=True)
    s.seq(2, "delete", result=False)
    s.seq(1, "get", result=(None, 0))
    s.seq(1, "cas", value="d", expected=0, result=(True, 7))
    s.seq(1, "get", result=("d", 7))
    res = check(s.h)
    assert res.ok, res.explanation
    assert res.ops_checked == 11


def test_concurrent_overlapping_reads_may_see_either():
    s = Script()
    s.seq(0, "put", value="a", result=1)
    s.call(0, "put", value="b")
    s.call(1, "get").ok(1, ("a", 1))  # before b takes effect
    s.call(2, "get").ok(2, ("b", 2))  # after
    s.ok(0, 2)
    s.seq(1, "get", result=("b", 2))
    assert check(s.h).ok


def test_concurrent_writes_any_order():
    s = Script()
    s.call(0, "put", value="a").call(1, "put", value="b")
    s.ok(1, 1).ok(0, 2)  # a linearized after b even though b returned first
    s.seq(2, "get", result=("a", 2))
    assert check(s.h).ok


def test_info_write_that_applied_later():
    s = Script()
    s.seq(0, "put", value="a", result=1)
    s.call(1, "put", value="b").info(1)
    s.seq(0, "get", result=("a", 1))  # not yet applied
    s.seq(2, "get", result=("b", 5))  # applied now: its version is bound here
    s.seq(0, "get", result=("b", 5))
    s.seq(0, "cas", value="c", expected=5, result=(True, 6))
    assert check(s.h).ok


def test_info_write_that_never_applied():
    s = Script()
    s.seq(0, "put", value="a", result=1)
    s.call(1, "put", value="b").info(1)
    s.call(1, "delete").info(1)
    s.seq(0, "get", result=("a", 1))
    s.seq(2, "get", result=("a", 1))
    assert check(s.h).ok


def test_info_cas_branches_on_unknown_version():
    s = Script()
    s.call(1, "put", value="a").info(1)  # version unknown
    s.call(1, "cas", value="b", expected=4).info(1)  # swapped only if that version is 4
    s.seq(0, "get", result=("b", 9))
    assert check(s.h).ok


def test_failed_ops_are_ignored():
    s = Script()
    s.seq(0, "put", value="a", result=1)
    s.call(1, "put", value="zzz").fail(1)
    s.seq(0, "get", result=("a", 1))
    assert check(s.h).ok


def test_keys_are_checked_independently():
    s = Script()
    s.seq(0, "put", "x", value="a", result=1)
    s.seq(0, "put", "y", value="b", result=2)
    s.seq(1, "get", "x", result=("a", 1))
    s.seq(1, "get", "y", result=("b", 2))
    res = check(s.h)
    assert res.ok and res.ops_checked == 4


# --------------------------------------------------------------------------- bad


def _bad(s: Script, key: str = "k") -> str:
    res = check(s.h)
    assert not res.ok and not res.unknown
    assert res.key == key
    assert "not linearizable" in res.explanation
    return res.explanation


def test_stale_read_after_acknowledged_write():
    s = Script()
    s.seq(0, "put", value="a", result=1)
    s.seq(0, "put", value="b", result=2)
    s.seq(1, "get", result=("a", 1))
    text = _bad(s)
    assert "get" in text


def test_read_of_a_value_never_written():
    s = Script()
    s.seq(0, "put", value="a", result=1)
    s.seq(1, "get", result=("ghost", 1))
    _bad(s)


def test_reads_seeing_writes_in_opposite_orders():
    s = Script()
    s.call(0, "put", value="a").call(1, "put", value="b")
    s.seq(2, "get", result=("a", 1))
    s.seq(2, "get", result=("b", 2))
    s.seq(3, "get", result=("b", 2))
    s.seq(3, "get", result=("a", 1))
    s.ok(0, 1).ok(1, 2)
    _bad(s)


def test_reads_in_opposite_orders_without_versions():
    s = Script()
    s.call(0, "put", value="a").call(1, "put", value="b")
    s.call(2, "get").ok(2, "a")
    s.call(3, "get").ok(3, "b")
    s.call(2, "get").ok(2, "b")
    s.call(3, "get").ok(3, "a")
    s.ok(0).ok(1)
    _bad(s)


def test_cas_succeeding_on_a_stale_version():
    s = Script()
    s.seq(0, "put", value="a", result=1)
    s.seq(0, "put", value="b", result=2)
    s.seq(1, "cas", value="c", expected=1, result=(True, 3))
    _bad(s)


def test_lost_acknowledged_write():
    s = Script()
    s.seq(0, "put", value="a", result=1)
    s.seq(1, "put", value="b", result=2)
    s.seq(2, "get", result=("a", 1))
    s.seq(2, "get", result=("a", 1))
    _bad(s)


def test_versions_must_grow():
    s = Script()
    s.seq(0, "put", value="a", result=5)
    s.seq(0, "put", value="b", result=3)
    _bad(s)


def test_delete_result_must_match_presence():
    s = Script()
    s.seq(0, "delete", result=True)
    _bad(s)


def test_conditional_delete_good_histories():
    s = Script()
    s.seq(0, "put", value="a", result=1)
    s.seq(0, "delete", expected=7, result=(False, 1))  # mismatch: still there
    s.seq(0, "get", result=("a", 1))
    s.seq(0, "delete", expected=1, result=(True, 3))
    s.seq(0, "delete", expected=1, result=(False, 0))  # absent
    s.seq(0, "put", value="b", result=4)
    assert check(s.h).ok
    # two racing conditional deletes at the same version: exactly one may win
    r = Script()
    r.seq(0, "put", value="a", result=1)
    r.call(0, "delete", expected=1).call(1, "delete", expected=1)
    r.ok(1, (True, 2)).ok(0, (False, 0))
    assert check(r.h).ok
    # an info put leaves the version unknown: a mismatch reply binds it
    u = Script()
    u.seq(0, "put", value="a", result=1)
    u.call(1, "put", value="b").info(1)
    u.seq(0, "delete", expected=1, result=(False, 5))
    u.seq(0, "get", result=("b", 5))
    assert check(u.h).ok


def test_conditional_delete_bad_histories():
    both = Script()  # two deletes at one version both winning: not atomic
    both.seq(0, "put", value="a", result=1)
    both.call(0, "delete", expected=1).call(1, "delete", expected=1)
    both.ok(1, (True, 2)).ok(0, (True, 3))
    _bad(both)
    stale = Script()  # deleted although a later write changed the version
    stale.seq(0, "put", value="a", result=1)
    stale.seq(0, "put", value="b", result=2)
    stale.seq(0, "delete", expected=1, result=(True, 3))
    _bad(stale)
    wrong = Script()  # a mismatch must report the current version
    wrong.seq(0, "put", value="a", result=1)
    wrong.seq(0, "delete", expected=4, result=(False, 2))
    _bad(wrong)
    kept = Script()  # a mismatch leaves the key in place
    kept.seq(0, "put", value="a", result=1)
    kept.seq(0, "delete", expected=4, result=(False, 1))
    kept.seq(0, "get", result=(None, 0))
    _bad(kept)
    absent = Script()  # an absent key is not a mismatch
    absent.seq(0, "delete", expected=1, result=(False, 1))
    _bad(absent)


def test_first_failing_key_is_named_with_a_window():
    s = Script()
    s.seq(0, "put", "good", value="a", result=1)
    s.seq(0, "put", "bad", value="a", result=2)
    s.seq(0, "put", "bad", value="b", result=3)
    s.seq(1, "get", "bad", result=("a", 2))
    text = _bad(s, key="bad")
    assert "#3" in text and "#2" in text  # the stuck read and the write it missed


def test_step_limit_reports_unknown_instead_of_hanging():
    h = generate(seed=3, ops_total=400, keys=1, processes=8, info_p=0.3)
    res = check(h, steps_max=50)
    assert not res.ok and res.unknown and res.status == "unknown"


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    ops=st.integers(1, 150),
    keys=st.integers(1, 3),
    procs=st.integers(1, 6),
    info=st.sampled_from([0.0, 0.05, 0.2]),
)
def test_generated_histories_of_a_real_register_are_linearizable(seed, ops, keys, procs, info):
    h = generate(seed, ops_total=ops, keys=keys, processes=procs, info_p=info)
    res = check(h)
    assert res.ok, res.explanation


def _mutate(h: History, rng: random.Random, ghost: bool) -> list | None:
    ops = h.operations()
    reads = [
        i for i, op in enumerate(ops)
        if op.op == "get" and op.status == "ok" and op.result[0] is not None
    ]  # fmt: skip
    if not reads:
        return None
    i = rng.choice(reads)
    op = ops[i]
    if ghost:
        value = "never-written"
    else:
        others = {
            o.value for o in ops
            if o.key == op.key and o.value is not None and o.value != op.result[0]
        }  # fmt: skip
        if not others:
            return None
        value = rng.choice(sorted(others))
    ops[i] = dataclasses.replace(op, result=(value, op.result[1]))
    return ops


def test_mutated_reads_of_a_ghost_value_always_fail():
    rng = random.Random(7)
    for seed in range(40):
        ops = _mutate(generate(seed, ops_total=80, keys=2, processes=4), rng, ghost=True)
        if ops is not None:
            assert not check(ops).ok


def test_mutated_reads_of_another_written_value_mostly_fail():
    rng = random.Random(11)
    tried = failed = 0
    for seed in range(80):
        ops = _mutate(generate(seed, ops_total=80, keys=2, processes=4), rng, ghost=False)
        if ops is None:
            continue
        tried += 1
        failed += not check(ops).ok
    assert tried >= 50
    assert failed >= 0.8 * tried, (failed, tried)


def test_mutated_read_without_versions_mostly_fail():
    rng = random.Random(5)
    tried = failed = 0
    for seed in range(80):
        ops = _mutate(generate(seed, ops_total=60, keys=1, processes=3), rng, ghost=False)
        if ops is None:
            continue
        ops = [
            dataclasses.replace(o, result=o.result[0])
            if o.op == "get" and o.status == "ok" else o
            for o in ops
        ]  # fmt: skip
        tried += 1
        failed += not check(ops).ok
    assert failed >= 0.6 * tried, (failed, tried)


def test_performance_10k_ops_10_keys_8_processes():
    h = generate(seed=42, ops_total=10_000, keys=10, processes=8, info_p=0.02)
    t0 = time.perf_counter()
    res = check(h)
    elapsed = time.perf_counter() - t0
    assert res.ok, res.explanation
    assert res.ops_checked > 9_000
    assert elapsed < 10.0, f"checker took {elapsed:.1f}s"


# --------------------------------------------------------------------------- history


def test_history_orders_events_and_reports_open_ops_as_info():
    h = History()
    a = h.invoke(0, "put", "k", "a")
    b = h.invoke(1, "get", "k")
    h.ok(a, 1)
    ops = {op.op_id: op for op in h.operations()}
    assert ops[a].status == "ok" and ops[a].complete_seq is not None
    assert ops[b].status == "info" and ops[b].complete_seq is None
    events = h.to_events()
    assert [e.kind for e in events] == ["invoke", "invoke", "ok"]
    assert all(x.seq < y.seq for x, y in zip(events, events[1:], strict=False))
    assert events[0].time_ns <= events[-1].time_ns
    with pytest.raises(ValueError):
        h.ok(a, 2)
    with pytest.raises(ValueError):
        h.invoke(0, "increment", "k")


def test_history_json_dump(tmp_path):
    h = History()
    h.ok(h.invoke(0, "put", b"k\xff", b"v"), 1)
    h.info(h.invoke(1, "cas", "k", "w", 1))
    path = tmp_path / "h.json"
    h.dump(str(path))
    data = json.loads(path.read_text())
    assert [e["kind"] for e in data] == ["invoke", "ok", "invoke", "info"]
    assert data[0]["key"] == "6bff"


def test_history_is_thread_safe():
    h = History()

    def worker(p: int) -> None:
        for i in range(500):
            op = h.invoke(p, "put", "k", f"{p}-{i}")
            h.ok(op, i)

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = h.to_events()
    assert len(events) == 8000
    assert len({e.seq for e in events}) == 8000
    assert len(h) == 4000


def test_history_from_asyncio():
    h = History()

    async def client(p: int) -> None:
        for i in range(20):
            op = h.invoke(p, "put", "k", f"{p}-{i}")
            await asyncio.sleep(0)
            h.ok(op, p * 100 + i + 1)

    async def main() -> None:
        await asyncio.gather(*(client(p) for p in range(4)))

    asyncio.run(main())
    assert len(h) == 80
