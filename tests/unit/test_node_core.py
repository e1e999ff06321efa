"""The node core without sockets or sleeps: frames in, replies and effects out.

A ``Shard`` is three node cores and a mailbox; ``settle`` runs each core's ready rounds
the way the shell does (send first, persist, send after, advance, settle) against an
in-memory log, and delivers peer messages by hand. Time moves only when told.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    AdminInfo,
    AdminInfoReply,
    AppendEntries,
    AppendReply,
    Campaign,
    Consistency,
    DeleteReply,
    DeleteRequest,
    Entry,
    ErrorReply,
    GetReply,
    GetRequest,
    Heard,
    Heartbeat,
    MigrateAck,
    MigrateBatch,
    PingRequest,
    PongReply,
    PutReply,
    PutRequest,
    Redirect,
    ReplyBatch,
    RequestBatch,
    Role,
    VoteReply,
)
from zkv.protocol.ring import Ring, RingConfig
from zkv.protocol.timing import ELECTION_TIMEOUT_MS
from zkv.storage_node.commands import RingSet
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.membership import unwrap_snapshot
from zkv.storage_node.node_core import TIMER_STEP_S, NodeCore, NodeCoreConfig, Pending
from zkv.storage_node.push import LeaderTasks
from zkv.storage_node.replica import Replica, ReplicaConfig
from zkv.storage_node.state_machine import KVStateMachine

pytestmark = pytest.mark.unit

MEMBERS = ("a", "b", "c")
BROKER = "broker"  # the origin every request comes from here
CLIENT = b"client-1"


def make_core(node_id: str, shard_id: int = 0, ring: RingConfig | None = None,
              **overrides: object) -> NodeCore:
    ring = ring or RingConfig(1, (shard_id,), 16)
    cfg = NodeCoreConfig(node_id, shard_id, MEMBERS, **overrides)  # type: ignore[arg-type]
    replica = Replica(ReplicaConfig(node_id, MEMBERS), HardState(0, ""), [])
    state = KVStateMachine(shard_id=shard_id, ring=ring)
    return NodeCore(cfg, replica, state, Ring(ring), LeaderTasks())


class Shard:
    def __init__(self, **kw: object) -> None:
        self.now = 0.0
        self.nodes = {m: make_core(m, **kw) for m in MEMBERS}  # type: ignore[arg-type]
        self.logs: dict[str, list[Entry]] = {m: [] for m in MEMBERS}
        self.cut: set[str] = set()  # nodes whose peer traffic is lost
        self.mail: list[tuple[str, str, object]] = []
        self.truncations: list[tuple[str, int]] = []
        #: nodes a broker confirms (``Heard``) on every tick
        self.heard_by_broker: set[str] = set()

    def run(self, name: str) -> None:
        """One shell turn's ready rounds for ``name`` (persisting to memory)."""
        node = self.nodes[name]
        while node.has_ready():
            nrd = node.ready()
            rd = nrd.raft
            self._send(name, nrd.send_first)
            log = self.logs[name]
            if rd.snapshot is not None:  # the log restarts after the leader's snapshot
                log[:] = [Entry(0, 0, b"")] * rd.snapshot[0]
            if rd.truncate_from is not None:
                self.truncations.append((name, rd.truncate_from))
                del log[rd.truncate_from - 1:]
            log.extend(rd.entries)
            if rd.entries or rd.truncate_from is not None:
                node.replica.persisted(len(log))
            self._send(name, nrd.send_after)
            node.advance(nrd)
        node.settle()

    def _send(self, name: str, msgs: list) -> None:
        for to, msg in msgs:
            if name not in self.cut and to not in self.cut:
                self.mail.append((name, to, msg))

    def settle(self, rounds: int = 50) -> None:
        for name in MEMBERS:
            self.run(name)
        for _ in range(rounds):
            mail, self.mail = self.mail, []
            if not mail:
                return
            for frm, to, msg in mail:
                if to not in self.cut and frm not in self.cut:
                    self.nodes[to].replica.step(frm, msg, self.now)  # type: ignore[arg-type]
                    self.run(to)

    def tick(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + 0.05, 6)
            for name, node in self.nodes.items():
                if name in self.heard_by_broker:
                    heard = Heard("b1", node.replica.term)
                    node.on_broker_frames(BROKER, [b"", *codec.encode(heard)], self.now, 0)
                node.tick(self.now)
            self.settle()

    def elect(self, name: str) -> NodeCore:
        node = self.nodes[name]
        node.on_broker_frames(BROKER, [b"", *codec.encode(Campaign(0, 0, "b1"))], self.now, 0)
        self.settle()
        assert node.replica.role is Role.LEADER
        return node


