"""Watch history: what the state machine records, its bounds, prefix filter, compaction,
and polling: a resume from any revision gives exactly the events after it."""

from __future__ import annotations

import random

import pytest

from tests.unit.test_rebalance import FakeCluster
from tests.unit.test_state_machine import Driver
from zkv.ops.rebalance import Rebalancer
from zkv.storage_node.multikey_commands import MultiKind, MultiWrite
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.ttl_commands import PutTtlCommand, SweepCommand
from zkv.storage_node.watch_history import (
    DELETE,
    EVENT_OVERHEAD_BYTES,
    EXPIRE,
    PUT,
    Compacted,
    WatchHistory,
)

T0 = 1_700_000_000_000


def events(sm: KVStateMachine, after: int = 0, prefix: bytes = b"") -> list[tuple]:
    out, _ = sm.history.poll(after, prefix, False, sm.applied_index, 10**9, 10**12)
    return out


def test_single_writes_record_what_changed_and_nothing_else() -> None:
    d = Driver()
    d.put(b"a", b"1")  # 1
    d.put(b"a", b"2")  # 2
    d.cas(b"a", 1, b"no")  # 3: fails, no event
    d.cas(b"a", 2, b"3")  # 4
    d.delete(b"a", expected=99)  # 5: fails
    d.delete(b"a")  # 6
    d.delete(b"a")  # 7: nothing to delete
    d.put(b"b", b"x", rid=1)  # 8: request id 1 already used: deduplicated
    assert events(d.sm) == [(1, PUT, b"a", b"1", 1), (2, PUT, b"a", b"2", 2),
                            (4, PUT, b"a", b"3", 4), (6, DELETE, b"a", b"", 6)]


def test_batches_record_one_event_per_key_and_sweeps_expire() -> None:
    sm = KVStateMachine()
    sm.apply_command(1, MultiWrite(b"c", 1, 1, T0, MultiKind.PUT, (b"a", b"b"), (b"1", b"2")))
    sm.apply_command(2, MultiWrite(b"c", 2, 2, T0, MultiKind.DELETE, (b"a", b"zz")))
    sm.apply_command(3, PutTtlCommand(b"c", 3, 3, T0, b"t", b"v", T0 + 10))
    sm.apply_command(4, PutTtlCommand(b"c", 4, 4, T0, b"u", b"v", T0 + 10))
    sm.apply_command(5, SweepCommand(T0 + 5, (b"t",)))  # not expired yet: nothing
    sm.apply_command(6, SweepCommand(T0 + 20, (b"t",)))
    # a write finds ``u`` expired: it expired before the write
    sm.apply_command(7, MultiWrite(b"c", 5, 5, T0 + 30, MultiKind.DELETE, (b"u",)))
    assert events(sm) == [
        (1, PUT, b"a", b"1", 1), (1, PUT, b"b", b"2", 1), (2, DELETE, b"a", b"", 2),
        (3, PUT, b"t", b"v", 3), (4, PUT, b"u", b"v", 4), (6, EXPIRE, b"t", b"", 6),
        (7, EXPIRE, b"u", b"", 7),
    ]


def test_prefix_and_exact_filters() -> None:
    d = Driver()
    for k in (b"app/1", b"app", b"apple", b"b/app"):
        d.put(k, b"v")
    sm = d.sm
    assert [e[2] for e in events(sm, prefix=b"app")] == [b"app/1", b"app", b"apple"]
    exact, covered = sm.history.poll(0, b"app", True, sm.applied_index, 100, 10**6)
    assert [e[2] for e in exact] == [b"app"] and covered == 4


def test_no_events_for_keys_moved_by_a_shard_move_or_dropped() -> None:
    c = FakeCluster([0])
    for i in range(40):
        c.put(f"k{i}".encode(), b"x")
    before = events(c.sms[0])
    c.add(1)
    Rebalancer(c, poll_s=0).add_shard(1)  # type: ignore[arg-type]
    assert c.sms[1].data and not events(c.sms[1])  # keys copied in: no events
    assert events(c.sms[0]) == before  # keys dropped at the source: no events
    moved = next(k for k in c.sms[1].data)
    c.put(moved, b"new")  # a write at the new owner is an event there
    assert [(e[1], e[2], e[3]) for e in events(c.sms[1])] == [(PUT, moved, b"new")]


