"""The simulator's own parts: clock, network, disk. Fast, no cluster."""

from __future__ import annotations

import random

import pytest

from tests.sim.clock import SimClock, SimClockError
from tests.sim.disk import PowerLoss, SimDisk
from tests.sim.network import NetConfig, SimNetwork
from tests.sim.restart import CLUSTER_ID, Restarted, recover
from zkv.protocol.messages import Entry
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.identity import Identity, IdentityState
from zkv.storage_node.recovery import Refusal
from zkv.storage_node.snapshot import snapshot_name
from zkv.storage_node.wal import DiskFullError

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- clock


def test_clock_moves_only_when_told_and_never_back():
    c = SimClock()
    assert c.now == 0.0 and c() == 0.0
    c.advance(0.25)
    c.advance_to(1.0)
    assert c.now == 1.0 and c.ns() == 1_000_000_000
    c.advance_to(1.0)  # standing still is fine
    with pytest.raises(SimClockError):
        c.advance_to(0.5)
    with pytest.raises(SimClockError):
        c.advance(-0.1)
    assert c.now == 1.0


# --------------------------------------------------------------------------- network


def _drain(net: SimNetwork, until: float = 1e9) -> list[tuple[float, str, str, object]]:
    out = []
    while (t := net.next_time()) is not None and t <= until:
        item = net.pop_due(t)
        if item is not None:
            out.append((t, *item))
    return out


def test_network_delivers_after_a_delay_within_bounds():
    net = SimNetwork(random.Random(1), NetConfig(delay_ms_min=2, delay_ms_mean=5, spike_p=0))
    for i in range(200):
        net.send("a", "b", i, now=1.0)
    got = _drain(net)
    assert sorted(m for *_, m in got) == list(range(200))
    assert all(t >= 1.002 for t, *_ in got)
    assert [m for *_, m in got] != list(range(200)), "independent delays should reorder"
    assert net.stats.delivered == 200


def test_network_loss_and_duplication_rates():
    net = SimNetwork(random.Random(2), NetConfig(loss_p=0.2, dup_p=0.1))
    for i in range(5000):
        net.send("a", "b", i, now=0.0)
    got = [m for *_, m in _drain(net)]
    assert 0.15 < net.stats.lost / 5000 < 0.25
    assert net.stats.duplicated > 250
    assert len(got) == 5000 - net.stats.lost + net.stats.duplicated
    assert len(set(got)) < len(got)


def test_partition_blocks_both_ways_and_drops_in_flight():
    net = SimNetwork(random.Random(3), NetConfig(spike_p=0))
    net.send("n1", "n2", "in flight", now=0.0)
    net.partition(["n1"], ["n2", "n3"])
    net.send("n2", "n1", "blocked", now=0.0)
    net.send("n2", "n3", "fine", now=0.0)
    net.send("n1", "broker", "not in the partition", now=0.0)
    got = [m for *_, m in _drain(net)]
    assert sorted(got) == ["fine", "not in the partition"]
    assert net.blocked("n1", "n3") and net.blocked("n3", "n1") and net.partitioned
    net.heal()
    net.send("n2", "n1", "after heal", now=1.0)
    assert [m for *_, m in _drain(net)] == ["after heal"]


def test_asymmetric_cut():
    net = SimNetwork(random.Random(4))
    net.cut("n1", "n2")
    net.send("n1", "n2", "x", now=0.0)
    net.send("n2", "n1", "y", now=0.0)
    assert [m for *_, m in _drain(net)] == ["y"]


def test_network_is_deterministic_per_seed():
    def run(seed: int) -> list:
        net = SimNetwork(random.Random(seed), NetConfig(loss_p=0.1, dup_p=0.1, spike_p=0.1))
        for i in range(300):
            net.send("a", "b" if i % 2 else "c", i, now=i * 0.001)
        return _drain(net)

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_requeue_holds_messages_and_in_flight_is_bounded():
    net = SimNetwork(random.Random(7), NetConfig(in_flight_max=10))
    net.requeue("a", "b", "later", when=5.0)
    assert net.pop_due(4.9) is None
    assert net.pop_due(5.0) == ("a", "b", "later")
    for i in range(10):
        net.send("a", "b", i, now=0.0)
    with pytest.raises(RuntimeError):
        net.send("a", "b", "one too many", now=0.0)
    assert net.drop_to("b") == 10 and len(net) == 0


