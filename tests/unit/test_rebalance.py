"""The ring-change protocol end to end on in-memory state machines: the real
``Rebalancer`` drives ``zkv.storage_node.admin`` and ``KVStateMachine`` of every shard through
a fake client (no sockets), with client writes interleaved at every step."""

from __future__ import annotations

import random
from typing import Any

import pytest

from zkv.ops.rebalance import Plan, RebalanceError, Rebalancer, ring_adding, ring_removing
from zkv.protocol import codec
from zkv.protocol.admin import (
    ADMIN_REPLY_CLASSES,
    AdminAppliedReply,
    AdminFence,
    AdminPush,
    AdminReply,
    AdminRequest,
    Phase,
    Target,
)
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import DeleteReply, ErrorReply, MigrateAck, PutReply
from zkv.protocol.ring import Ring, RingConfig
from zkv.storage_node.admin import AdminError, admin_command, admin_request
from zkv.storage_node.commands import (
    DeleteCommand,
    DropUnowned,
    Fence,
    MigrateOut,
    PutCommand,
    RingSet,
)
from zkv.storage_node.push import LeaderTasks, command_for
from zkv.storage_node.state_machine import KVStateMachine


class FakeCluster:
    """One state machine per shard; ``admin`` is what a shard leader would do."""

    def __init__(self, shards: list[int], vnodes: int = 16) -> None:
        self.ring = RingConfig(1, tuple(shards), vnodes)
        self.sms: dict[int, KVStateMachine] = {}
        self.tasks: dict[int, LeaderTasks] = {}
        #: stream batches delivered per admin call (1: a client write may land between)
        self.deliveries_per_call = 1
        self.batches_delivered = 0
        self.index: dict[int, int] = {}
        for s in shards:
            self.add(s)
        self.hook: Any = None
        self.cid = b"client"
        self.rid = 0

    def add(self, shard: int) -> None:
        self.sms[shard] = KVStateMachine(shard_id=shard, ring=RingConfig(1, self.ring.shards,
                                                                          self.ring.vnodes))
        self.tasks[shard] = LeaderTasks()
        self.index[shard] = 0

    def apply(self, shard: int, cmd: Any) -> Any:
        self.index[shard] += 1
        return self.sms[shard].apply_command(self.index[shard], cmd)

    def owner(self, key: bytes) -> int:
        """Where a broker with the newest ring would send ``key``."""
        newest = max((sm.ownership.ring.config for sm in self.sms.values()),
                     key=lambda r: r.epoch)
        return Ring(newest).shard_for(key)

    def put(self, key: bytes, value: bytes) -> Any:
        self.rid += 1
        cmd = PutCommand(self.cid, self.rid, self.rid, 1, key, value)
        return self.apply(self.owner(key), cmd)

    # the KVClient surface the Rebalancer uses
    def status(self, timeout: float | None = None) -> dict[str, Any]:
        newest = max((sm.ownership.ring.config for sm in self.sms.values()),
                     key=lambda r: r.epoch)
        return {"ring": newest.as_dict(),
                "nodes": [{"shard_id": s, "live": True, "node_id": f"n{s}",
                           "peer_addr": f"inproc://n{s}"} for s in self.sms]}

    def deliver(self, limit: int) -> None:
        """What the shells do: pump each leader's streams, apply each batch at its
        target as the target leader would, and hand the ack back."""
        for _ in range(limit):
            moved = False
            for tasks in self.tasks.values():
                for s, sm in self.sms.items():
                    if self.tasks[s] is not tasks:
                        continue
                    for node, _addr, batch in tasks.pump(sm, 0.0):
                        dst = int(node[1:])
                        result = self.apply(dst, command_for(batch))
                        tasks.on_ack(MigrateAck(batch.seq, batch.dst_shard, result, ""), 0.0)
                        self.batches_delivered += 1
                        moved = True
            if not moved:
                return

    def admin(self, req: AdminRequest, timeout: float | None = None) -> AdminReply:
        if self.hook is not None:
            self.hook(req.shard_id, type(req).__name__)
        req = wire(req)
        self.deliver(self.deliveries_per_call)
        sm = self.sms[req.shard_id]
        answer = admin_request(sm, self.tasks[req.shard_id], req)
        if isinstance(answer, ADMIN_REPLY_CLASSES):
            return wire(answer)  # type: ignore[no-any-return]
        return wire(AdminAppliedReply(req.request_id, self.apply(req.shard_id, answer)))


