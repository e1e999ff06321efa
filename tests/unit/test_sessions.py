"""The exactly-once session table: duplicates, pruning, expiry, bounds, snapshots."""

from __future__ import annotations

import random

import msgpack
import pytest

from zkv.protocol.messages import CasReply, DeleteReply, PutReply
from zkv.storage_node.sessions import SessionStatus, SessionTable

NEW, EXPIRED = SessionStatus.NEW, SessionStatus.EXPIRED


def write(table: SessionTable, client: bytes, rid: int, lowest: int, ts: int):
    """What the state machine does for one write: lookup, and record if new."""
    seen = table.lookup(client, rid, ts)
    if seen is NEW:
        table.record(client, rid, lowest, PutReply(rid, rid * 10))
    return seen


def test_duplicate_returns_the_cached_reply():
    t = SessionTable()
    assert write(t, b"a", 1, 1, 0) is NEW
    assert t.lookup(b"a", 1, 0) == PutReply(1, 10)
    assert t.lookup(b"a", 2, 0) is NEW
    assert t.lookup(b"b", 1, 0) is NEW


def test_lowest_pending_prunes_and_expires_below_it():
    t = SessionTable()
    for rid in (1, 2, 3):
        write(t, b"a", rid, 1, 0)
    write(t, b"a", 4, 3, 0)  # the client got the answers to 1 and 2
    assert t.lookup(b"a", 1, 0) is EXPIRED
    assert t.lookup(b"a", 2, 0) is EXPIRED
    assert t.lookup(b"a", 3, 0) == PutReply(3, 30)
    assert t.lookup(b"a", 4, 0) == PutReply(4, 40)
    assert t.lookup(b"a", 5, 0) is NEW


def test_out_of_order_requests_are_still_recognised():
    t = SessionTable()
    write(t, b"a", 5, 3, 0)
    write(t, b"a", 3, 3, 0)  # applied after 5: both pending
    write(t, b"a", 4, 3, 0)
    assert [t.lookup(b"a", r, 0) for r in (3, 4, 5)] == [PutReply(r, r * 10) for r in (3, 4, 5)]


def test_replies_per_client_are_bounded():
    t = SessionTable(replies_per_client_max=3)
    for rid in range(1, 6):
        write(t, b"a", rid, 1, 0)
    assert [t.lookup(b"a", r, 0) for r in (3, 4, 5)] == [PutReply(r, r * 10) for r in (3, 4, 5)]
    assert t.lookup(b"a", 1, 0) is EXPIRED  # dropped: it may have applied, so never again
    assert t.lookup(b"a", 2, 0) is EXPIRED
    assert t.lookup(b"a", 6, 0) is NEW


def test_clients_are_bounded_least_recently_active_first():
    t = SessionTable(clients_max=2)
    write(t, b"a", 1, 1, 0)
    write(t, b"b", 1, 1, 0)
    assert t.lookup(b"a", 1, 0) == PutReply(1, 10)  # a is now the most recently active
    write(t, b"c", 1, 1, 0)
    assert len(t) == 2
    assert b"b" not in t and b"a" in t and b"c" in t


def test_idle_clients_expire_by_leader_time():
    t = SessionTable(session_ttl_ms=1000)
    write(t, b"a", 1, 1, 0)
    write(t, b"b", 1, 1, 600)
    write(t, b"c", 1, 1, 999)
    assert len(t) == 3
    write(t, b"c", 2, 1, 1000)  # a has been idle 1000 ms
    assert b"a" not in t and b"b" in t
    assert t.lookup(b"a", 1, 1000) is NEW  # a forgotten client is new again
    write(t, b"c", 3, 1, 1700)
    assert b"b" not in t and b"c" in t


def test_time_never_goes_back():
    t = SessionTable(session_ttl_ms=1000)
    write(t, b"a", 1, 1, 5000)
    write(t, b"b", 1, 1, 100)  # a new leader with a slower clock
    assert t.now_ms == 5000
    write(t, b"b", 2, 1, 5999)
    assert b"a" in t and b"b" in t
    write(t, b"b", 3, 1, 6000)
    assert b"a" not in t and b"b" in t  # b was stamped at 5000 (the table's time)


def test_bounds_must_be_positive():
    with pytest.raises(ValueError):
        SessionTable(replies_per_client_max=0)


def random_history(seed: int, table: SessionTable) -> None:
    rng = random.Random(seed)
    floors: dict[bytes, int] = {}
    for step in range(2000):
        client = b"c%d" % rng.randrange(20)
        low = floors.get(client, 1)
        rid = low + rng.randrange(6)
        if rng.random() < 0.3:
            floors[client] = low = low + 1
        seen = table.lookup(client, rid, step * 7)
        if seen is NEW:
            kind = rng.randrange(3)
            reply = (
                PutReply(rid, step) if kind == 0
                else DeleteReply(rid, rng.random() < 0.5, step) if kind == 1
                else CasReply(rid, rng.random() < 0.5, step)
            )  # fmt: skip
            table.record(client, rid, min(low, rid), reply)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("use_list", [True, False])
def test_snapshot_round_trip(seed, use_list):
    kw = dict(replies_per_client_max=4, clients_max=12, session_ttl_ms=3000)
    t = SessionTable(**kw)
    random_history(seed, t)
    restored = SessionTable(**kw)
    restored.load_state(msgpack.unpackb(msgpack.packb(t.to_state()), use_list=use_list))
    assert restored == t
    random_history(seed + 100, t)  # and they go on identically
    random_history(seed + 100, restored)
    assert restored == t


def test_replicas_agree():
    a, b = SessionTable(clients_max=5), SessionTable(clients_max=5)
    random_history(7, a)
    random_history(7, b)
    assert a.to_state() == b.to_state()


@pytest.mark.parametrize("state", [None, [1], [1, [[b"c", 1, 1, [21, 1, False]]]], [1, [["c", 1, 1, []]]],
                                   [1, [[b"c", 1, 1, [99, 1, False, 1]]]]])  # fmt: skip
def test_malformed_state_is_refused_and_changes_nothing(state):
    t = SessionTable()
    write(t, b"a", 1, 1, 0)
    before = t.to_state()
    with pytest.raises(ValueError):
        t.load_state(state)
    assert t.to_state() == before
