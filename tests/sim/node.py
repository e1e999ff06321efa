"""SimNode: one storage node in the simulation, the production node core in a tiny shell.

Everything a storage node decides is the production code: ``NodeCore`` (admission,
leader gating, pending writes, reads, redirects, snapshots, heartbeats, migration
streams, the full-disk gate) around the real ``Replica`` and ``KVStateMachine``. This
shell does what ``storage_node/node.py`` and ``node_disk.py`` do with sockets and files,
with the simulated network and ``SimDisk`` instead, in the same order (``node_core.py``'s
contract): send appends, persist (hard state, snapshot, truncation, entries; then
``persisted``), send what ``after_persist`` lets out (votes and acks), ``advance``,
``settle``; then migration batches, queued replies, the heartbeat (and the retry of what
a full disk refused) and the snapshot trigger. A start goes through the production
recovery plan and identity rules (``restart.py``); a refusal leaves the node down.

Wire: the broker sends request frames exactly as a broker's backend delivers them
(``[client_ident, header(, blob)]`` or ``[b"", RequestBatch | Campaign | Heard]``);
replies go back as frames to the broker address they came from; Raft messages travel between nodes
as message objects (the codec is tested on its own; encoding every append would only
slow the sweep); migration batches and acks travel as frames, as on the peer socket.

Before handing a round to the core the shell checks the invariants it can see: no
truncation below what was applied, every applied (index, term, data) equal everywhere
(``World.check_commit``), a snapshot consistent with what was applied at its index, and
no vote or voter's ack from a node that lost its disk and was not re-admitted since.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tests.sim.disk import PowerLoss, SimDisk
from tests.sim.restart import CLUSTER_ID, Restarted, recover
from zkv.protocol import codec
from zkv.protocol.messages import AppendReply, Heartbeat, MigrateAck, PeerMessage, VoteReply
from zkv.protocol.ring import Ring, RingConfig
from zkv.storage_node.disk_full import Unpersisted
from zkv.storage_node.graceful_stop import GracefulStop
from zkv.storage_node.identity import Identity, IdentityState, initial_members
from zkv.storage_node.membership import unwrap_snapshot
from zkv.storage_node.node_core import NodeCore, NodeCoreConfig
from zkv.storage_node.node_disk import DISK_RETRY_S, SNAPSHOT_RETRY_S
from zkv.storage_node.peer_link import Announcement
from zkv.storage_node.push import LeaderTasks
from zkv.storage_node.recovery import Refusal
from zkv.storage_node.replica import Ready, Replica, ReplicaConfig
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.wal import DiskFullError

if TYPE_CHECKING:
    from tests.sim.cluster import World

#: The simulated wall clock's epoch: ``ts_ms`` = this + simulated milliseconds.
WALL_EPOCH_MS = 1_700_000_000_000
PEER = "peer"  # the origin of frames that came on the peer socket
#: keys decoded per tick while a snapshot from the leader is installed
INSTALL_RECORDS_PER_STEP = 3



class SimNode:
    def __init__(self, world: World, node_id: str, members: tuple[str, ...], shard_id: int = 0,
                 ring: RingConfig | None = None, peer_addrs: dict[str, str] | None = None,
                 joining: bool = False) -> None:
        self.world = world
        self.id = node_id
        self.shard_id = shard_id
        self.ring = ring or RingConfig(1, (shard_id,), 16)
        #: ``--peers`` and itself; a start takes them from the world's spec when it names
        #: this node (``World.spec_members``: what the supervisor reads in cluster.json)
        self.members = members
        self.disk = SimDisk(world.cfg.fsync)
        #: a node added by add-replica / replace-replica: an empty data dir started
        #: without --bootstrap, a non-voter until a configuration promotes it
        self.joining = joining
        if not joining:
            # provisioned as a founded member (what a successful --bootstrap leaves)
            self.disk.save_identity(Identity("sim", shard_id, node_id, f"{node_id}.0",
                                             IdentityState.VOTER,
                                             founding=tuple(sorted(members))))
        self.identity: Identity | None = None
        self.node: NodeCore | None = None
        self.incarnation = 0
        self.paused_until = 0.0
        self.max_term = 0  # highest term any incarnation reached (durable with fsync=always)
        self.max_commit = 0  # highest commit index this incarnation reported
        #: the simulator's knowledge, for the invariants: False from a lost disk until a
        #: leader re-admits this data dir; ``at_risk``: a fault may have cost it state
        self.whole = True
        self.at_risk = False
        self.refusal: Refusal | None = None
        #: a SIGTERM in progress (``graceful_stop.py``), and how long the node stays down
        self.stopping: tuple[GracefulStop, float] | None = None
        self._reset_disk_shell()

    def _reset_disk_shell(self) -> None:
        """What ``node_disk.py`` keeps per process: what a full disk refused, retries."""
        self.unpersisted = Unpersisted()
        self.disk_full_since: float | None = None
        self.disk_retry_at = 0.0
        self.snapshot_retry_at = 0.0
        self.disk_snapshot_index = 0

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

    def start(self) -> Refusal | None:
        """Recover from the SimDisk like ``StorageNode._recover``; a refusal (returned)
        leaves the node down, as ``zkv-node`` exits non-zero."""
        w = self.world
        self.incarnation += 1
        self.members = w.spec_members(self) or self.members
        found = recover(self.disk, self.id, self.shard_id, w.cfg.fsync,
                        f"{self.id}.{self.incarnation}")
        if not isinstance(found, Restarted):
            self.refusal = found
            w.count("refused")
            w.trace.append((w.now, f"{self.id} refuses", found.message()))
            return found
        self.refusal = None
        self.at_risk = False
        if found.torn:
            w.count("torn tail dropped")
        for note in found.notes:
            w.count("recovery note")
            w.trace.append((w.now, f"{self.id} recovery", note))
        snap = found.snapshot
        state = KVStateMachine(shard_id=self.shard_id, ring=self.ring)
        if snap is not None:
            state.restore(unwrap_snapshot(snap[2])[1])  # the configuration, then the state
        self.identity = ident = found.identity
        rcfg = ReplicaConfig(  # the founding configuration wins over the spec's --peers
            node_id=self.id, members=initial_members(ident, self.id, self.members),
            heartbeat_interval_ms=w.cfg.heartbeat_ms,
            election_timeout_ms=w.cfg.election_timeout_ms, voter=ident.voter,
            incarnation=ident.incarnation, promote_lag_max=w.promote_lag_max,
        )  # fmt: skip
        replica = Replica(rcfg, found.hard_state, found.entries, snap)
        tasks = LeaderTasks(seq0=(self.incarnation * 7919 + len(self.id)) << 20)
        config = NodeCoreConfig(
            self.id, self.shard_id, self.members, self.id, w.cfg.heartbeat_ms,
            w.cfg.snapshot_entries or 1 << 60, pid=self.incarnation,
            info={"fsync": w.cfg.fsync}, cluster_id=CLUSTER_ID,
            # a few keys per tick: every install spans turns that crashes, elections
            # and more installs can interleave with (production decodes 8,192)
            install_records_per_step=INSTALL_RECORDS_PER_STEP,
        )  # fmt: skip
        self.node = NodeCore(config, replica, state, Ring(self.ring), tasks)
        self._reset_disk_shell()
        self.disk_snapshot_index = replica.snap_index
        self.max_commit = replica.commit_index
        self.paused_until = 0.0
        inc = self.incarnation
        w.at(w.now + w.rng.uniform(0, 0.02), self._tick, inc)
        return None

    def crash(self) -> None:
        self.node = None
        self.stopping = None
        self.disk.crash()

    def terminate(self, down_s: float) -> None:
        """SIGTERM: the node hands over if it leads, exits when ``GracefulStop`` says,
        keeps its disk as it is (a process exit loses no page cache) and is started
        again ``down_s`` after it exited."""
        w = self.world
        self.stopping = (GracefulStop(self.shard_id, w.cfg.heartbeat_ms,
                                      w.cfg.election_timeout_ms), down_s)

    def lose_disk(self) -> None:
        """The disk is gone (the node must be down): it restarts empty, a non-voter."""
        assert self.node is None
        self.disk.wipe()
        self.whole = False
        self.max_term = 0  # an empty disk starts at term 0: that is the point

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
            if self.node is None:
                return  # the power failed during the turn
            if self.stopping is not None and self._exits():
                return
            if w.cfg.fsync == "never" and w.rng.random() < 0.05:
                self.disk.flush()
        w.at(max(w.now, self.paused_until) + w.cfg.tick_ms / 1000, self._tick, inc)

    def _exits(self) -> bool:
        """Ask the stop in progress whether to exit now (as ``StorageNode.run`` does
        once per turn); if so the process is gone and its restart is scheduled."""
        assert self.stopping is not None and self.node is not None
        w = self.world
        stop, down_s = self.stopping
        notes: list[str] = []
        if not stop.due(self.node.replica, w.now, notes):
            for note in notes:
                w.trace.append((w.now, f"{self.id} stop", note))
                w.count("handover")
            return False
        w.trace.append((w.now, "EXIT", self.id))
        w.count("graceful stop")
        self.node = None
        self.stopping = None
        w.at(w.now + down_s, w.faults.restart, self.id)
        return True

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
            # what NodeCore.on_peer_frames does for the real socket: the connection's
            # announcement (``peer_link``) vouches for a node of this shard, then the
            # full-disk gate
            if src not in node.replica.vouched:
                node.vouch_for(src, self._announcement(src))
            if node.unpersisted:
                msg = node.disk_gate.incoming(msg)
            if msg is not None:
                node.replica.step(src, msg, w.now)
        node.tick(w.now, WALL_EPOCH_MS + int(w.now * 1000))
        self._turn()

    def _announcement(self, src: str) -> str:
        """What ``src``'s connection to us announced (``node_sockets._announce``)."""
        w = self.world
        peer = w.nodes.get(src) or w.retired.get(src)
        if peer is None:
            return ""
        inc = peer.identity.incarnation if peer.identity is not None else ""
        option = Announcement(src, self.id, peer.shard_id, CLUSTER_ID, inc).option()
        return option.decode().partition(":")[2]

    # ------------------------------------------------------------------ the shell

    def _turn(self) -> None:
        """What ``StorageNode.run`` does after draining its sockets; a power loss in the
        middle of a write ends the process there."""
        try:
            self._run_turn()
        except PowerLoss as exc:
            w = self.world
            w.trace.append((w.now, f"{self.id} power loss", str(exc)))
            w.count("power loss")
            self.crash()
            w.faults.powered_off(self)

    def _run_turn(self) -> None:
        node = self.node
        assert node is not None
        w = self.world
        for _ in range(1000):  # a limit on everything: a core that never settles is a bug
            if not node.has_ready():
                break
            nrd = node.ready()
            for to, m in nrd.send_first:
                w.net.send(self.id, to, m, w.now)
            durable = self._persist(nrd.raft)
            for to, m in node.after_persist(nrd, durable, self._durable_index(), w.now):
                self._check_promise(to, m)
                w.net.send(self.id, to, m, w.now)
            for e in nrd.raft.committed:
                if e.index > node.state.applied_index:
                    w.check_commit(self, e.index, e.term, e.data)
            node.advance(nrd)
        else:
            w.violation(f"{self.id}: ready() still has work after 1000 rounds")
        node.settle()
        self._check_promoted(node.replica)
        for dst, _addr, batch in node.pump_tasks(w.now):
            w.net.send(self.id, dst, [self.id.encode(), *codec.encode(batch)], w.now)
        self._send_outgoing()
        hb = node.heartbeat(w.now)
        if hb is not None:
            self._heartbeat(hb)
            if self.unpersisted:
                self._persist(Ready())  # retry what a full disk refused
        self._maybe_snapshot(node)
        for note in node.notes:
            if note.startswith(("installing snapshot", "installed snapshot")):
                w.count(note.split(" at ")[0])  # an install from the leader, begun or whole
        node.notes.clear()
        w.check_node(self)

    def _check_promise(self, to: str, msg: PeerMessage) -> None:
        """What a vote or an ack promises is on disk (fsync=always: the durable image;
        a full disk must not let more out), and invariant 7."""
        w = self.world
        img = self.disk.durable if w.cfg.fsync == "always" else self.disk.current
        if type(msg) is AppendReply and msg.success:
            held = max(img.last_index, img.snapshot_index)
            if msg.match_index > held:
                w.violation(f"{self.id} acknowledges up to {msg.match_index} but its disk "
                            f"holds up to {held}: {msg}")
        elif type(msg) is VoteReply and msg.granted and not msg.pre_vote:
            hard = img.hard_state
            if hard is None or (hard.term, hard.voted_for) != (msg.term, to):
                w.violation(f"{self.id} grants {to} its vote in term {msg.term} but its disk "
                            f"says {hard}")
        self._check_whole(msg)

    def _check_whole(self, msg: PeerMessage) -> None:
        """Invariant 7: a node that lost its disk never votes or acks as a voter until a
        leader re-admitted this data dir; nor does a new node before its promotion."""
        if self.whole and not self.joining:
            return
        core, ident = self.core, self.identity
        conf = core.membership if core is not None else None
        if conf is not None and ident is not None and self.id in conf.voters and (
                self.id, ident.incarnation) in conf.incarnations:
            # the configuration admitting this data dir came in this very round (read
            # here, not through ``Membership.admits``: the rule under test)
            return
        if (type(msg) is VoteReply and msg.granted) or (type(msg) is AppendReply and msg.voter):
            why = ("lost its disk and was not re-admitted" if not self.whole
                   else "joined empty and was not promoted")
            self.world.violation(f"{self.id} {why}, yet sends {msg}")

    def _check_promoted(self, core: Replica) -> None:
        """``StorageNode._handle_ready``: a configuration admitted this data dir."""
        if core.promoted and self.identity is not None:
            core.promoted = False
            self.identity = self.identity.with_state(IdentityState.VOTER)
            self.disk.save_identity(self.identity)
            core.set_voter(True)
            self.world.trace.append((self.world.now, f"{self.id} admitted", self.identity))
            self.world.count("promoted" if self.joining and self.whole else "re-admitted")
            self.whole = True
            self.joining = False

    def _persist(self, rd: Ready) -> bool:
        """``NodeDisk._persist``: False while the disk is full (what did not fit waits)."""
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
        todo = self.unpersisted
        waiting = bool(todo)
        todo.add(rd.hard_state, rd.snapshot, rd.truncate_from, list(rd.entries))
        try:
            if not todo:
                return True
            if waiting and w.now < self.disk_retry_at:
                return False
            try:
                self._write_durable(node, todo)
            except DiskFullError:
                if self.disk_full_since is None:
                    self.disk_full_since = w.now
                    w.trace.append((w.now, f"{self.id} disk full", None))
                    w.count("disk full")
                self.disk_retry_at = w.now + DISK_RETRY_S
                return False
            self.disk_full_since = None
            return True
        finally:
            node.unpersisted = bool(todo)
            node.disk_full = self.disk_full_since is not None

    def _write_durable(self, node: NodeCore, todo: Unpersisted) -> None:
        """``NodeDisk._write_durable``: in order, clearing each part once it is durable."""
        disk = self.disk
        if todo.hard_state is not None:
            disk.save_hard_state(todo.hard_state)
            todo.hard_state = None
        if todo.snapshot is not None:
            index, term, data = todo.snapshot
            disk.save_snapshot(index, term, data)
            disk.reset(index + 1)
            todo.snapshot = None
            self.disk_snapshot_index = index
        wrote = False
        if todo.truncate_from is not None:
            disk.truncate_from(todo.truncate_from)
            todo.truncate_from, wrote = None, True
        if todo.entries:
            disk.append(todo.entries)
            todo.entries, wrote = [], True
        if wrote:
            node.replica.persisted(disk.current.last_index)

    def _durable_index(self) -> int:
        return max(self.disk.current.last_index, self.disk_snapshot_index)

    def _maybe_snapshot(self, node: NodeCore) -> None:
        """``NodeDisk._snapshot_inline``: write it, then compact to the older kept one."""
        w = self.world
        if w.now < self.snapshot_retry_at:
            return
        task = node.take_snapshot()
        if task is None:
            return
        try:
            self.disk.save_snapshot(task.index, task.term, task.data)
        except DiskFullError:
            w.count("snapshot refused: disk full")
            node.snapshot_failed()
            self.snapshot_retry_at = w.now + SNAPSHOT_RETRY_S
            return
        self.disk_snapshot_index = task.index
        node.compacted(task)
        self.disk.compact()

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