def wire(msg: Any) -> Any:
    """What survives a trip through the codec, as on the real sockets."""
    return codec.decode(codec.encode(msg))


def _check_final(c: FakeCluster, expected: dict[bytes, bytes]) -> None:
    ring = Ring(c.status()["ring"] and RingConfig(**{**c.status()["ring"],
                                                       "shards": tuple(c.status()["ring"]["shards"])}))
    for key, value in expected.items():
        owner = ring.shard_for(key)
        assert c.sms[owner].get(key) is not None and c.sms[owner].get(key)[0] == value, key
    for s, sm in c.sms.items():
        for key in sm.data:
            assert ring.shard_for(key) == s, f"{key!r} left on shard {s}"
        assert sm.ownership.fence is None and sm.ownership.incoming is None


@pytest.mark.parametrize("seed", range(6))
def test_add_then_remove_with_writes_at_every_step(seed: int) -> None:
    rng = random.Random(seed)
    c = FakeCluster([0, 1])
    expected: dict[bytes, bytes] = {}
    keys = [f"k{i}".encode() for i in range(300)]
    n = 0

    def write_some(shard: int, op: str) -> None:
        nonlocal n
        for _ in range(rng.randint(0, 5)):
            key = rng.choice(keys)
            n += 1
            value = f"v{n}".encode()
            reply = c.put(key, value)
            if isinstance(reply, PutReply):
                expected[key] = value
            else:  # a fenced key: refused and not applied
                assert isinstance(reply, ErrorReply)
                assert reply.code in (ErrorCode.UNAVAILABLE, ErrorCode.WRONG_SHARD)

    for key in keys:
        write_some(0, "")
        c.put(key, b"initial" + key)
        expected[key] = b"initial" + key
    c.hook = write_some
    c.add(2)
    r = Rebalancer(c, batch_keys=7, poll_s=0)  # type: ignore[arg-type]
    r.add_shard(2)
    _check_final(c, expected)
    assert c.status()["ring"]["epoch"] == 2
    assert any(c.sms[2].data.values())
    r.remove_shard(0)
    _check_final(c, expected)
    assert not c.sms[0].data
    assert c.status()["ring"]["shards"] == [1, 2]


def test_versions_keep_increasing_after_a_move() -> None:
    c = FakeCluster([0])
    for i in range(50):
        c.put(f"k{i}".encode(), b"x")
    c.add(1)
    before = {k: v[1] for k, v in c.sms[0].data.items()}
    Rebalancer(c, poll_s=0).add_shard(1)  # type: ignore[arg-type]
    moved = [k for k in before if c.owner(k) == 1]
    assert moved
    for k in moved:
        assert c.sms[1].get(k)[1] == before[k]
        reply = c.put(k, b"new")
        assert isinstance(reply, PutReply) and reply.version > before[k]


def test_retried_write_after_the_move_is_not_applied_twice() -> None:
    c = FakeCluster([0])
    c.add(1)
    key = next(f"k{i}".encode() for i in range(100)
               if Ring.of([0, 1], 16, 2).shard_for(f"k{i}".encode()) == 1)
    first = c.apply(0, PutCommand(b"cl", 5, 5, 1, key, b"once"))
    Rebalancer(c, poll_s=0).add_shard(1)  # type: ignore[arg-type]
    c.apply(1, PutCommand(b"other", 1, 1, 1, key, b"later"))
    retry = c.apply(1, PutCommand(b"cl", 5, 5, 1, key, b"once"))
    assert retry == first  # the cached reply, carried with the sessions
    assert c.sms[1].get(key)[0] == b"later"


def test_resume_after_the_coordinator_died_mid_way() -> None:
    for stop_at in ("catchup", "fence", "delta", "ring_set", "drop", "batch1", "batch2",
                    "batch3"):
        c = FakeCluster([0, 1])
        for i in range(200):
            c.put(f"k{i}".encode(), f"v{i}".encode())
        c.add(2)

        def die(step: str, stop_at: str = stop_at) -> None:
            if step == stop_at:
                raise RuntimeError("coordinator killed")

        with pytest.raises(RuntimeError):
            Rebalancer(c, batch_keys=5, on_step=die, poll_s=0).add_shard(2)  # type: ignore[arg-type]
        r = Rebalancer(c, batch_keys=5, poll_s=0)  # type: ignore[arg-type]
        with pytest.raises(RebalanceError, match="resume"):
            r.add_shard(3)
        assert r.resume() is not None, stop_at
        assert r.pending() is None
        _check_final(c, {f"k{i}".encode(): f"v{i}".encode() for i in range(200)})


