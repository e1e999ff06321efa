"""NodeTable: liveness, leaders, ring adoption, replicas, status rows, forgetting."""

from __future__ import annotations

import dataclasses

import pytest

from zkv.broker.node_table import (
    RING_TOKENS_MAX,
    HeartbeatRefused,
    LeaderChange,
    NodeTable,
    RingAdopted,
)
from zkv.protocol.messages import Heartbeat, Role
from zkv.protocol.ring import RingConfig

pytestmark = pytest.mark.unit

TIMEOUT_S = 1.0
F, C, L = Role.FOLLOWER, Role.CANDIDATE, Role.LEADER


def hb(
    node: str,
    shard: int = 0,
    role: Role = F,
    term: int = 1,
    *,
    leader: str = "",
    log: tuple[int, int] = (1, 1),
    epoch: int = 1,
    shards: tuple[int, ...] = (0, 1),
    vnodes: int = 16,
    members: tuple[str, ...] | None = None,
) -> Heartbeat:
    if members is None:
        members = tuple(f"s{shard}r{i}" for i in range(3))
    return Heartbeat(
        node_id=node, shard_id=shard, role=role, term=term, leader_id=leader,
        last_log_term=log[0], last_index=log[1], commit_index=log[1], applied_index=log[1],
        key_count=0, pid=1, peer_addr=f"tcp://127.0.0.1:7{node[-1]}", members=members,
        ring=RingConfig(epoch, shards, vnodes), heartbeat_ms=100,
    )  # fmt: skip


def table() -> NodeTable:
    return NodeTable(TIMEOUT_S)


# (heartbeats as (time, heartbeat), query time, expected leader of shard 0)
LEADER_CASES = [
    pytest.param([(0.0, hb("s0r0", role=L))], 0.5, "s0r0", id="single-leader"),
    pytest.param([(0.0, hb("s0r0"))], 0.5, None, id="only-followers"),
    pytest.param([(0.0, hb("s0r0", role=L))], 1.0, None, id="leader-expired-at-timeout"),
    pytest.param([(0.0, hb("s0r0", role=L))], 0.999, "s0r0", id="leader-live-just-before"),
    pytest.param(
        [(0.0, hb("s0r0", role=L, term=3)), (0.1, hb("s0r1", role=L, term=4))],
        0.2, "s0r1", id="higher-term-wins",
    ),
    pytest.param(
        [(0.0, hb("s0r1", role=L, term=4)), (0.1, hb("s0r0", role=L, term=3))],
        0.2, "s0r1", id="stale-claim-at-lower-term-loses",
    ),
    pytest.param(
        [(0.0, hb("s0r1", role=L, term=4)), (0.5, hb("s0r0", role=L, term=3))],
        1.2, "s0r0", id="higher-term-dead-lower-live",
    ),
    pytest.param(
        [(0.0, hb("s0r0", role=L, term=2)), (0.2, hb("s0r0", role=F, term=3))],
        0.3, None, id="stepped-down",
    ),
    pytest.param([(0.0, hb("s0r0", role=C, term=2))], 0.1, None, id="candidate-is-not-leader"),
    pytest.param([(0.0, hb("s1r0", shard=1, role=L))], 0.1, None, id="other-shard"),
]


@pytest.mark.parametrize(("beats", "now", "leader"), LEADER_CASES)
def test_leader_of_shard(beats: list[tuple[float, Heartbeat]], now: float, leader: str | None) -> None:
    t = table()
    for at, beat in beats:
        t.observe(beat, at)
    t.tick(now)
    assert t.leader_of(0) == leader
    assert t.leaders.get(0) == (leader.encode() if leader else None)


@pytest.mark.parametrize(
    ("last_seen", "now", "live"),
    [(0.0, 0.0, True), (0.0, 0.999, True), (0.0, 1.0, False), (0.0, 5.0, False)],
)
def test_liveness(last_seen: float, now: float, live: bool) -> None:
    t = table()
    t.observe(hb("s0r0"), last_seen)
    assert t.is_live("s0r0", now) is live
    assert t.is_live("nobody", now) is False


