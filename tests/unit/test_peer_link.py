"""Peer connections announce themselves; one that reached the wrong node is refused
loudly and the dialer redials (``storage_node/peer_link.py`` and the node core)."""

from __future__ import annotations

import pytest

from zkv.protocol import codec
from zkv.protocol.messages import AppendEntries, VoteRequest, WrongNode
from zkv.protocol.ring import Ring, RingConfig
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.node_core import NodeCore, NodeCoreConfig
from zkv.storage_node.peer_link import PROPERTY, Announcement, Redials, refusal
from zkv.storage_node.push import LeaderTasks
from zkv.storage_node.replica import Replica, ReplicaConfig
from zkv.storage_node.state_machine import KVStateMachine

MEMBERS = ("a", "b", "c")


def announced(sender: str = "b", to: str = "a", shard: int = 0, cluster: str = "c1") -> str:
    """The property value as the receiving side reads it off a frame."""
    option = Announcement(sender, to, shard, cluster, "inc-1").option().decode()
    name, _, value = option.partition(":")
    assert name == PROPERTY
    return value


def make_core(node_id: str = "a", cluster_id: str = "c1") -> NodeCore:
    cfg = NodeCoreConfig(node_id, 0, MEMBERS, cluster_id=cluster_id)
    replica = Replica(ReplicaConfig(node_id, MEMBERS), HardState(0, ""), [])
    ring = RingConfig(1, (0,), 16)
    return NodeCore(cfg, replica, KVStateMachine(shard_id=0, ring=ring), Ring(ring), LeaderTasks())


def vote_frames(sender: bytes = b"b") -> list[bytes]:
    return [sender, *codec.encode(VoteRequest(5, "b", 0, 0))]


def test_announcement_round_trips_and_rejects_what_is_not_ours() -> None:
    a = Announcement("s0r0", "s0r1", 0, "prod", "abc")
    assert Announcement.parse(announced("s0r0", "s0r1", 0, "prod").replace("inc-1", "abc")) == a
    assert Announcement.parse(None) is None
    assert Announcement.parse("") is None
    assert Announcement.parse("a|b|notanint|c|d") is None
    assert Announcement.parse("only|three|parts") is None
    with pytest.raises(ValueError):
        Announcement("a|b", "c", 0, "", "").option()


def test_refusal_names_the_stale_address_or_the_foreign_cluster() -> None:
    ok = Announcement("b", "a", 0, "c1", "i")
    assert refusal(ok, "a", "c1") is None
    assert refusal(None, "a", "c1") is None  # an older node announces nothing
    assert refusal(Announcement("b", "", 0, "", ""), "a", "c1") is None  # unknowns pass
    why = refusal(Announcement("s0r0", "s0r1", 0, "c1", "i"), "s1r0", "c1")
    assert why is not None and "dialed s0r1 but reached s1r0" in why and "stale" in why
    why = refusal(Announcement("b", "a", 0, "other", "i"), "a", "c1")
    assert why is not None and "cluster other" in why


def test_a_connection_meant_for_another_node_is_refused_and_answered() -> None:
    core = make_core("a")
    term = core.replica.term
    core.on_peer_frames("router", vote_frames(), 1.0, None, announced(to="x"))
    assert core.replica.term == term, "the refused message reached the replica"
    out = core.take_outgoing()
    assert len(out) == 1
    origin, frames = out[0]
    assert origin == "router" and frames[0] == b"b"  # back on the same connection
    msg = codec.decode(list(frames[1:]))
    assert isinstance(msg, WrongNode) and msg.node_id == "a" and "reached a" in msg.reason
    assert core.misrouted == 1 and any("refused peer connection #1" in n for n in core.notes)


def test_a_connection_from_another_cluster_is_refused() -> None:
    core = make_core("a", cluster_id="c1")
    core.on_peer_frames("router", vote_frames(), 1.0, None, announced(cluster="c2"))
    assert core.misrouted == 1 and core.replica.term == 0


def test_a_connection_announcing_this_node_is_taken() -> None:
    core = make_core("a")
    core.on_peer_frames("router", vote_frames(), 1.0, None, announced(to="a"))
    core.on_peer_frames("router", vote_frames(), 1.0, None, None)  # no announcement
    assert core.misrouted == 0 and core.replica.term == 5


def test_refusals_are_logged_sparingly() -> None:
    core = make_core("a")
    for _ in range(250):
        core.on_peer_frames("router", vote_frames(), 1.0, None, announced(to="x"))
    assert core.misrouted == 250
    assert len(core.notes) == 10 + 2  # the first ten, then every hundredth
    assert len(core.take_outgoing()) == 250  # but every one is answered


def test_wrong_node_answers_redial_at_most_once_per_interval() -> None:
    core = make_core("a")
    msg = WrongNode("s1r0", 1, "c1", "stale")
    assert core.on_wrong_node("b", msg, 10.0)
    assert not core.on_wrong_node("b", msg, 10.5)
    assert core.on_wrong_node("c", msg, 10.5)  # per peer
    assert core.on_wrong_node("b", msg, 11.0)
    assert sum("redialing b" in n for n in core.notes) == 2


def test_redials_interval() -> None:
    r = Redials(interval=2.0)
    assert r.due("p", 0.0) and not r.due("p", 1.9) and r.due("p", 2.0)


def append_frames(sender: bytes = b"d", term: int = 5) -> list[bytes]:
    return [sender, *codec.encode(AppendEntries(term, sender.decode(), 0, 0, (), 0, 0))]


def test_a_connection_announcing_a_node_of_this_shard_vouches_for_it() -> None:
    """A node our configuration does not name yet (added while we lagged) whose
    connection announced this shard and cluster, meant for us, is vouched for: its
    appends reach the replica (``Replica.vouch``). Another shard's or an unannounced
    stranger's do not."""
    core = make_core("a")
    core.on_peer_frames("router", append_frames(b"x"), 1.0, None, None)  # no announcement
    core.on_peer_frames("router", append_frames(b"y"), 1.0, None,
                        announced("y", "a", shard=1))  # a node of another shard
    core.on_peer_frames("router", append_frames(b"z"), 1.0, None,
                        announced("w", "a"))  # announces someone else
    assert core.replica.term == 0 and core.replica.vouched == set()
    core.on_peer_frames("router", append_frames(b"d"), 1.0, None, announced("d", "a"))
    assert core.replica.vouched == {"d"}
    assert core.replica.term == 5 and core.replica.leader_id == "d"


def test_under_curve_a_vouched_node_key_may_speak_raft() -> None:
    core = make_core("a")
    core.secure = True
    core.on_peer_frames("router", append_frames(b"d"), 1.0, "d", None)
    assert core.impostors == 1 and core.replica.term == 0  # no member, no announcement
    core.on_peer_frames("router", append_frames(b"d"), 1.0, "d", announced("d", "a"))
    assert core.replica.term == 5
    other = make_core("a")
    other.secure = True
    other.on_peer_frames("router", append_frames(b"e"), 1.0, "d", announced("e", "a"))
    assert other.replica.vouched == set() and other.replica.term == 0  # the key is d's