def test_a_target_refuses_to_flip_without_the_data() -> None:
    c = FakeCluster([0])
    c.put(b"a", b"1")
    c.add(1)
    new = ring_adding(c.ring, 1)
    result = c.apply(1, RingSet(new))
    assert not result.ok
    assert c.sms[1].ownership.epoch == 1
    assert c.apply(1, DropUnowned(2)).ok is False


def test_plans() -> None:
    old = RingConfig(3, (0, 1, 2), 32)
    p = Plan.of(old, ring_adding(old, 5))
    assert p.targets == [5] and set(p.sources) <= {0, 1, 2}
    q = Plan.of(old, ring_removing(old, 1))
    assert q.sources == [1] and set(q.targets) == {0, 2}
    with pytest.raises(RebalanceError):
        ring_removing(RingConfig(1, (0,), 8), 0)
    with pytest.raises(ValueError):
        Plan.of(old, RingConfig(5, (0, 1), 32))


def test_admin_input_is_checked() -> None:
    old, new = RingConfig(1, (0,), 8), RingConfig(2, (0, 1), 8)
    assert isinstance(admin_command(AdminFence(b"", 1, 0, old, new)), Fence)
    with pytest.raises(AdminError):  # not a command: answered at once, never proposed
        admin_command(AdminPush(b"", 1, 0, old, new, 1, Phase.COPY, 0, b"", (), 10, 100))
    sm = KVStateMachine(shard_id=0, ring=old)
    targets = (Target("n1", "inproc://n1"),)
    with pytest.raises(AdminError):  # no MIGRATE_OUT here yet
        admin_request(sm, LeaderTasks(), AdminPush(
            b"", 1, 0, old, new, 1, Phase.CATCHUP, 0, b"", targets, 10, 100))
    sm.apply_command(1, MigrateOut(old, new))
    with pytest.raises(AdminError):  # the final delta before the fence
        admin_request(sm, LeaderTasks(), AdminPush(
            b"", 1, 0, old, new, 1, Phase.DELTA, 0, b"", targets, 10, 100))
    with pytest.raises(AdminError):  # phase 1 without anywhere to send it
        admin_request(sm, LeaderTasks(), AdminPush(
            b"", 1, 0, old, new, 1, Phase.COPY, 0, b"", (), 10, 100))
    with pytest.raises(AdminError):  # to itself
        admin_request(sm, LeaderTasks(), AdminPush(
            b"", 1, 0, old, new, 0, Phase.COPY, 0, b"", targets, 10, 100))


def test_snapshot_keeps_the_migration_state() -> None:
    c = FakeCluster([0])
    for i in range(30):
        c.put(f"k{i}".encode(), b"x")
    c.add(1)

    def die(step: str) -> None:
        if step == "delta":
            raise RuntimeError

    with pytest.raises(RuntimeError):
        Rebalancer(c, on_step=die, poll_s=0).add_shard(1)  # type: ignore[arg-type]
    for s in (0, 1):
        copy = KVStateMachine(shard_id=s)
        copy.restore(c.sms[s].snapshot_bytes())
        assert copy == c.sms[s]
        assert copy.ownership.info() == c.sms[s].ownership.info()


CHAOS_KEYS = [f"k{i:03d}".encode() for i in range(150)]


def test_a_key_deleted_before_the_move_comes_back_with_a_higher_version() -> None:
    """What the chaos rarely reaches: no moving key is left to carry a high version to
    the new owner, so only MIGRATE_SESSIONS' ``version_next`` keeps versions rising."""
    c = FakeCluster([0])
    new = Ring(ring_adding(c.ring, 1))
    gone = next(k for k in CHAOS_KEYS if new.shard_for(k) == 1)
    c.put(gone, b"x")
    for key in [k for k in CHAOS_KEYS if new.shard_for(k) == 0][:50]:
        c.put(key, b"y")
    deleted = c.apply(0, DeleteCommand(b"d", 1, 1, 1, gone))
    assert isinstance(deleted, DeleteReply) and deleted.deleted
    c.add(1)
    Rebalancer(c, poll_s=0).add_shard(1)  # type: ignore[arg-type]
    again = c.put(gone, b"again")
    assert isinstance(again, PutReply) and again.version > deleted.version