def test_ring_adopts_highest_epoch_and_rebuilds_only_on_change() -> None:
    t = table()
    t.observe(hb("s0r0", epoch=2, shards=(0, 1)), 0.0)
    ring = t.ring
    assert ring is not None and ring.config.epoch == 2 and ring.config.shards == (0, 1)
    t.observe(hb("s0r1", epoch=2, shards=(0, 1)), 0.1)
    assert t.ring is ring  # same epoch: not rebuilt
    t.observe(hb("s0r2", epoch=1, shards=(0,)), 0.2)
    assert t.ring is ring  # older epoch ignored
    t.observe(hb("s0r2", epoch=3, shards=(0, 1, 2)), 0.3)
    assert t.ring is not ring and t.ring.config.shards == (0, 1, 2)
    events = [e for e in t.tick(0.3) if isinstance(e, RingAdopted)]
    assert [e.config.epoch for e in events] == [2, 3]
    assert t.ring_config() == RingConfig(3, (0, 1, 2), 16)


@pytest.mark.parametrize(
    ("shards", "vnodes"), [((), 16), ((0,), 0), (tuple(range(100)), 1 << 16)]
)
def test_ring_refuses_unbuildable_configs(shards: tuple[int, ...], vnodes: int) -> None:
    t = table()
    t.observe(hb("s0r0", epoch=5, shards=shards, vnodes=vnodes), 0.0)
    assert t.ring is None
    assert t.ring_config() is None


def test_adopt_ring_from_a_redirect() -> None:
    """A Redirect carries the refusing node's ring: newer is adopted, as from heartbeats."""
    t = table()
    t.observe(hb("s0r0", epoch=2, shards=(0,)), 0.0)
    ring = t.ring
    assert not t.adopt_ring(RingConfig(2, (0, 1), 16))  # equal epoch: ignored
    assert not t.adopt_ring(RingConfig(1, (0, 1, 2), 16))  # lower epoch: ignored
    assert t.ring is ring
    assert t.adopt_ring(RingConfig(3, (1, 0, 1), 8))
    assert t.ring is not None and t.ring.config == RingConfig(3, (0, 1), 8)
    t.observe(hb("s0r0", epoch=2, shards=(0,)), 0.1)  # a lagging heartbeat cannot undo it
    assert t.ring.config.epoch == 3
    events = [e for e in t.tick(0.1) if isinstance(e, RingAdopted)]
    assert [e.config for e in events] == [RingConfig(2, (0,), 16), RingConfig(3, (0, 1), 8)]


def test_adopt_ring_without_any_heartbeat() -> None:
    t = table()
    assert t.adopt_ring(RingConfig(1, (0,), 4))
    assert t.ring_config() == RingConfig(1, (0,), 4)


@pytest.mark.parametrize(
    ("shards", "vnodes"),
    [((), 16), ((0,), 0), (tuple(range(100)), 1 << 16), ((0,), RING_TOKENS_MAX + 1)],
)
def test_adopt_ring_refuses_unbuildable_configs(shards: tuple[int, ...], vnodes: int) -> None:
    t = table()
    t.adopt_ring(RingConfig(1, (0,), 16))
    ring = t.ring
    assert not t.adopt_ring(RingConfig(9, shards, vnodes))
    assert t.ring is ring
    assert [e for e in t.tick(0.0) if isinstance(e, RingAdopted)] == [RingAdopted(ring.config)]  # type: ignore[union-attr]


def test_replicas_are_live_nodes_of_the_shard() -> None:
    t = table()
    t.observe(hb("s0r0", role=L), 0.0)
    t.observe(hb("s0r1"), 0.5)
    t.observe(hb("s0r2"), 0.6)
    t.observe(hb("s1r0", shard=1), 0.6)
    assert t.replicas[0] == (b"s0r0", b"s0r1", b"s0r2")
    t.tick(1.2)  # s0r0 expired
    assert t.replicas[0] == (b"s0r1", b"s0r2")
    t.tick(2.0)
    assert 0 not in t.replicas and 1 not in t.replicas


def test_leader_change_events() -> None:
    t = table()
    t.observe(hb("s0r0", role=L, term=1), 0.0)
    t.observe(hb("s0r0", role=L, term=1), 0.1)
    assert t.tick(0.1) == [RingAdopted(t.ring.config), LeaderChange(0, "s0r0", 1)]  # type: ignore[union-attr]
    assert t.tick(0.2) == []
    assert t.tick(1.1) == [LeaderChange(0, "", 1)]
    t.observe(hb("s0r1", role=L, term=2), 1.2)
    assert t.tick(1.2) == [LeaderChange(0, "s0r1", 2)]


