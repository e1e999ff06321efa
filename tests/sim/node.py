"""SimNode: one storage node in the simulation, the production node core in a tiny shell.

Everything a storage node decides is the production code: ``NodeCore`` (admission,
leader gating, pending writes, reads, redirects, snapshots, heartbeats, migration
streams) around the real ``Replica`` and ``KVStateMachine``. This shell does what
``storage_node/node.py`` does with sockets and files, with the simulated network and
``SimDisk`` instead, in the same order (``node_core.py``'s contract): send appends,
persist (snapshot, hard state, truncation, entries; then ``persisted``), send votes and
acks, ``advance``, ``settle``; then migration batches, queued replies, the heartbeat and
the snapshot trigger. One deviation, documented: the SimDisk writes a received snapshot
before the hard state (one ``write`` call holds hard state, truncation and entries).

Wire: the broker sends request frames exactly as a broker's backend delivers them
(``[client_ident, header(, blob)]`` or ``[b"", RequestBatch | Campaign | Heard]``);
replies go back as frames to the broker address they came from; Raft messages travel between nodes
as message objects (the codec is tested on its own; encoding every append would only
slow the sweep); migration batches and acks travel as frames, as on the peer socket.

Before handing a round to the core the shell checks the invariants it can see: no
truncation below what was applied, every applied (index, term, data) equal everywhere
(``World.check_commit``), a snapshot consistent with what was applied at its index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tests.sim.disk import SimDisk
from zkv.protocol import codec
from zkv.protocol.messages import Heartbeat, MigrateAck
from zkv.protocol.ring import Ring, RingConfig
from zkv.storage_node.membership import unwrap_snapshot
from zkv.storage_node.node_core import NodeCore, NodeCoreConfig
from zkv.storage_node.push import LeaderTasks
from zkv.storage_node.replica import Replica, ReplicaConfig
from zkv.storage_node.state_machine import KVStateMachine

if TYPE_CHECKING:
    from tests.sim.cluster import World

#: The simulated wall clock's epoch: ``ts_ms`` = this + simulated milliseconds.
WALL_EPOCH_MS = 1_700_000_000_000
PEER = "peer"  # the origin of frames that came on the peer socket


class SimNode:
    def __init__(self, world: World, node_id: str, members: tuple[str, ...], shard_id: int = 0,
                 ring: RingConfig | None = None, peer_addrs: dict[str, str] | None = None) -> None:
        self.world = world
        self.id = node_id
        self.shard_id = shard_id
        self.ring = ring or RingConfig(1, (shard_id,), 16)
        self.members = members
        self.cfg = ReplicaConfig(
            node_id=node_id,
            members=members,
            heartbeat_interval_ms=world.cfg.heartbeat_ms,
            election_timeout_ms=world.cfg.election_timeout_ms,
        )
        self.disk = SimDisk(world.cfg.fsync)
        self.node: NodeCore | None = None
        self.incarnation = 0
        self.paused_until = 0.0
        self.max_term = 0  # highest term any incarnation reached (durable with fsync=always)
        self.max_commit = 0  # highest commit index this incarnation reported

    # ------------------------------------------------------------------ lifecycle

    @property
    def up(self) -> bool:
        return self.node is not None

    @property
    def core(self) -> Replica | None:
        return self.node.replica if self.node is not None else None

    @property
    def state(self) -> KVStateMachine:
        assert self.node is not None
        return self.node.state

    def start(self) -> None:
        """Recover from the SimDisk like ``StorageNode._recover``."""
        w = self.world
        img = self.disk.recover()
        snap = img.snapshot
        state = KVStateMachine(shard_id=self.shard_id, ring=self.ring)
        if snap is not None:
            state.restore(unwrap_snapshot(snap[2])[1])  # the configuration, then the state
        replica = Replica(self.cfg, img.hard_state, img.log, snap)
        self.incarnation += 1
        tasks = LeaderTasks(seq0=(self.incarnation * 7919 + len(self.id)) << 20)
        config = NodeCoreConfig(
            self.id, self.shard_id, self.members, self.id, w.cfg.heartbeat_ms,
            w.cfg.snapshot_entries or 1 << 60, pid=self.incarnation,
            info={"fsync": w.cfg.fsync},
        )  # fmt: skip
        self.node = NodeCore(config, replica, state, Ring(self.ring), tasks)
        self.max_commit = replica.commit_index
        self.paused_until = 0.0
        inc = self.incarnation
        w.at(w.now + w.rng.uniform(0, 0.02), self._tick, inc)

    def crash(self) -> None:
        self.node = None
        self.disk.crash()

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)

    def paused(self) -> bool:
        return self.world.now < self.paused_until

    # ------------------------------------------------------------------ events

    def _tick(self, inc: int) -> None:
        if inc != self.incarnation or self.node is None:
            return
        w = self.world
        if not self.paused():
            self.node.tick(w.now, WALL_EPOCH_MS + int(w.now * 1000))
            self._turn()
            if w.cfg.fsync == "never" and w.rng.random() < 0.05:
                self.disk.flush()
        w.at(max(w.now, self.paused_until) + w.cfg.tick_ms / 1000, self._tick, inc)

    def deliver(self, src: str, msg: Any) -> None:
        node = self.node
        if node is None:
            return  # the process is down; its socket buffers died with it
        w = self.world
        if self.paused():
            w.net.requeue(src, self.id, msg, self.paused_until)
            return
        if type(msg) is list:  # frames: from a broker, or on the peer socket
            if src in w.brokers:
                node.on_broker_frames(src, msg, w.now, WALL_EPOCH_MS + int(w.now * 1000))
            elif msg and msg[0] == b"ack":
                ack = codec.decode(msg[1:])
                if type(ack) is MigrateAck:
                    node.on_migrate_ack(ack, w.now)
            else:
                node.on_peer_frames(src, msg, w.now)
        else:
            node.replica.step(src, msg, w.now)
        node.tick(w.now, WALL_EPOCH_MS + int(w.now * 1000))
        self._turn()

    # ------------------------------------------------------------------ the shell

    def _turn(self) -> None:
        """What ``StorageNode.run`` does after draining its sockets."""
        node = self.node
        assert node is not None
        w = self.world
        for _ in range(1000):  # a limit on everything: a core that never settles is a bug
            if not node.has_ready():
                break
            nrd = node.ready()
            for to, m in nrd.send_first:
                w.net.send(self.id, to, m, w.now)
            self._persist(nrd.raft)
            for to, m in nrd.send_after:
                w.net.send(self.id, to, m, w.now)
            for e in nrd.raft.committed:
                if e.index > node.state.applied_index:
                    w.check_commit(self, e.index, e.term, e.data)
            node.advance(nrd)
        else:
            w.violation(f"{self.id}: ready() still has work after 1000 rounds")
        node.settle()
        for dst, _addr, batch in node.pump_tasks(w.now):
            w.net.send(self.id, dst, [self.id.encode(), *codec.encode(batch)], w.now)
        self._send_outgoing()
        hb = node.heartbeat(w.now)
        if hb is not None:
            self._heartbeat(hb)
        task = node.take_snapshot()
        if task is not None:
            self.disk.save_snapshot(task.index, task.term, task.data, keep_log=True)
            node.compacted(task)
        node.notes.clear()
        w.check_node(self)

    def _persist(self, rd: Any) -> None:
        node = self.node
        assert node is not None
        w = self.world
        applied = node.state.applied_index
        if rd.truncate_from is not None and rd.truncate_from <= applied:
            w.violation(
                f"{self.id} truncates its log from {rd.truncate_from} but has applied "
                f"up to {applied}: a committed entry would disappear"
            )
        if rd.snapshot is not None:
            index, term, data = rd.snapshot
            if index < applied:
                w.violation(f"{self.id} installs snapshot at {index} below applied {applied}")
            w.check_snapshot(self, index, term, data)
            self.disk.save_snapshot(index, term, data, keep_log=False)
        if rd.hard_state is not None or rd.truncate_from is not None or rd.entries:
            last = self.disk.write(rd.hard_state, rd.truncate_from, rd.entries)
            if rd.entries or rd.truncate_from is not None:
                node.replica.persisted(last)

    def _send_outgoing(self) -> None:
        node = self.node
        assert node is not None
        w = self.world
        for origin, frames in node.take_outgoing():
            if origin == PEER or (type(origin) is str and origin not in w.brokers):
                # a migration ack, to the source leader that sent the batch
                w.net.send(self.id, frames[0].decode(), [b"ack", *frames[1:]], w.now)
            else:
                w.net.send(self.id, origin, list(frames), w.now)  # type: ignore[arg-type]

    def _heartbeat(self, hb: Heartbeat) -> None:
        w = self.world
        for broker in w.brokers:
            w.net.send(self.id, broker, hb, w.now)
