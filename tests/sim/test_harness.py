"""The simulator's own parts: clock, network, disk. Fast, no cluster."""

from __future__ import annotations

import random

import pytest

from tests.sim.clock import SimClock, SimClockError
from tests.sim.disk import SimDisk
from tests.sim.network import NetConfig, SimNetwork
from zkv.protocol.messages import Entry
from zkv.storage_node.durable_state import HardState

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


def test_disk_always_survives_a_crash():
    d = SimDisk("always")
    assert d.write(HardState(2, "n1"), None, _entries(1, 5)) == 5
    d.crash()
    img = d.recover()
    assert img.hard_state == HardState(2, "n1") and img.last_index == 5


def test_disk_never_loses_the_unsynced_tail():
    d = SimDisk("never")
    d.write(HardState(1, ""), None, _entries(1, 3))
    d.flush()
    d.write(HardState(2, "n2"), None, _entries(4, 6))
    assert d.current.last_index == 6
    d.crash()
    img = d.recover()
    assert img.hard_state == HardState(1, "") and img.last_index == 3


def test_disk_truncates_and_overwrites():
    d = SimDisk()
    d.write(None, None, _entries(1, 6))
    assert d.write(None, 4, _entries(4, 5, term=2)) == 5
    assert [(e.index, e.term) for e in d.durable.log][-3:] == [(3, 1), (4, 2), (5, 2)]
    with pytest.raises(AssertionError):
        d.write(None, None, _entries(9, 9))  # a gap is a shell/core bug


def test_disk_snapshot_compacts_or_replaces_the_log():
    d = SimDisk()
    d.write(None, None, _entries(1, 10))
    d.save_snapshot(6, 1, b"state", keep_log=True)
    img = d.recover()
    assert img.snapshot == (6, 1, b"state") and [e.index for e in img.log] == [7, 8, 9, 10]
    d.save_snapshot(20, 3, b"leader's", keep_log=False)
    img = d.recover()
    assert img.log == [] and img.last_index == 20
    assert d.write(None, None, _entries(21, 22, term=3)) == 22
    with pytest.raises(AssertionError):
        d.write(None, 15, [])


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