def request(node: NodeCore, msg: object, now: float = 0.0, ts_ms: int = 1000) -> None:
    node.on_broker_frames(BROKER, [CLIENT, *codec.encode(msg)], now, ts_ms)  # type: ignore[arg-type]


def replies(node: NodeCore) -> list[object]:
    """Every reply the core queued, decoded (a ReplyBatch unpacked)."""
    out: list[object] = []
    for _origin, frames in node.take_outgoing():
        msg = codec.decode(list(frames[1:]))
        if isinstance(msg, ReplyBatch):
            out.extend(codec.decode(list(item[1:])) for item in msg.items)
        else:
            out.append(msg)
    return out


def put(rid: int, key: bytes = b"k", value: bytes = b"v") -> PutRequest:
    return PutRequest(b"c1", rid, key, rid, value)


# ------------------------------------------------------------------ admission


def test_admission_errors_are_typed_replies() -> None:
    node = make_core("a", key_bytes_max=8, value_bytes_max=4)
    request(node, put(1, key=b"k" * 9))
    request(node, put(2, value=b"v" * 5))
    request(node, GetRequest(b"c1", 3, b"k" * 9))
    node.on_broker_frames(BROKER, [CLIENT, b"\x93\x01\x02"], 0.0, 0)  # not a request
    request(node, PingRequest(b"c1", 5))
    got = replies(node)
    codes = [(r.request_id, r.code) for r in got if isinstance(r, ErrorReply)]
    assert codes == [(1, ErrorCode.TOO_LARGE), (2, ErrorCode.TOO_LARGE),
                     (3, ErrorCode.TOO_LARGE), (0, ErrorCode.BAD_REQUEST)]
    assert PongReply(5, "a") in got


def test_several_replies_to_one_origin_go_as_one_batch() -> None:
    node = make_core("a")
    request(node, PingRequest(b"c1", 1))
    out = node.take_outgoing()
    assert len(out) == 1 and out[0][1][0] == CLIENT  # one reply: sent as it is
    request(node, PingRequest(b"c1", 2))
    request(node, PingRequest(b"c1", 3))
    (origin, frames), = node.take_outgoing()
    assert origin == BROKER and frames[0] == b""
    batch = codec.decode(list(frames[1:]))
    assert isinstance(batch, ReplyBatch) and len(batch.items) == 2
    assert node.take_outgoing() == []


def test_a_follower_answers_not_leader_with_the_leader_as_hint() -> None:
    shard = Shard()
    follower = shard.nodes["b"]
    request(follower, put(1))
    (r,) = replies(follower)
    assert isinstance(r, ErrorReply) and r.code == ErrorCode.NO_LEADER and r.leader_hint == ""
    shard.elect("a")
    request(follower, put(2))
    request(follower, GetRequest(b"c1", 3, b"k"))
    request(follower, GetRequest(b"c1", 4, b"k", Consistency.LEADER))
    got = replies(follower)
    assert [(r.code, r.leader_hint) for r in got] == [(ErrorCode.NOT_LEADER, "a")] * 3
    request(follower, GetRequest(b"c1", 5, b"k", Consistency.STALE))  # any replica
    assert replies(follower) == [GetReply(5, False, 0, b"")]


def test_a_write_is_answered_once_applied_with_the_leaders_stamp() -> None:
    shard = Shard()
    leader = shard.elect("a")
    replies(leader)
    request(leader, put(1), shard.now, ts_ms=123_456)
    assert replies(leader) == []  # proposed, not yet committed
    shard.settle()
    assert replies(leader) == [PutReply(1, 2)]  # index 1 is the leader's no-op
    assert shard.logs["b"][-1].data == shard.logs["a"][-1].data
    assert leader.state.get(b"k") == (b"v", 2)


