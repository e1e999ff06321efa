"""The node core: every decision a storage node makes around its replica core. Pure.

No sockets, clock, threads, files or global random: the shell (``node.py``, or the
simulator) feeds it frames and events with the time and performs what it returns, in
the manner of ``Replica.ready()`` (``replica.py``, the model):

- ``on_broker_frames(origin, frames, now, ts_ms)``, ``on_request(...)``: a client request
  or a broker's ``RequestBatch``/``Campaign``. ``origin`` is opaque (the shell's socket,
  the simulator's address): replies go back to where the request came from.
  ``ts_ms`` is the wall clock the shell read for this turn; a leader stamps it into
  every write it proposes (session expiry is judged by the same clock on every replica).
- ``on_peer_frames(origin, frames, now)``: Raft traffic for the replica core, or a source
  leader's ``MigrateBatch``; ``on_migrate_ack(ack, now)`` for our own streams.
- ``ready()`` -> ``NodeReady`` while there is work: the shell sends ``send_first``
  (appends and snapshot chunks: Raft lets a leader send them before its own fsync, as it
  counts itself toward a commit only once persisted, so followers' fsyncs overlap ours),
  persists ``raft`` (hard state, snapshot, truncation, entries, one sync) and reports
  ``replica.persisted``, sends ``send_after`` (votes and acks promise durable state),
  then calls ``advance(rd)``: install a snapshot into the state machine, fail writes
  whose log entries were truncated, apply ``committed``, queue reads. After the loop,
  ``settle()`` serves reads whose index is applied and notices a step-down.
- ``tick(now)``: the replica's timers, then the availability rule (``broker_contact.py``:
  a leader that no broker has confirmed hearing for an election timeout steps down).
- ``pump_tasks(now)``: migration batches to send; ``heartbeat(now)``: the heartbeat,
  when due; ``take_snapshot()`` / ``compacted(...)``: the snapshot trigger;
  ``take_outgoing()``: every queued reply, once per loop turn (batched: ``node_requests.py``).

Rules (request admission and leader gating: ``node_requests.py``):
- A write is answered once its entry is applied. A pending write fails ``NOT_LEADER``
  when we step down, when its entry is truncated from our log, or when the entry
  applied at its index is of another term (another leader's): never a reply for an
  entry that is not ours.
- A linearizable read is answered once the state machine applied its read index, and
  ownership is checked again then: a fence applied since it arrived means the key may
  already be written at its new owner.
- A snapshot is taken every ``snapshot_entries`` applied entries or ``snapshot_bytes``
  bytes of applied commands, whichever comes first (large values would otherwise keep
  the in-memory log huge), and never while the disk owes us a write.
- While something waits for the disk (``unpersisted``, set by the shell), peer traffic
  goes through ``DiskFullGate`` (``disk_full.py``): nothing that needs the disk comes
  in, and nothing that promises durable state goes out (``after_persist``).
- Stepping down clears the leader-only state: pending writes and migration streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import (
    AdminAppliedReply,
    AppendEntries,
    Applied,
    FoundingAnswer,
    FoundingProbe,
    Heartbeat,
    InstallSnapshot,
    MigrateAck,
    MigrateBatch,
    PeerMessage,
    Role,
    TimeoutNow,
)
from zkv.storage_node import peer_link
from zkv.storage_node.commands import encode_command
from zkv.storage_node.disk_full import DiskFullGate
from zkv.storage_node.node_requests import Frames, NodeCoreConfig, Pending, RequestCore
from zkv.storage_node.node_snapshots import SnapshotDecisions, SnapshotTask
from zkv.storage_node.push import command_for, not_leader_ack
from zkv.storage_node.replica import Ready, Replica
from zkv.storage_node.snapshot_loader import SnapshotLoader
from zkv.storage_node.ttl_requests import sweep_command

#: Expiry sweep entries proposed per loop turn at most (each lists up to
#: ``ttl_commands.SWEEP_KEYS_MAX`` keys): one from ``turn``, one chained in ``advance``.
SWEEPS_PER_TURN = 2
#: The timers of ``tick`` run at most this often under load (the shell asks
#: ``timers_due``): one turn per request at thousands a second paid ~8% of a node's CPU
#: for timers whose deadlines are tens of milliseconds apart. A timer may now run up to
#: 2 ms late under load, where an idle node's poll already waits ``heartbeat_ms / 4``
#: (25 ms) between turns.
TIMER_STEP_S = 0.002
PEER_TYPES = frozenset({50, 51, 52, 53, 54, 55, TimeoutNow.TYPE})
#: What a leader may send before its own log is durable (see the module docstring).
_SEND_BEFORE_PERSIST = (AppendEntries, InstallSnapshot)

__all__ = ["Frames", "NodeCore", "NodeCoreConfig", "NodeReady", "Pending", "SnapshotTask"]


@dataclass(slots=True)
class NodeReady:
    """One round of the replica's ``Ready``, with its messages split by when to send."""

    raft: Ready
    send_first: list[tuple[str, PeerMessage]]
    send_after: list[tuple[str, PeerMessage]]