def test_bounds_by_count_and_bytes_compact_whole_prefixes() -> None:
    h = WatchHistory(events_max=3, bytes_max=10**6)
    for rev in range(1, 6):
        h.record(rev, PUT, b"k", b"v", rev)
    assert len(h) == 3 and h.floor == 2
    with pytest.raises(Compacted) as err:
        h.poll(1, b"", False, 5, 10, 10**6)
    assert err.value.floor == 2
    assert [e[0] for e in h.poll(2, b"", False, 5, 10, 10**6)[0]] == [3, 4, 5]
    h = WatchHistory(events_max=100, bytes_max=3 * (EVENT_OVERHEAD_BYTES + 2))
    for rev in range(1, 10):
        h.record(rev, PUT, b"k", b"v", rev)
        assert h.size_bytes <= h.bytes_max
    assert 2 <= len(h) <= 3 and h.floor == 9 - len(h)
    for rev in range(10, 5000):  # the dropped prefix is freed now and then
        h.record(rev, PUT, b"k", b"v", rev)
    assert len(h._events) < 2100


def test_a_restored_snapshot_has_no_history_before_it() -> None:
    d = Driver()
    for i in range(5):
        d.put(b"k", str(i).encode())
    blob = d.sm.snapshot_bytes()
    sm = KVStateMachine()
    sm.restore(blob)
    assert sm.history.floor == 5 and len(sm.history) == 0
    with pytest.raises(Compacted):
        sm.history.poll(4, b"", False, 5, 10, 10**6)
    assert sm.history.poll(5, b"", False, 5, 10, 10**6) == ([], 5)


def test_a_page_never_splits_a_revision_and_covers_what_it_says() -> None:
    h = WatchHistory()
    h.record(1, PUT, b"a", b"", 1)
    for k in (b"a", b"b", b"c"):  # one batch
        h.record(2, PUT, k, b"", 2)
    h.record(3, PUT, b"a", b"", 3)
    page, covered = h.poll(0, b"", False, 3, limit=2, bytes_max=10**6)
    assert [e[0] for e in page] == [1, 2, 2, 2] and covered == 2
    page, covered = h.poll(2, b"", False, 9, limit=2, bytes_max=10**6)
    assert [e[0] for e in page] == [3] and covered == 9  # read to the end: applied
    assert h.poll(9, b"", False, 9, 2, 10**6) == ([], 9)
    assert h.poll(12, b"", False, 9, 2, 10**6) == ([], 12)  # a replica behind the token


@pytest.mark.parametrize("seed", range(5))
def test_resume_from_every_revision_gives_exactly_the_events_after_it(seed: int) -> None:
    rng = random.Random(seed)
    d = Driver()
    keys = [b"p/a", b"p/b", b"q/a", b"p"]
    for _ in range(300):
        r = rng.random()
        k = rng.choice(keys)
        if r < 0.6:
            d.put(k, str(rng.random()).encode())
        elif r < 0.8:
            d.delete(k)
        else:
            d.cas(k, rng.randrange(0, d.index + 1), b"c")
    sm = d.sm
    reference = [e for e in events(sm) if e[2].startswith(b"p/")]
    for start in range(0, sm.applied_index + 1):
        got: list[tuple] = []
        after = start
        limit = rng.randint(1, 7)
        while True:  # page through, resuming from each page's covered revision
            page, covered = sm.history.poll(after, b"p/", False, sm.applied_index, limit,
                                            rng.choice((1, 10**6)), examined_max=5)
            assert covered >= after
            got.extend(page)
            if covered == after == sm.applied_index:
                break
            after = covered
        assert got == [e for e in reference if e[0] > start]


def test_a_full_history_trims_a_sixteenth_at_a_time() -> None:
    """Recording stays O(1) amortized once full: one trim per events_max/16 records, and
    the dropped prefix is freed from the list now and then."""
    class Counting(WatchHistory):
        __slots__ = ("trims",)

        def _trim(self) -> None:
            self.trims += 1
            super()._trim()

    h = Counting(events_max=1600)
    h.trims = 0
    for rev in range(1, 20_001):
        h.record(rev, PUT, b"k", b"v", rev)
    assert h.trims <= 20_000 // 100 + 1 and len(h) <= 1600
    assert len(h._events) <= 2 * 1600 + 1024


def test_dropped_events_release_their_values_at_once() -> None:
    """A dropped event's slot stayed in the list until the lazy compaction (after 1,024
    drops): with 1 MiB values that kept up to 1 GiB alive past the bytes bound (seen as
    a node's RSS tripling in tests/process/test_limits.py)."""
    h = WatchHistory(events_max=1000, bytes_max=3 * (EVENT_OVERHEAD_BYTES + 10))
    for rev in range(1, 50):
        h.record(rev, PUT, b"k", b"v" * 10, rev)
    held = [e for e in h._events if e[3]]
    assert len(held) == len(h) <= 3 and sum(len(e[3]) for e in h._events) <= 30