def test_a_conditional_delete_is_decided_in_the_log_alike_on_every_replica() -> None:
    """The version check travels in the entry: a write proposed before the delete makes
    it a mismatch on every replica (no read-then-delete window at the leader)."""
    shard = Shard()
    leader = shard.elect("a")
    replies(leader)
    request(leader, put(1), shard.now)
    shard.settle()
    (first,) = replies(leader)
    assert isinstance(first, PutReply)
    request(leader, put(2, value=b"w"), shard.now)  # lands first: the delete must miss
    request(leader, DeleteRequest(b"c1", 3, b"k", 1, first.version), shard.now)
    shard.settle()
    (written, missed) = replies(leader)
    assert isinstance(written, PutReply)
    assert missed == DeleteReply(3, False, written.version)
    request(leader, DeleteRequest(b"c1", 4, b"k", 4, written.version), shard.now)
    shard.settle()
    assert replies(leader) == [DeleteReply(4, True, written.version + 2)]
    shard.tick(0.5)  # followers learn the commit index from the next append
    for node in shard.nodes.values():
        assert node.state.get(b"k") is None
    assert len({node.state.applied_index for node in shard.nodes.values()}) == 1


# ------------------------------------------------------------------ pending writes


def test_pending_writes_fail_not_leader_on_step_down() -> None:
    shard = Shard()
    leader = shard.elect("a")
    replies(leader)
    shard.cut.add("a")
    request(leader, put(1), shard.now)
    request(leader, put(2), shard.now)
    shard.settle()
    assert replies(leader) == [] and len(leader.pending_writes) == 2
    shard.tick(1.1)  # no majority heard for an election timeout: the leader steps down
    assert leader.replica.role is not Role.LEADER
    got = replies(leader)
    assert sorted(r.request_id for r in got) == [1, 2]
    assert all(isinstance(r, ErrorReply) and r.code == ErrorCode.NO_LEADER for r in got)
    assert leader.pending_writes == {}


def test_pending_writes_fail_when_their_entries_are_truncated() -> None:
    shard = Shard()
    old = shard.elect("a")
    replies(old)
    shard.cut.add("a")
    request(old, put(1), shard.now)
    request(old, put(2), shard.now)
    shard.settle()
    assert set(old.pending_writes) == {2, 3}
    # a newer leader's append overwrites index 3 in the same turn a learns of it: the
    # truncation, not the step-down, is what fails the write at index 3
    noop = shard.logs["a"][0].data
    old.replica.step("b", AppendEntries(2, "b", 2, 1, (Entry(2, 3, noop),), 0, 0), shard.now)
    nrd = old.ready()
    assert nrd.raft.truncate_from == 3
    old.advance(nrd)
    got = [r for r in replies(old) if isinstance(r, ErrorReply)]
    assert [(r.request_id, r.code, r.leader_hint) for r in got] == [(2, ErrorCode.NOT_LEADER, "b")]
    assert set(old.pending_writes) == {2}
    old.settle()  # the step-down answers the rest
    assert [r.request_id for r in replies(old)] == [1] and old.pending_writes == {}


def test_a_pending_write_whose_index_another_leader_filled_is_failed_not_answered() -> None:
    node = make_core("a")
    shard_log: list[Entry] = []
    node.replica.campaign(0.0)
    for peer in ("b", "c"):  # grant the pre-vote and the vote by hand
        node.replica.step(peer, VoteReply(1, peer, True, True), 0.0)
    for peer in ("b", "c"):
        node.replica.step(peer, VoteReply(1, peer, True, False), 0.0)
    assert node.replica.role is Role.LEADER
    request(node, put(7))
    pending = node.pending_writes[2]
    pending.term = 99  # as if proposed at another term: the entry applied is not ours
    while node.has_ready():
        nrd = node.ready()
        shard_log.extend(nrd.raft.entries)
        node.replica.persisted(len(shard_log))
        node.advance(nrd)
    for peer in ("b", "c"):
        node.replica.step(peer, AppendReply(1, peer, True, 2, 0), 0.0)
    while node.has_ready():
        node.advance(node.ready())
    node.settle()
    got = replies(node)
    assert [(r.request_id, r.code) for r in got] == [(7, ErrorCode.NOT_LEADER)]
    assert node.state.get(b"k") == (b"v", 2)  # the entry itself is applied all the same