def test_pop_due_does_not_deliver_early():
    net = SimNetwork(random.Random(8), NetConfig(delay_ms_min=10, spike_p=0))
    net.send("a", "b", "m", now=0.0)
    assert net.pop_due(0.005) is None
    assert net.next_time() >= 0.010


# --------------------------------------------------------------------------- disk


def _entries(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, b"x%d" % i) for i in range(lo, hi + 1)]


def _recover(d: SimDisk, node: str = "n1"):
    return recover(d, node, 0, d.fsync, f"{node}.new")


def test_disk_always_survives_a_crash():
    d = SimDisk("always")
    d.save_hard_state(HardState(2, "n1"))
    assert d.append(_entries(1, 5)) == 5
    d.crash()
    got = _recover(d)
    assert isinstance(got, Restarted)
    assert got.hard_state == HardState(2, "n1") and [e.index for e in got.entries] == [1, 2, 3, 4, 5]


def test_disk_never_loses_the_unsynced_tail_but_never_the_term_and_vote():
    """Production fsyncs the hard state under every policy (durable_state.py); only WAL
    records wait for the page cache."""
    d = SimDisk("never")
    d.save_hard_state(HardState(1, ""))
    d.append(_entries(1, 3))
    d.flush()
    d.save_hard_state(HardState(2, "n2"))
    d.append(_entries(4, 6))
    assert d.current.last_index == 6
    d.crash()
    got = _recover(d)
    assert isinstance(got, Restarted)
    assert got.hard_state == HardState(2, "n2") and got.entries[-1].index == 3


def test_disk_truncates_and_overwrites():
    d = SimDisk()
    d.save_hard_state(HardState(2, ""))
    d.append(_entries(1, 6))
    d.truncate_from(4)
    assert d.append(_entries(4, 5, term=2)) == 5
    assert [(e.index, e.term) for e in d.durable.log][-3:] == [(3, 1), (4, 2), (5, 2)]
    with pytest.raises(AssertionError):
        d.append(_entries(9, 9))  # a gap is a shell/core bug


def test_disk_snapshot_compacts_to_the_older_kept_one_or_replaces_the_log():
    d = SimDisk()
    d.save_hard_state(HardState(3, ""))
    d.append(_entries(1, 10))
    d.save_snapshot(4, 1, b"older")
    d.save_snapshot(6, 1, b"state")
    d.compact()  # down to the older kept snapshot (snapshot.compactable_index)
    assert [e.index for e in d.durable.log] == [5, 6, 7, 8, 9, 10]
    got = _recover(d)
    assert isinstance(got, Restarted)
    assert got.snapshot == (6, 1, b"state") and [e.index for e in got.entries] == [7, 8, 9, 10]
    d.save_snapshot(20, 3, b"leader's")  # an install: the WAL restarts after it
    d.reset(21)
    assert [s.index for s in d.durable.snapshots] == [6, 20]
    assert d.durable.log == [] and d.current.last_index == 20
    assert d.append(_entries(21, 22, term=3)) == 22
    with pytest.raises(AssertionError):
        d.truncate_from(15)


def test_a_wal_that_lost_its_tail_below_the_snapshot_restarts_after_it():
    """Issue 10 item 4 (fsync=never): a snapshot at 8 is durable, the WAL kept only 1..5.
    Compaction never deletes the record being written to (``wal.py``), recovery restarts
    the WAL after the snapshot, and the next append continues it."""
    d = SimDisk("never")
    d.save_hard_state(HardState(1, ""))
    d.append(_entries(1, 5))
    d.flush()
    d.append(_entries(6, 10))
    d.save_snapshot(8, 1, b"state")
    d.compact()
    d.crash()
    assert [e.index for e in d.durable.log] == [5]
    got = _recover(d)
    assert isinstance(got, Restarted) and got.snapshot == (8, 1, b"state") and got.entries == []
    assert d.append(_entries(9, 9)) == 9


def test_a_torn_tail_is_dropped_by_the_production_reader():
    d = SimDisk()
    d.save_hard_state(HardState(1, ""))
    d.append(_entries(1, 3))
    d.arm("torn", 0.7)
    with pytest.raises(PowerLoss):
        d.append(_entries(4, 6))
    assert d.durable.torn_tail and d.durable.log[-1].index == 5
    d.crash()
    got = _recover(d)
    assert isinstance(got, Restarted) and got.torn
    assert [e.index for e in got.entries] == [1, 2, 3, 4, 5] and not d.durable.torn_tail
    assert d.append(_entries(6, 6)) == 6  # the WAL continues where the whole records end


