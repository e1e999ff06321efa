"""GracefulStop: when a node told to stop (SIGTERM) exits (``storage_node/graceful_stop.py``)."""

from __future__ import annotations

import pytest

from tests.unit.test_membership import _ready_group
from zkv.protocol.messages import Role
from zkv.storage_node.graceful_stop import GracefulStop

pytestmark = pytest.mark.unit


def _stop() -> GracefulStop:
    return GracefulStop(0, heartbeat_ms=100, election_timeout_ms=1000)


def test_a_leader_hands_over_then_exits_a_heartbeat_after_it_stopped_leading() -> None:
    g = _ready_group()
    a = g.cores["a"]
    stop, notes = _stop(), []
    assert not stop.due(a, g.now, notes)
    assert notes == ["stopping: handing leadership of shard 0 over"] and a.leaving
    g.settle()
    assert g.leader() in ("b", "c") and a.role is Role.FOLLOWER
    assert not stop.due(a, g.now, notes)  # our last replies still leave
    assert not stop.due(a, g.now + 0.05, notes)
    assert stop.due(a, g.now + 0.1, notes)


def test_a_handover_that_never_happens_exits_after_two_election_timeouts() -> None:
    g = _ready_group()
    a = g.cores["a"]
    g.down.update({"b", "c"})  # TimeoutNow reaches nobody
    stop, notes = _stop(), []
    assert not stop.due(a, g.now, notes)
    assert not stop.due(a, g.now + 1.9, notes)  # still leading, still waiting
    assert not stop.due(a, g.now + 2.0, notes)
    assert stop.due(a, g.now + 2.1, notes)


def test_a_follower_leaves_and_exits_a_heartbeat_later() -> None:
    g = _ready_group()
    b = g.cores["b"]
    stop, notes = _stop(), []
    assert not stop.due(b, g.now, notes)
    assert notes == [] and b.leaving
    b.campaign(g.now + 5, b.term)  # a broker's order: ignored from now on
    assert not b.has_ready() or not [m for _, m in b.ready().messages]
    assert stop.due(b, g.now + 0.1, notes)