# ------------------------------------------------------------------ reads


def test_a_linearizable_read_is_answered_only_after_its_index_is_applied() -> None:
    shard = Shard()
    leader = shard.elect("a")
    request(leader, put(1), shard.now)
    shard.settle()
    replies(leader)
    request(leader, GetRequest(b"c1", 2, b"k"), shard.now)
    shard.run("a")
    assert replies(leader) == []  # a heartbeat round must confirm leadership first
    assert leader.waiting_reads == []
    shard.settle()
    assert replies(leader) == [GetReply(2, True, 2, b"v")]


def test_a_single_voter_answers_a_linearizable_read_as_it_arrives() -> None:
    """No ready round between the request and its reply (``Replica.read_index_now``);
    with three voters the same read waits for its heartbeat round (test above)."""
    cfg = NodeCoreConfig("a", 0, ("a",))
    replica = Replica(ReplicaConfig("a", ("a",)), HardState(0, ""), [])
    node = NodeCore(cfg, replica, KVStateMachine(shard_id=0, ring=RingConfig(1, (0,), 16)),
                    Ring(RingConfig(1, (0,), 16)), LeaderTasks())
    node.on_broker_frames(BROKER, [b"", *codec.encode(Campaign(0, 0, "b1"))], 0.0, 0)

    def turn() -> None:
        while node.has_ready():
            nrd = node.ready()
            node.replica.persisted(node.replica.last_index)
            node.advance(nrd)
        node.settle()

    turn()
    request(node, put(1))
    turn()
    assert replies(node) == [PutReply(1, 2)]
    request(node, GetRequest(b"c1", 2, b"k"))
    assert replies(node) == [GetReply(2, True, 2, b"v")]  # before any ready round
    assert not node.has_ready() and node.waiting_reads == []
    request(node, put(3, value=b"w"))  # proposed, not committed: not acknowledged yet
    request(node, GetRequest(b"c1", 4, b"k"))
    assert replies(node) == [GetReply(4, True, 2, b"v")]  # read index = the commit index
    turn()
    request(node, GetRequest(b"c1", 5, b"k"))
    assert replies(node) == [PutReply(3, 3), GetReply(5, True, 3, b"w")]


def test_a_queued_read_waits_for_apply() -> None:
    node = make_core("a")
    node.waiting_reads.append((5, _pending(node, 9, b"k")))
    node.settle()
    assert replies(node) == [] and len(node.waiting_reads) == 1


def test_a_read_whose_key_moved_while_it_waited_is_refused_not_answered() -> None:
    """Ownership is checked again when a read is served: a ring applied meanwhile may
    have given the key to another shard, already written there."""
    node = make_core("a", shard_id=0, ring=RingConfig(1, (0,), 16))
    new = RingConfig(2, (0, 1), 16)
    moved = next(k for k in (b"k%d" % i for i in range(100)) if Ring(new).shard_for(k) == 1)
    node.waiting_reads.append((1, _pending(node, 9, moved)))
    node.state.apply_command(1, RingSet(new))
    node.settle()
    (r,) = replies(node)
    assert isinstance(r, ErrorReply) and (r.request_id, r.code, r.epoch) == (
        9, ErrorCode.WRONG_SHARD, 2)


def _pending(node: NodeCore, rid: int, key: bytes) -> Pending:
    return Pending(BROKER, CLIENT, rid, key)


# ------------------------------------------------------------------ shards


def test_a_key_of_another_shard_goes_back_whole_in_a_redirect() -> None:
    ring = RingConfig(3, (0, 1), 16)
    r = Ring(ring)
    other = next(k for k in (b"k%d" % i for i in range(100)) if r.shard_for(k) == 1)
    node = make_core("a", shard_id=0, ring=ring)
    req = put(1, key=other)
    request(node, req)
    (origin, frames), = node.take_outgoing()
    assert origin == BROKER and frames[0] == b""
    msg = codec.decode(list(frames[1:]))
    assert isinstance(msg, Redirect)
    assert (msg.shard_id, msg.ring.epoch, msg.ring.shards) == (0, 3, (0, 1))
    assert msg.items == ((CLIENT, *codec.encode(req)),)