def test_a_lost_snapshot_rename_leaves_a_temp_file_that_recovery_removes():
    d = SimDisk()
    d.save_hard_state(HardState(1, ""))
    d.append(_entries(1, 8))
    d.arm("snapshot", 0.5)
    with pytest.raises(PowerLoss):
        d.save_snapshot(8, 1, b"state")
    d.crash()
    assert d.durable.temp_files and not d.durable.snapshots
    got = _recover(d)
    assert isinstance(got, Restarted) and got.snapshot is None and len(got.entries) == 8
    assert d.durable.temp_files == []


def test_a_full_disk_refuses_writes_and_changes_nothing():
    d = SimDisk()
    d.save_hard_state(HardState(1, ""))
    d.append(_entries(1, 2))
    d.full = True
    for write in (lambda: d.append(_entries(3, 3)), lambda: d.save_hard_state(HardState(2, "")),
                  lambda: d.save_snapshot(2, 1, b"s")):
        with pytest.raises(DiskFullError):
            write()
    d.truncate_from(2)  # needs no space
    assert d.durable.hard_state == HardState(1, "") and d.current.last_index == 1
    d.full = False
    assert d.append(_entries(2, 3)) == 3


def test_a_damaged_snapshot_falls_back_or_refuses():
    """Recovery is the production plan: an older snapshot plus the WAL covers a damaged
    newest one; after an install (WAL emptied) nothing does, and the node refuses."""
    d = SimDisk()
    d.save_hard_state(HardState(1, ""))
    d.append(_entries(1, 10))
    d.save_snapshot(4, 1, b"older")
    d.save_snapshot(8, 1, b"newer")
    d.compact()
    assert d.damage_snapshot() == 8
    got = _recover(d)
    assert isinstance(got, Restarted) and got.snapshot == (4, 1, b"older")
    assert [e.index for e in got.entries] == [5, 6, 7, 8, 9, 10] and got.notes
    d.save_snapshot(30, 2, b"installed")
    d.reset(31)
    d.damage_snapshot()
    refused = _recover(d)
    assert isinstance(refused, Refusal) and refused.path.name == snapshot_name(30)


def test_a_lost_disk_restarts_as_a_waiting_non_voter():
    d = SimDisk()
    d.save_identity(Identity(CLUSTER_ID, 0, "n1", "n1.0", IdentityState.VOTER))
    d.save_hard_state(HardState(4, "n2"))
    d.append(_entries(1, 3, term=4))
    got = _recover(d)
    assert isinstance(got, Restarted) and got.identity.voter
    d.wipe()
    got = _recover(d)
    assert isinstance(got, Restarted) and not got.identity.voter
    assert got.identity.state is IdentityState.WAITING and got.identity.incarnation == "n1.new"
    assert got.hard_state == HardState() and got.entries == []
    assert d.durable.identity == got.identity  # recorded before the replica acts


def test_network_misroutes_to_another_node_and_counts_as_cut():
    net = SimNetwork(random.Random(9), NetConfig(spike_p=0))
    net.misroute("n1", "n2", "n3")
    net.send("n1", "n2", "meant for n2", now=0.0)
    net.send("n2", "n1", "reverse", now=0.0)
    got = sorted((dst, src, m) for _, src, dst, m in _drain(net))
    assert got == [("n1", "n2", "reverse"), ("n3", "n1", "meant for n2")]
    assert net.blocked("n1", "n2") and not net.blocked("n2", "n1") and net.stats.misrouted == 1
    net.unmisroute_all()
    net.send("n1", "n2", "fixed", now=1.0)
    assert [(dst, m) for _, _, dst, m in _drain(net)] == [("n2", "fixed")]


# --------------------------------------------------------------------------- production code


def test_the_simulator_runs_the_production_cores():
    """No stand-ins: the simulated nodes and broker are the production cores."""
    from tests.sim.cluster import SimConfig, World
    from zkv.broker.failure_detector import FailureDetector
    from zkv.broker.node_table import NodeTable
    from zkv.broker.router import Router
    from zkv.storage_node.node_core import NodeCore
    from zkv.storage_node.replica import Replica
    from zkv.storage_node.state_machine import KVStateMachine

    w = World(SimConfig(seed=1))
    for node in w.nodes.values():
        assert type(node.node) is NodeCore and type(node.core) is Replica
        assert type(node.state) is KVStateMachine
    b = w.broker
    assert (type(b.table), type(b.detector), type(b.router)) == (NodeTable, FailureDetector, Router)