def test_forget_long_silent_nodes() -> None:
    t = NodeTable(TIMEOUT_S, forget_after_s=30.0)
    t.observe(hb("s0r0", role=L), 0.0)
    t.observe(hb("s0r1"), 20.0)
    t.tick(30.0)
    assert set(t.nodes) == {"s0r0", "s0r1"}
    t.tick(30.01)
    assert set(t.nodes) == {"s0r1"}
    t.tick(50.01)
    assert t.nodes == {} and t.shards == {} and t.leaders == {}


def test_default_forget_is_30_election_timeouts() -> None:
    assert NodeTable(0.5).forget_after_s == 15.0


def test_node_moving_to_another_shard() -> None:
    t = table()
    t.observe(hb("x", shard=0, role=L), 0.0)
    t.observe(hb("x", shard=1, role=L), 0.1)
    assert t.leader_of(0) is None and t.leader_of(1) == "x"
    assert 0 not in t.shards


@pytest.mark.parametrize("node_id", ["", "\x00abc", "n" * 256])
def test_invalid_node_ids_are_refused(node_id: str) -> None:
    t = table()
    assert t.observe(hb("s0r0"), 0.0)
    assert not t.observe(dataclasses.replace(hb("s0r0"), node_id=node_id), 0.0)
    assert set(t.nodes) == {"s0r0"}
    assert any(isinstance(e, HeartbeatRefused) for e in t.tick(0.0))


def test_table_is_bounded() -> None:
    t = NodeTable(TIMEOUT_S, nodes_max=2)
    assert t.observe(hb("a"), 0.0) and t.observe(hb("b"), 0.0)
    assert not t.observe(hb("c"), 0.0)
    assert t.observe(hb("a"), 0.1)  # known nodes still update


def test_status_rows() -> None:
    t = table()
    t.observe(hb("s0r1", leader="s0r0"), 0.0)
    t.observe(hb("s0r0", role=L), 0.5)
    rows = t.status_rows(1.2)
    assert [r["node_id"] for r in rows] == ["s0r0", "s0r1"]
    r0, r1 = rows
    assert r0["role"] == 2 and r0["role_name"] == "LEADER" and r0["live"] is True
    assert r0["age_ms"] == 700
    assert r1["live"] is False and r1["age_ms"] == 1200 and r1["leader_id"] == "s0r0"
    assert r1["members"] == ["s0r0", "s0r1", "s0r2"]
    for key in ("term", "last_index", "commit_index", "ring_epoch", "peer_addr", "pid"):
        assert key in r0


def test_max_term_and_members_per_shard() -> None:
    t = table()
    t.observe(hb("s0r0", term=3), 0.0)
    t.observe(hb("s0r1", term=5, members=("s0r0", "s0r1", "s0r2", "s0r3")), 0.0)
    view = t.shards[0]
    assert view.max_term == 5
    assert view.members == ("s0r0", "s0r1", "s0r2", "s0r3")


def test_restarted_table_rebuilds_from_one_round_of_heartbeats() -> None:
    beats = [hb("s0r0", role=L, term=4), hb("s0r1", term=4, leader="s0r0"),
             hb("s1r0", shard=1, role=L, term=2)]  # fmt: skip
    t = table()
    for b in beats:
        t.observe(b, 100.0)
    assert t.leaders == {0: b"s0r0", 1: b"s1r0"}
    assert t.ring is not None and t.ring.config.epoch == 1


@pytest.mark.parametrize("module", ["node_table", "failure_detector", "router"])
def test_cores_are_pure(module: str) -> None:
    """The cores never touch sockets, clocks, threads or the global random module."""
    import ast
    from pathlib import Path

    import zkv.broker as broker

    path = Path(broker.__file__).parent / f"{module}.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"zmq", "time", "threading", "asyncio", "random", "socket", "loguru", "os"}
    assert not imported & forbidden


def test_members_are_the_leaders_configuration_once_there_is_a_leader() -> None:
    """Membership changes go through the leader's log: a replica removed from the shard
    may still advertise the larger configuration it last knew."""
    t = table()
    t.observe(hb("s0r3", term=5, members=("s0r0", "s0r1", "s0r2", "s0r3")), 0.0)
    t.observe(hb("s0r0", role=L, term=5, members=("s0r0", "s0r1", "s0r2")), 0.0)
    assert t.shards[0].members == ("s0r0", "s0r1", "s0r2")