def test_admin_for_another_shard_is_wrong_shard_and_a_follower_refuses_admin() -> None:
    node = make_core("a", shard_id=0)
    request(node, AdminInfo(b"c1", 1, 5))
    request(node, AdminInfo(b"c1", 2, 0))
    got = replies(node)
    assert [(r.request_id, r.code) for r in got] == [(1, ErrorCode.WRONG_SHARD),
                                                     (2, ErrorCode.NO_LEADER)]


def test_the_leader_answers_admin_info_at_once() -> None:
    shard = Shard()
    leader = shard.elect("a")
    replies(leader)
    request(leader, AdminInfo(b"c1", 1, 0))
    (r,) = replies(leader)
    assert isinstance(r, AdminInfoReply) and r.request_id == 1
    assert r.applied == leader.state.applied_index and r.keys == 0


def test_migration_batches_to_a_follower_or_the_wrong_shard_are_refused() -> None:
    shard = Shard()
    shard.elect("a")
    follower = shard.nodes["b"]
    batch = MigrateBatch(7, 1, 0, 2, 1, 0, b"", b"\x01z", True, b"\x90")
    follower.on_peer_frames("peer", [b"src", *codec.encode(batch)], shard.now)
    wrong = MigrateBatch(8, 1, 5, 2, 1, 0, b"", b"\x01z", True, b"\x90")
    follower.on_peer_frames("peer", [b"src", *codec.encode(wrong)], shard.now)
    out = follower.take_outgoing()
    acks = [(origin, frames[0], codec.decode(list(frames[1:]))) for origin, frames in out]
    assert [(o, i) for o, i, _ in acks] == [("peer", b"src")] * 2
    a1, a2 = (a for _, _, a in acks)
    assert isinstance(a1, MigrateAck) and a1.result.not_leader and a1.leader_hint == "a"
    assert isinstance(a2, MigrateAck) and not a2.result.ok and "shard 0" in a2.result.error


def test_a_request_batch_is_fed_item_by_item() -> None:
    node = make_core("a")
    items = ((CLIENT, *codec.encode(PingRequest(b"c1", 1))), (b"c2", *codec.encode(PingRequest(b"c1", 2))))
    node.on_broker_frames(BROKER, [b"", *codec.encode(RequestBatch(items))], 0.0, 0)
    assert sorted(r.request_id for r in replies(node)) == [1, 2]


# ------------------------------------------------------------------ housekeeping


def test_snapshot_is_due_every_snapshot_entries() -> None:
    shard = Shard(snapshot_entries=3)
    leader = shard.elect("a")
    assert leader.take_snapshot() is None  # one entry applied (the no-op)
    for rid in (1, 2):
        request(leader, put(rid), shard.now)
        shard.settle()
    task = leader.take_snapshot()
    assert task is not None and task.index == 3 and task.term == leader.replica.term
    restored = KVStateMachine(shard_id=0)
    restored.restore(unwrap_snapshot(task.data)[1])  # the configuration, then the state
    assert restored.get(b"k") == (b"v", 3)
    leader.compacted(task)
    assert leader.replica.snap_index == 3 and leader.take_snapshot() is None


def test_a_snapshot_from_the_leader_is_decoded_a_slice_per_tick_then_what_committed_meanwhile_applies() -> None:
    """A large install must not stop the loop: the follower decodes it a few keys per
    tick, acks appends meanwhile, and applies what committed once the state is whole."""
    shard = Shard(snapshot_entries=5, install_records_per_step=2)
    leader = shard.elect("a")
    shard.cut.add("c")
    for rid in range(1, 11):
        request(leader, put(rid, b"k%d" % rid, b"v%d" % rid), shard.now)
        shard.settle()
    task = leader.take_snapshot()
    assert task is not None and task.index == 11
    leader.compacted(task)  # c is behind the log: it needs the snapshot
    follower = shard.nodes["c"]
    shard.cut.discard("c")
    shard.tick(0.05)
    assert follower.installing is not None and follower.busy()
    assert follower.state.key_count == 0  # nothing adopted yet
    request(leader, put(11, b"late", b"x"), shard.now)
    shard.settle()
    shard.tick(0.1)  # the leader's next append carries the commit index
    assert follower.installing is not None
    # the replica went on: it holds and acknowledged the new entry while decoding
    assert follower.replica.commit_index == 12
    assert leader.replica.match_indexes()["c"] == 12
    assert [e.index for e in follower.install_backlog] == [12]
    assert follower.begin_snapshot() is None  # never a snapshot of a state being replaced
    ticks = 0
    while follower.installing is not None:
        shard.tick(0.05)
        ticks += 1
    assert 3 + ticks >= 20 // 2  # 10 keys + 10 values, 2 a tick (3 ticks above)
    assert follower.state.applied_index == 12
    assert follower.state.snapshot_bytes() == leader.state.snapshot_bytes()
    assert not follower.busy() and follower.install_backlog == []


