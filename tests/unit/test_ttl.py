"""Keys that expire (TTL): the deadline index, the commands, the state machine, the node
core's reads and sweep, snapshots and shard moves. No sockets, no sleeps: every clock
is an argument."""

from __future__ import annotations

import random
import tracemalloc

import msgpack
import pytest

from tests.unit.test_node_core import Shard, make_core, replies, request
from tests.unit.test_push import NEW, OLD, TARGETS
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode, RemoteProtocolError
from zkv.protocol.messages import (
    CasReply,
    CasRequest,
    Consistency,
    ErrorReply,
    ExpireReply,
    ExpireRequest,
    GetReply,
    GetRequest,
    PersistRequest,
    PutReply,
    PutTtlRequest,
    TtlReply,
    TtlRequest,
)
from zkv.protocol.ring import Ring
from zkv.storage_node.commands import (
    CasCommand,
    DeleteCommand,
    MigrateBegin,
    MigrateOut,
    PutCommand,
    decode_command,
    encode_command,
)
from zkv.storage_node.expiry import ExpiryIndex
from zkv.storage_node.node_core import SWEEPS_PER_TURN
from zkv.storage_node.push import DONE, Push, PushSpec, command_for
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.ttl_commands import (
    SWEEP_KEYS_MAX,
    ExpireCommand,
    PutTtlCommand,
    SweepCommand,
)
from zkv.storage_node.ttl_requests import sweep_command

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000  # a wall clock in ms


# ------------------------------------------------------------------ the index


def test_index_finds_due_keys_in_bounded_work_and_ignores_stale_pairs() -> None:
    idx = ExpiryIndex()
    for i in range(5000):
        idx.set(b"k%d" % i, T0 + i)
    idx.set(b"k0", T0 + 10_000)  # moved later: its old pair is stale
    idx.discard(b"k1")  # gone: stale too
    due = idx.due(T0 + 99, limit=1000)
    assert set(due) == {b"k%d" % i for i in range(2, 100)}
    assert len(idx.due(T0 + 4999, limit=300)) == 300  # at most ``limit``
    assert all(idx.expired(k, T0 + 4999) for k in idx.due(T0 + 4999, limit=300))
    assert idx.due(T0 - 1, limit=10) == []


def test_index_rebuilds_its_heap_when_stale_pairs_pile_up() -> None:
    idx = ExpiryIndex()
    for i in range(100):
        idx.set(b"k%d" % i, T0 + i)
    for rnd in range(1, 200):  # a client refreshing every key's TTL, again and again
        for i in range(100):
            idx.set(b"k%d" % i, T0 + rnd * 1000 + i)
    assert len(idx) == 100
    assert idx.heap_len() <= 2 * 100 + 1024 + 100  # bounded, not 20_000 pairs


def test_index_state_round_trip_and_bad_state() -> None:
    idx = ExpiryIndex()
    idx.set(b"a", 5)
    idx.set(b"b", 7)
    back = ExpiryIndex.from_state(msgpack.unpackb(msgpack.packb(idx.to_state())))
    assert back == idx and back.due(6, 10) == [b"a"]
    for bad in ([[b"a"], []], [[b"a"], [0]], [["a"], [5]], [[b"a"], [True]], "x", [1, 2, 3]):
        with pytest.raises(ValueError):
            ExpiryIndex.from_state(bad)