class NodeCore(RequestCore, SnapshotDecisions, peer_link.PeerLinks):
    """A storage node's decisions; see the module docstring for the contract."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.disk_gate = DiskFullGate(self.config.heartbeat_ms / 1000)
        #: the expiry sweep's per-turn state (``tick``): the turn's ``now``, sweeps proposed
        self._tick_now = 0.0
        self._sweeps_this_turn = 0
        #: when ``timers_due`` next says the timers must run (``tick`` moves it)
        self._timers_next = 0.0
        #: peer connections refused for reaching the wrong node (``peer_link``), the
        #: verdict per announcement, and when to redial a peer that was the wrong node
        self.misrouted = 0
        self._link_verdicts: dict[str, str | None] = {}
        self.redials = peer_link.Redials()
        #: a snapshot was begun and is not on disk yet (``begin_snapshot``)
        self.snapshot_running = False
        #: the leader's snapshot being decoded, and what committed meanwhile
        #: (``node_snapshots.py``)
        self.installing: tuple[int, SnapshotLoader] | None = None
        self.install_backlog: list[Any] = []

    def tick(self, now: float, ts_ms: int | None = None) -> None:
        """The replica's timers, then the availability rule; with the wall clock
        ``ts_ms``, the turn's expiry sweep too (``turn``). The simulator calls it every
        step; the shell through ``tick_when_due``, and ``turn`` on the other turns."""
        self._timers_next = now + TIMER_STEP_S
        replica = self.replica
        replica.tick(now)
        if self.installing is not None:
            self.install_step()
        why = self.broker_contact.step_down_reason(replica.role is Role.LEADER, replica.term, now)
        if why:
            replica.step_down(now)
            self.notes.append(why)
        if self.parked_watches:
            self.expire_watches(now)
        if ts_ms is not None:
            self.turn(now, ts_ms)

    def timers_due(self, now: float) -> bool:
        """Whether the shell's turn at ``now`` must run ``tick``: ``TIMER_STEP_S`` since
        the last, or every turn while a snapshot install or a listing is in progress
        (each step of theirs runs from the timers) or a leader has a membership change
        to drive (``Replica.reconfiguring``). Between, ``turn`` is enough: a timer is at
        most ``TIMER_STEP_S`` late, where an idle node's poll waits longer."""
        return now >= self._timers_next or self.busy() or self.replica.reconfiguring()

    def tick_when_due(self, now: float, ts_ms: int) -> None:
        """The shell's call once per loop turn: ``tick`` when ``timers_due``, else
        ``turn``."""
        if self.timers_due(now):
            self.tick(now, ts_ms)
        else:
            self.turn(now, ts_ms)

    def turn(self, now: float, ts_ms: int) -> None:
        """Every loop turn: the wall clock ``ts_ms``, and the expiry sweep, whose chain
        (``advance``) is bounded per turn, not per timer step."""
        if ts_ms > self.wall_ms:
            self.wall_ms = ts_ms
        self._tick_now = now
        self._sweeps_this_turn = 0
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Propose the next expiry sweep: leader only, one entry in flight at a time,
        at most ``SWEEPS_PER_TURN`` per loop turn (``advance`` chains the next as soon
        as one applies, so the rate is one per commit round trip, not per poll wait)."""
        replica, state = self.replica, self.state
        if (replica.role is not Role.LEADER or not len(state.expiry) or self.disk_full
                or self.unpersisted or self._sweeps_this_turn >= SWEEPS_PER_TURN):
            return
        term, index = self.sweep_inflight
        if term == replica.term and index > state.applied_index:
            return
        cmd = sweep_command(state, self.wall_ms)
        if cmd is None:
            return
        proposed = replica.propose(encode_command(cmd), now)
        if proposed is not None:
            self.sweep_inflight = (replica.term, proposed)
            self._sweeps_this_turn += 1

    # ------------------------------------------------------------------ ready

    def has_ready(self) -> bool:
        return self.replica.has_ready()

    def ready(self) -> NodeReady:
        rd = self.replica.ready()
        first: list[tuple[str, PeerMessage]] = []
        later = rd.messages
        if rd.hard_state is None and rd.messages:
            later = []
            for to, msg in rd.messages:
                (first if isinstance(msg, _SEND_BEFORE_PERSIST) else later).append((to, msg))
        return NodeReady(rd, first, later)

    def after_persist(self, nrd: NodeReady, durable: bool, durable_index: int,
                      now: float) -> list[tuple[str, PeerMessage]]:
        """What of ``send_after`` may go, now that the shell tried to persist ``nrd``:
        all of it when durable; else only what promises nothing beyond ``durable_index``."""
        if durable:
            return nrd.send_after
        out = []
        for to, msg in nrd.send_after:
            gated = self.disk_gate.outgoing(msg, durable_index, now)
            if gated is not None:
                out.append((to, gated))
        return out

    def advance(self, nrd: NodeReady) -> None:
        """``nrd.raft`` is persisted: install, fail what was truncated, apply, queue reads."""
        rd = nrd.raft
        if rd.snapshot is not None:
            index, _term, blob = rd.snapshot
            self.begin_install(index, blob)  # decoded a slice per tick
        if rd.truncate_from is not None and self.pending_writes:
            self._fail_from(rd.truncate_from)
        if rd.committed and self.installing is not None:
            self.install_backlog.extend(rd.committed)  # applied once the snapshot is
        elif rd.committed:
            self._apply(rd.committed)
            if 0 < self.sweep_inflight[1] <= rd.committed[-1].index:
                self._sweep(self._tick_now)  # the sweep in flight applied: chain the next
        for token, index in rd.reads:
            self.waiting_reads.append((index, token))  # type: ignore[arg-type]
        for token in rd.failed_reads:
            p: Pending = token  # type: ignore[assignment]
            self._reply(p.origin, p.ident, self.not_leader(p.request_id))

    def _apply(self, committed: list[Any]) -> None:
        state, pending_writes, quota = self.state, self.pending_writes, self.quota
        for entry in committed:
            pending = pending_writes.pop(entry.index, None) if pending_writes else None
            if pending is None:
                state.apply(entry.index, entry.data)
                continue
            if pending.term != entry.term:  # another leader's entry took our index
                state.apply(entry.index, entry.data)
                self._fail(pending)
                continue
            assert pending.command is not None
            reply = state.apply_command(entry.index, pending.command)
            quota.applied(entry.index)
            if pending.ack_shard >= 0:  # a stream batch: answer the source leader
                self._ack(pending, reply if type(reply) is Applied else Applied(False))
            elif type(reply) is Applied:  # a ring command: answer the coordinator
                self._reply(pending.origin, pending.ident,
                            AdminAppliedReply(pending.request_id, reply))
            elif reply is not None:
                self._reply(pending.origin, pending.ident, reply)
        self.replica.applied(committed[-1].index)
        self.log_bytes += sum(len(e.data) for e in committed)

    def _fail(self, pending: Pending) -> None:
        if pending.ack_shard >= 0:
            self._ack(pending, Applied(False, not_leader=True))
        else:
            self._reply(pending.origin, pending.ident, self.not_leader(pending.request_id))

    def _fail_from(self, index: int) -> None:
        for i in [i for i in self.pending_writes if i >= index]:
            self._fail(self.pending_writes.pop(i))

    def settle(self) -> None:
        """After the ``ready`` rounds of a turn: serve applied reads, notice a step-down."""
        if self.waiting_reads:
            self._serve_reads()
        if self.parked_watches:
            self.serve_watches()
        replica = self.replica
        is_leader = replica.role is Role.LEADER
        if is_leader == self._was_leader:
            return
        self._was_leader = is_leader
        self._next_heartbeat = 0.0  # tell the brokers at once
        shard = self.config.shard_id
        if is_leader:
            self.notes.append(f"became leader of shard {shard} at term {replica.term}")
            return
        self.notes.append(f"stepped down in shard {shard} at term {replica.term}")
        for pending in self.pending_writes.values():
            self._fail(pending)
        self.pending_writes.clear()
        self.tasks.clear()
        self.quota.clear()

    def _serve_reads(self) -> None:
        applied = self.state.applied_index
        keep = []
        for index, p in self.waiting_reads:
            if index <= applied:
                if p.multi is not None:  # a batch read or scan: ownership per key
                    wait = self.serve_multi_read(p)
                    if wait:
                        keep.append((wait, p))
                elif self._owned(p.origin, p.ident, p.request_id, p.key):
                    wait = self._answer_get(p.origin, p.ident, p.request_id, p.key,
                                            p.ttl_read)
                    if wait:
                        keep.append((wait, p))
            else:
                keep.append((index, p))
        self.waiting_reads = keep

    # ------------------------------------------------------------------ peers, migration

    def on_peer_frames(self, origin: object, frames: list[bytes], now: float,
                       key_node: str | None = None, announced: str | None = None) -> None:
        """``[sender, message...]`` from the peer socket; ``RemoteProtocolError`` if bad.
        ``secure``: the sender is the node id its Curve key authenticated (``key_node``,
        None for a key that is no node's), never the routing id or a payload field, and
        Raft traffic from a key that is not a member of this group changes nothing.
        Migration batches come from other shards' leaders: any node key may send them.
        ``announced``: what the connection announced in its handshake (``peer_link``);
        a connection meant for another node or from another cluster is refused."""
        if len(frames) < 2:
            raise RemoteProtocolError("too few frames")
        if announced is not None and self._refuse_link(origin, frames[0], announced, now):
            return
        msg = codec.decode(frames[1:])
        if type(msg) is MigrateBatch:
            if not self.secure or key_node is not None:
                self.on_migrate_batch(origin, frames[0], msg, now)
            return
        claimed = frames[0].decode(errors="replace")
        sender = claimed if not self.secure else key_node
        if announced is not None and sender is not None:
            self.vouch_for(sender, announced)
        if sender is None or (self.secure and sender not in self._member_keys()):
            self._impostor(key_node, claimed, msg)
            return
        if type(msg) is FoundingProbe or type(msg) is FoundingAnswer:
            self.founding_events.append((sender, msg))
            return
        if getattr(msg, "TYPE", None) not in PEER_TYPES:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} on the peer socket")
        if self.founding_active and type(msg) is AppendEntries and msg.term > 0:
            self.founding_events.append((sender, None))  # a leader: the shard exists
        peer_msg: PeerMessage | None = msg  # type: ignore[assignment]
        if self.unpersisted:  # behind on durability: take nothing that needs the disk
            peer_msg = self.disk_gate.incoming(peer_msg)  # type: ignore[arg-type]
        if peer_msg is not None:
            self.replica.step(sender, peer_msg, now)

    def _member_keys(self) -> set[str]:
        """Who may speak Raft to us: the members in force, those we started with, and
        those whose connection announced this shard (``peer_link.vouch_for``)."""
        return {*self.replica.membership.members, *self.config.members, *self.replica.vouched}

    def _impostor(self, key_node: str | None, claimed: str, msg: object) -> None:
        """Peer traffic from a key that is not a member of this group: ignored, and said
        (the first ten times, then every thousandth)."""
        self.impostors += 1
        if self.impostors <= 10 or self.impostors % 1000 == 0:
            self.notes.append(
                f"ignored {type(msg).__name__} #{self.impostors} from key {key_node!r} "
                f"(claiming {claimed[:64]!r}): not a member of shard {self.config.shard_id}")

    def on_migrate_batch(self, origin: object, ident: bytes, batch: MigrateBatch,
                         now: float) -> None:
        """A source leader's stream batch: propose it, answer once applied."""
        shard = self.config.shard_id
        if batch.dst_shard != shard:
            self._direct.append((origin, (ident, *codec.encode(MigrateAck(
                batch.seq, batch.dst_shard, Applied(False, f"this node serves shard {shard}"),
                "")))))
            return
        if self.replica.role is not Role.LEADER:
            ack = not_leader_ack(batch, self.replica.leader_id or "")
            self._direct.append((origin, (ident, *codec.encode(ack))))
            return
        cmd = command_for(batch)
        self._propose(cmd, Pending(origin, ident, batch.seq, command=cmd,
                                   ack_shard=batch.dst_shard), now)

    def _ack(self, pending: Pending, result: Applied) -> None:
        hint = self.replica.leader_id or "" if result.not_leader else ""
        ack = MigrateAck(pending.request_id, pending.ack_shard, result, hint)
        self._direct.append((pending.origin, (pending.ident, *codec.encode(ack))))

    def on_migrate_ack(self, ack: MigrateAck, now: float) -> None:
        self.tasks.on_ack(ack, now)

    def pump_tasks(self, now: float) -> list[tuple[str, str, MigrateBatch]]:
        """``(node id, peer address, batch)`` of our streams to send now."""
        if not (self.tasks.pushes or self.tasks.drops):
            return []
        if self.replica.role is not Role.LEADER:
            self.tasks.clear()
            return []
        return self.tasks.pump(self.state, now)

    def busy(self) -> bool:
        """A listing or a snapshot install is in progress: the shell should come back
        at once, not sleep."""
        return self.installing is not None or self.tasks.busy()

    # ------------------------------------------------------------------ housekeeping

    def heartbeat(self, now: float) -> Heartbeat | None:
        """The heartbeat to publish, once per ``heartbeat_ms``; None before it is due."""
        if now < self._next_heartbeat:
            return None
        cfg, replica, state = self.config, self.replica, self.state
        self._next_heartbeat = now + cfg.heartbeat_ms / 1000
        ring = (state.ownership.ring or self.initial_ring).config
        conf = replica.membership
        role = ("voter" if cfg.node_id in conf.voters
                else "learner" if cfg.node_id in conf.learners else "none")
        return Heartbeat(
            cfg.node_id, cfg.shard_id, replica.role, replica.term, replica.leader_id,
            replica.last_term, replica.last_index, replica.commit_index, state.applied_index,
            state.key_count, cfg.pid, cfg.advertise, tuple(conf.voters),
            ring, cfg.heartbeat_ms,
            {**cfg.info, "data_bytes": state.data_bytes, "max_data_bytes": cfg.max_data_bytes,
             "disk_full": self.disk_full, **self.identity_extra, **self.keys_extra,
             "learners": list(conf.learners), "config_role": role,
             **self._leaving_extra(replica)},
        )  # fmt: skip

    @staticmethod
    def _leaving_extra(replica: Replica) -> dict[str, object]:
        """A stopping node says so (brokers never ask it to stand), and whom it handed
        leadership to while that voter's election may run (brokers wait for it rather
        than start another: ``broker/failure_detector.py``). Absent otherwise."""
        extra: dict[str, object] = {}
        if replica.leaving:
            extra["leaving"] = True
        if replica.handed_to:
            extra["handed_to"] = replica.handed_to
        return extra