def test_heartbeat_contents_and_cadence() -> None:
    node = make_core("a", heartbeat_ms=100, advertise="tcp://a:1", pid=42,
                     info={"fsync": "always"})
    hb = node.heartbeat(10.0)
    assert isinstance(hb, Heartbeat)
    assert (hb.node_id, hb.shard_id, hb.role, hb.pid, hb.peer_addr) == ("a", 0, Role.FOLLOWER,
                                                                        42, "tcp://a:1")
    assert hb.members == MEMBERS and hb.ring.epoch == 1
    assert hb.extra == {"fsync": "always", "data_bytes": 0, "max_data_bytes": 0, "disk_full": False,
                        "learners": [], "config_role": "voter"}
    assert node.heartbeat(10.05) is None
    assert node.heartbeat(10.1) is not None


def test_step_down_is_noted_for_the_shell_to_log() -> None:
    shard = Shard()
    leader = shard.elect("a")
    assert any("became leader of shard 0" in n for n in leader.notes)
    assert any("asks us to stand" in n for n in leader.notes)


def test_appends_go_before_persisting_and_votes_after() -> None:
    shard = Shard()
    leader = shard.elect("a")
    request(leader, put(1), shard.now)
    nrd = leader.ready()
    assert nrd.raft.entries and nrd.send_first
    assert all(isinstance(m, AppendEntries) for _, m in nrd.send_first)
    assert nrd.send_after == []


# ------------------------------------------------------------------ availability rule


def test_a_leader_no_broker_confirms_for_an_election_timeout_steps_down() -> None:
    """Issue 10: the leader reaches its followers, but no broker hears it. It steps down
    an election timeout after the last confirmation and answers NO_LEADER; once the
    followers' lease runs out, a follower the broker hears is elected."""
    shard = Shard()
    shard.heard_by_broker = set(MEMBERS)
    leader = shard.elect("a")
    shard.tick(3.0)  # confirmed all along: leads on
    assert leader.replica.role is Role.LEADER
    replies(leader)
    shard.heard_by_broker = {"b", "c"}  # the cut
    cut_at = shard.now
    election_s = ELECTION_TIMEOUT_MS / 1000
    shard.tick(election_s - 0.1)
    assert leader.replica.role is Role.LEADER
    shard.tick(0.15)
    assert leader.replica.role is Role.FOLLOWER
    request(leader, put(1), shard.now)
    assert [r.code for r in replies(leader)] == [ErrorCode.NO_LEADER]  # type: ignore[attr-defined]
    assert any("no broker has confirmed hearing us" in n for n in leader.notes)
    # the broker asks b (the candidate it would pick) until b's lease on a runs out
    b = shard.nodes["b"]
    while b.replica.role is not Role.LEADER:
        assert shard.now - cut_at < 2.5 * election_s, "no follower elected within ~2 election timeouts"
        b.on_broker_frames(BROKER, [b"", *codec.encode(Campaign(0, 1, "b1"))], shard.now, 0)
        shard.settle()
        shard.tick(0.1)
    assert leader.replica.role is Role.FOLLOWER and leader.replica.leader_id == "b"


