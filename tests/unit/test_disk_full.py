"""What a node keeps and sends while its disk is full (storage_node/disk_full.py)."""

from __future__ import annotations

from zkv.protocol.messages import (
    AppendEntries,
    AppendReply,
    Entry,
    InstallSnapshot,
    SnapshotReply,
    VoteReply,
    VoteRequest,
)
from zkv.storage_node.disk_full import DiskFullGate, Unpersisted
from zkv.storage_node.durable_state import HardState


def es(first: int, last: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, b"") for i in range(first, last + 1)]


def test_unpersisted_merges_in_order() -> None:
    u = Unpersisted()
    assert not u
    u.add(HardState(2, "a"), None, None, es(5, 8))
    u.add(HardState(3, ""), None, None, es(9, 9))
    assert u.hard_state == HardState(3, "") and u.entries == es(5, 9)
    u.add(None, None, 7, es(7, 7, term=3))  # a conflict inside what waits: cut it there
    assert u.truncate_from is None and u.entries == [*es(5, 6), *es(7, 7, term=3)]
    u.add(None, None, 3, es(3, 3, term=3))  # before what waits: a truncation of the WAL
    assert u.truncate_from == 3 and u.entries == es(3, 3, term=3)
    u.add(None, (50, 3, b"snap"), None, [])  # an install replaces the whole log
    assert u.snapshot == (50, 3, b"snap") and u.truncate_from is None and u.entries == []
    assert u


def test_gate_takes_no_entries_snapshots_or_votes() -> None:
    gate = DiskFullGate(reply_interval_s=0.1)
    append = AppendEntries(4, "l", 10, 4, tuple(es(11, 12, 4)), 12, 7)
    stripped = gate.incoming(append)
    assert isinstance(stripped, AppendEntries) and stripped.entries == ()
    assert stripped.prev_index == 10 and stripped.commit_index == 12 and stripped.read_seq == 7
    assert gate.incoming(InstallSnapshot(4, "l", 50, 4, 0, True, b"")) is None
    assert gate.incoming(VoteRequest(5, "c", 10, 4, False)) is None


def test_gate_sends_no_promise_beyond_the_disk() -> None:
    gate = DiskFullGate(reply_interval_s=0.1)
    ack = AppendReply(4, "f", True, 12, 7)
    clamped = gate.outgoing(ack, durable_index=9, now=1.0)
    assert clamped == AppendReply(4, "f", True, 9, 7)
    assert gate.outgoing(ack, durable_index=9, now=1.05) is None  # one per interval
    assert gate.outgoing(ack, durable_index=20, now=1.2) == ack
    assert gate.outgoing(VoteReply(5, "f", True, False), 9, 2.0) is None
    assert gate.outgoing(SnapshotReply(4, "f", 50, 10, True), 9, 3.0) is None
    beat = AppendEntries(4, "l", 10, 4, (), 12, 7)
    assert gate.outgoing(beat, 9, 4.0) == beat  # a leader's sends promise nothing