def test_memory_per_key_with_a_ttl() -> None:
    """The index's cost per key with a TTL (the README quotes it): dict slot, the
    deadline int and the heap's (deadline, key) pair; the key itself is shared."""
    n = 100_000
    keys = [b"key-%08d" % i for i in range(n)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    idx = ExpiryIndex()
    for i, k in enumerate(keys):
        idx.set(k, T0 + 60_000 + i)
    per_key = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    print(f"expiry index: {per_key:.0f} B per key with a TTL")
    assert per_key < 250


# ------------------------------------------------------------------ commands


def test_commands_round_trip_and_bad_input_is_a_protocol_error() -> None:
    cmds = [PutTtlCommand(b"c", 1, 1, T0, b"k", b"v", T0 + 5),
            ExpireCommand(b"c", 2, 1, T0, b"k", T0 + 9), ExpireCommand(b"c", 3, 1, T0, b"k", 0),
            SweepCommand(T0, (b"a", b"b"))]
    for cmd in cmds:
        assert decode_command(encode_command(cmd)) == cmd
    for bad in ([120, b"c", 1, 1, T0, b"k", b"v", -1], [121, b"c", 1, 1, T0, "k", 5],
                [122, T0, [b"a", 1]], [122, T0], [122, -1, []]):
        with pytest.raises(RemoteProtocolError):
            decode_command(msgpack.packb(bad))


# ------------------------------------------------------------------ the state machine


def _random_log(seed: int, n: int) -> list[bytes]:
    """Writes of every kind on a few keys, times moving forward, sweeps among them."""
    rng = random.Random(seed)
    keys = [b"k%d" % i for i in range(8)]
    log = []
    ts = T0
    for rid in range(1, n + 1):
        ts += rng.randint(0, 40)
        k = rng.choice(keys)
        r = rng.random()
        if r < 0.3:
            cmd: object = PutTtlCommand(b"c", rid, rid, ts, k, b"v%d" % rid, ts + rng.randint(1, 200))
        elif r < 0.45:
            cmd = PutCommand(b"c", rid, rid, ts, k, b"p%d" % rid)
        elif r < 0.6:
            cmd = ExpireCommand(b"c", rid, rid, ts, k, ts + rng.randint(1, 200))
        elif r < 0.65:
            cmd = ExpireCommand(b"c", rid, rid, ts, k, 0)
        elif r < 0.75:
            cmd = CasCommand(b"c", rid, rid, ts, k, rng.choice([0, rid - 1, rid - 2]), b"c")
        elif r < 0.8:
            cmd = DeleteCommand(b"c", rid, rid, ts, k)
        else:
            cmd = SweepCommand(ts, tuple(rng.sample(keys, 4)))
        log.append(encode_command(cmd))  # type: ignore[arg-type]
    return log


@pytest.mark.parametrize("seed", range(5))
def test_replay_is_deterministic_and_a_snapshot_midway_agrees(seed: int) -> None:
    log = _random_log(seed, 600)
    a, b = KVStateMachine(), KVStateMachine()
    replies_a = [a.apply(i, d) for i, d in enumerate(log, 1)]
    replies_b = [b.apply(i, d) for i, d in enumerate(log, 1)]
    assert a == b and replies_a == replies_b
    assert len(a.expiry) > 0  # the log exercised deadlines
    c = KVStateMachine()
    mid = KVStateMachine()
    for i, d in enumerate(log[:300], 1):
        mid.apply(i, d)
    c.restore(mid.snapshot_bytes())
    for i, d in enumerate(log[300:], 301):
        c.apply(i, d)
    assert c == a
    assert set(a.expiry) <= set(a.data)  # every deadline belongs to a key held


def test_write_semantics_against_deadlines() -> None:
    sm = KVStateMachine()
    assert sm.apply_command(1, PutTtlCommand(b"c", 1, 1, T0, b"k", b"v", T0 + 100)) == PutReply(1, 1)
    assert sm.get_live(b"k", T0 + 99) == (b"v", 1)
    assert sm.get_live(b"k", T0 + 100) is None  # the deadline is the first ms it is gone
    # expire / persist change the deadline, not the version
    assert sm.apply_command(2, ExpireCommand(b"c", 2, 2, T0 + 50, b"k", T0 + 501)) == ExpireReply(2, True, 1)
    assert sm.get_live(b"k", T0 + 499) == (b"v", 1)
    assert sm.apply_command(3, ExpireCommand(b"c", 3, 3, T0 + 60, b"k", 0)) == ExpireReply(3, True, 1)
    assert sm.get_live(b"k", T0 + 10**9) == (b"v", 1) and b"k" not in sm.expiry
    # a plain put clears a deadline; a CAS on an expired key sees it absent
    sm.apply_command(4, PutTtlCommand(b"c", 4, 4, T0 + 70, b"k", b"w", T0 + 80))
    sm.apply_command(5, PutCommand(b"c", 5, 5, T0 + 71, b"k", b"x"))
    assert b"k" not in sm.expiry
    sm.apply_command(6, PutTtlCommand(b"c", 6, 6, T0 + 72, b"j", b"w", T0 + 80))
    assert sm.apply_command(7, CasCommand(b"c", 7, 7, T0 + 80, b"j", 0, b"new")) == CasReply(7, True, 7)
    assert sm.get_live(b"j", T0 + 10**9) == (b"new", 7)
    # expire on a missing or expired key finds nothing
    sm.apply_command(8, PutTtlCommand(b"c", 8, 8, T0 + 90, b"e", b"w", T0 + 95))
    assert sm.apply_command(9, ExpireCommand(b"c", 9, 9, T0 + 95, b"e", T0 + 999)) == ExpireReply(9, False, 0)
    assert b"e" not in sm.data
    # a retried expire is answered from the session table, and changes nothing
    assert sm.apply_command(10, ExpireCommand(b"d", 1, 1, T0 + 99, b"k", T0 + 800)) == ExpireReply(1, True, 5)
    assert sm.apply_command(11, ExpireCommand(b"d", 1, 1, T0 + 99, b"k", T0 + 1)) == ExpireReply(1, True, 5)
    assert sm.expiry.get(b"k") == T0 + 800


def test_sweep_removes_only_what_is_still_expired_when_it_applies() -> None:
    sm = KVStateMachine()
    sm.apply_command(1, PutTtlCommand(b"c", 1, 1, T0, b"a", b"v", T0 + 10))
    sm.apply_command(2, PutTtlCommand(b"c", 2, 2, T0, b"b", b"v", T0 + 10))
    sweep = sweep_command(sm, T0 + 10)
    assert sweep is not None and set(sweep.keys) == {b"a", b"b"}
    sm.apply_command(3, PutTtlCommand(b"c", 3, 3, T0 + 11, b"b", b"v2", T0 + 1000))  # renewed
    sm.apply_command(4, sweep)
    assert b"a" not in sm.data and sm.get(b"b") == (b"v2", 3)
    assert set(sm.expiry) == {b"b"}


def test_snapshot_keeps_deadlines_and_a_format_3_snapshot_still_loads() -> None:
    sm = KVStateMachine()
    sm.apply_command(1, PutTtlCommand(b"c", 1, 1, T0, b"a", b"v", T0 + 10))
    sm.apply_command(2, PutCommand(b"c", 2, 2, T0, b"b", b"w"))
    back = KVStateMachine()
    back.restore(sm.snapshot_bytes())
    assert back == sm and back.expiry.get(b"a") == T0 + 10 and back.get_live(b"a", T0 + 10) is None
    old = msgpack.unpackb(sm.snapshot_bytes(), raw=False)
    old[0] = 3
    del old[6]  # what a node before TTL wrote
    v3 = KVStateMachine()
    v3.restore(msgpack.packb(old, use_bin_type=True))
    assert v3.data == sm.data and len(v3.expiry) == 0
    bad = msgpack.unpackb(sm.snapshot_bytes(), raw=False)
    bad[6] = [[b"a"], [-1]]
    with pytest.raises(RemoteProtocolError):
        KVStateMachine().restore(msgpack.packb(bad, use_bin_type=True))


def test_a_shard_move_keeps_deadlines() -> None:
    src = KVStateMachine(shard_id=0, ring=OLD)
    for i in range(300):
        src.apply_command(i + 1, PutTtlCommand(b"c", i + 1, i + 1, T0, b"k%d" % i, b"v",
                                               T0 + 1000 + i) if i % 2 else
                          PutCommand(b"c", i + 1, i + 1, T0, b"k%d" % i, b"v"))
    src.apply_command(301, MigrateOut(OLD, NEW))
    dst = KVStateMachine(shard_id=1)
    assert dst.apply_command(1, MigrateBegin(OLD, NEW)).ok
    push = Push(PushSpec(OLD, NEW, 0, 1, 1, 0, b"", TARGETS, batch_keys=50), src)
    index, now = 1, 0.0
    while push.state != DONE:
        now += 0.1
        for _node, batch in push.pump(src, now):
            index += 1
            push.on_ack(codec_ack(batch, dst.apply_command(index, command_for(batch))), now)
    new = Ring(NEW)
    moved = [k for k in src.data if new.shard_for(k) == 1]
    assert moved and all(dst.expiry.get(k) == src.expiry.get(k) for k in moved)
    assert any(dst.expiry.get(k) for k in moved)


def codec_ack(batch, result):  # type: ignore[no-untyped-def]
    from zkv.protocol.messages import MigrateAck
    return MigrateAck(batch.seq, 1, result, "")


# ------------------------------------------------------------------ the node core


def _leader() -> tuple[Shard, object]:
    shard = Shard()
    leader = shard.elect("a")
    replies(leader)
    return shard, leader


def test_a_key_is_never_visible_on_the_leader_after_its_deadline() -> None:
    shard, leader = _leader()
    request(leader, PutTtlRequest(b"c1", 1, b"k", 1, 500, b"v"), shard.now, ts_ms=T0)
    shard.settle()
    assert replies(leader) == [PutReply(1, 2)]
    assert leader.state.expiry.get(b"k") == T0 + 501  # stamped from the leader's clock
    shard.tick(0.2)  # followers learn the commit index
    for node in shard.nodes.values():  # replicated
        assert node.state.expiry.get(b"k") == T0 + 501
    for consistency in Consistency:
        request(leader, GetRequest(b"c1", 10 + consistency, b"k", consistency), shard.now,
                ts_ms=T0 + 500)
        shard.settle()
    assert all(isinstance(r, GetReply) and r.found for r in replies(leader))
    request(leader, TtlRequest(b"c1", 20, b"k"), shard.now, ts_ms=T0 + 500)
    shard.settle()
    assert replies(leader) == [TtlReply(20, True, 2, True, 1)]
    # the deadline passed by the leader's clock: gone, with no sweep yet
    for consistency in Consistency:
        request(leader, GetRequest(b"c1", 30 + consistency, b"k", consistency), shard.now,
                ts_ms=T0 + 501)
        shard.settle()
    assert replies(leader) == [GetReply(30 + c, False, 0, b"") for c in Consistency]
    assert b"k" in leader.state.data  # still in the table: reads hid it
    request(leader, TtlRequest(b"c1", 40, b"k"), shard.now, ts_ms=T0 + 501)
    shard.settle()
    assert replies(leader) == [TtlReply(40, False, 0, False, 0)]


def test_expire_and_persist_through_the_node() -> None:
    shard, leader = _leader()
    request(leader, PutTtlRequest(b"c1", 1, b"k", 1, 0, b"v"), shard.now, ts_ms=T0)
    assert replies(leader)[0].code == ErrorCode.BAD_REQUEST  # type: ignore[attr-defined]
    request(leader, ExpireRequest(b"c1", 2, b"nope", 2, 100), shard.now, ts_ms=T0)
    shard.settle()
    assert replies(leader) == [ExpireReply(2, False, 0)]
    request(leader, PutTtlRequest(b"c1", 3, b"k", 3, 100, b"v"), shard.now, ts_ms=T0)
    shard.settle()
    request(leader, ExpireRequest(b"c1", 4, b"k", 4, 10_000), shard.now, ts_ms=T0 + 50)
    shard.settle()
    assert replies(leader) == [PutReply(3, 3), ExpireReply(4, True, 3)]
    assert leader.state.expiry.get(b"k") == T0 + 10_051
    request(leader, PersistRequest(b"c1", 5, b"k", 5), shard.now, ts_ms=T0 + 60)
    shard.settle()
    request(leader, TtlRequest(b"c1", 6, b"k"), shard.now, ts_ms=T0 + 10**7)
    shard.settle()
    assert replies(leader) == [ExpireReply(5, True, 3), TtlReply(6, True, 3, False, 0)]


def test_the_sweep_is_replicated_and_bounded_per_turn() -> None:
    shard, leader = _leader()
    n = 2 * SWEEP_KEYS_MAX + 10
    for i in range(n):
        request(leader, PutTtlRequest(b"c1", i + 1, b"k%d" % i, i + 1, 100, b"v"), shard.now,
                ts_ms=T0)
    shard.settle()
    assert len(replies(leader)) == n
    last = leader.replica.last_index
    leader.tick(shard.now, T0 + 100)  # nothing due yet (deadline: T0 + 1 + 100)
    assert leader.replica.last_index == last
    leader.tick(shard.now, T0 + 101)
    assert leader.replica.last_index == last + 1  # one sweep entry ...
    leader.tick(shard.now, T0 + 102)
    assert leader.replica.last_index == last + 1  # ... in flight at a time
    (entry,) = leader.replica.entries_from(last + 1, 1, 1 << 30)  # type: ignore[attr-defined]
    sweep = decode_command(entry.data)
    assert isinstance(sweep, SweepCommand) and len(sweep.keys) == SWEEP_KEYS_MAX
    turns = 0
    while len(leader.state.data) and turns < 10:
        before = leader.replica.last_index
        shard.settle()  # commits the sweep in flight; the next is chained in the same turn
        leader.tick(shard.now, T0 + 200)
        turns += 1
        assert leader.replica.last_index - before <= SWEEPS_PER_TURN
    shard.settle()
    shard.tick(0.2)
    # 3 entries for n keys: one from a tick, two chained as each applied (that turn's cap)
    assert turns == 1 and leader.replica.last_index == last + 3
    for node in shard.nodes.values():
        assert len(node.state.data) == 0 and len(node.state.expiry) == 0


def test_a_follower_never_sweeps() -> None:
    shard, leader = _leader()
    request(leader, PutTtlRequest(b"c1", 1, b"k", 1, 100, b"v"), shard.now, ts_ms=T0)
    shard.settle()
    follower = shard.nodes["b"]
    last = follower.replica.last_index
    follower.tick(shard.now, T0 + 10_000)
    assert follower.replica.last_index == last
    request(follower, GetRequest(b"c1", 2, b"k", Consistency.STALE), shard.now, ts_ms=T0 + 101)
    assert replies(follower) == [GetReply(2, False, 0, b"")]  # judged by its own clock


def test_a_read_of_an_expired_key_waits_for_a_write_in_flight_on_it() -> None:
    """A CAS proposed while the key lived was decided alive: a read that finds the key
    expired before the CAS applies must not answer "absent" ahead of it."""
    shard, leader = _leader()
    request(leader, PutTtlRequest(b"c1", 1, b"k", 1, 100, b"v"), shard.now, ts_ms=T0)
    shard.settle()
    replies(leader)
    request(leader, CasRequest(b"c1", 2, b"k", 2, 2, b"new"), shard.now, ts_ms=T0 + 100)
    request(leader, GetRequest(b"c1", 3, b"k", Consistency.LEADER), shard.now, ts_ms=T0 + 101)
    assert replies(leader) == []  # the read waits for the CAS
    shard.settle()
    assert replies(leader) == [CasReply(2, True, 3), GetReply(3, True, 3, b"new")]


def test_ttl_messages_round_trip_the_codec() -> None:
    for msg in (PutTtlRequest(b"c", 1, b"k", 1, 5, b"v"), ExpireRequest(b"c", 2, b"k", 2, 7),
                PersistRequest(b"c", 3, b"k", 3), TtlRequest(b"c", 4, b"k", Consistency.STALE),
                ExpireReply(5, True, 9), TtlReply(6, True, 9, True, 100)):
        assert codec.decode(codec.encode(msg)) == msg  # type: ignore[arg-type]
    kind, key, _ = codec.route_fields(codec.encode(ExpireRequest(b"c", 2, b"key", 2, 7))[0])
    assert (kind, key) == (ExpireRequest.TYPE, b"key")
    assert isinstance(ErrorReply(1, 2), ErrorReply) and make_core("a") is not None