def test_the_shell_runs_the_timers_once_a_step_and_every_turn_while_busy() -> None:
    """Issue 14: under load a node turns thousands of times a second; ``timers_due``
    lets the shell run ``tick``'s timers once per ``TIMER_STEP_S`` and only ``turn`` (the
    wall clock and the expiry sweep) between, but every turn while an install, a
    listing or a membership change is under way. A timer is then at most a step late:
    the leader no broker confirms steps down at the first due tick after its deadline."""
    shard = Shard()
    shard.heard_by_broker = set(MEMBERS)
    leader = shard.elect("a")
    shard.tick(0.5)
    shard.heard_by_broker = set()
    t = shard.now
    leader.tick(t, 1000)
    assert not leader.replica.reconfiguring()
    assert not leader.timers_due(t)
    assert not leader.timers_due(t + TIMER_STEP_S / 2)
    assert leader.timers_due(t + TIMER_STEP_S)
    leader.installing = (1, None)  # type: ignore[assignment]  # a snapshot install: every turn
    assert leader.timers_due(t + TIMER_STEP_S / 2)
    leader.installing = None
    # a learner to promote: every turn, as a learner is caught up only for moments
    leader.replica.propose_membership(leader.replica.membership.add_learner("d", "tcp://d"), t)
    assert leader.replica.reconfiguring()
    assert leader.timers_due(t + TIMER_STEP_S / 2)
    assert not shard.nodes["b"].replica.reconfiguring()  # a follower drives nothing
    # past the availability deadline, ``turn`` alone changes nothing but the wall clock
    late = t + ELECTION_TIMEOUT_MS / 1000 + 0.5
    leader.turn(late, 2000)
    assert leader.wall_ms == 2000
    assert leader.replica.role is Role.LEADER
    assert leader.timers_due(late)
    leader.tick_when_due(late, 2000)  # the shell's call: due, so the timers run
    assert leader.replica.role is Role.FOLLOWER


def test_a_node_never_confirmed_keeps_leading() -> None:
    """Rolling upgrade: brokers older than the rule never send Heard."""
    shard = Shard()
    leader = shard.elect("a")
    shard.tick(5.0)
    assert leader.replica.role is Role.LEADER


def test_a_fresh_leader_has_an_election_timeout_to_be_confirmed_at_its_term() -> None:
    shard = Shard()
    a = shard.nodes["a"]
    old = Heard("b1", 0)  # heard before the election: turns the rule on, confirms nothing
    a.on_broker_frames(BROKER, [b"", *codec.encode(old)], shard.now, 0)
    leader = shard.elect("a")
    election_s = ELECTION_TIMEOUT_MS / 1000
    shard.tick(election_s - 0.1)
    assert leader.replica.role is Role.LEADER
    fresh = Heard("b1", leader.replica.term)
    leader.on_broker_frames(BROKER, [b"", *codec.encode(fresh)], shard.now, 0)
    shard.tick(election_s - 0.1)
    assert leader.replica.role is Role.LEADER
    shard.tick(0.2)
    assert leader.replica.role is Role.FOLLOWER


# ------------------------------------------------------------------ purity


@pytest.mark.parametrize("module", [
    "node_core", "node_requests", "broker_contact",
    # the Raft core and its parts (replica.py lists them)
    "replica", "replica_state", "replica_elections", "replica_replication",
    "replica_membership", "replica_snapshots", "ownership", "ownership_records",
])  # fmt: skip
def test_the_node_core_is_pure(module: str) -> None:
    """No sockets, clocks, threads, files, logging or global random in the node core."""
    import zkv.storage_node as pkg

    path = Path(pkg.__file__).parent / f"{module}.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"zmq", "time", "threading", "asyncio", "random", "socket", "loguru", "os",
                 "pathlib", "io", "shutil", "subprocess"}
    assert not imported & forbidden


def test_an_admin_ring_command_is_proposed_and_answered_when_applied() -> None:
    """The admin path end to end in the core: a ring-change op becomes a replicated
    command, answered with ``AdminAppliedReply`` once applied (a NameError here once
    stopped every leader that was asked to add a shard)."""
    from zkv.protocol.messages import AdminAppliedReply, AdminBegin

    shard = Shard()
    leader = shard.elect("a")
    old, new = RingConfig(1, (0,), 16), RingConfig(2, (0, 1), 16)
    request(leader, AdminBegin(b"c1", 7, 0, old, new), shard.now)
    shard.settle()
    got = [r for r in replies(leader) if isinstance(r, AdminAppliedReply)]
    assert [r.request_id for r in got] == [7]
