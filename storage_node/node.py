"""The storage node shell: sockets, files and the clock around the node core.

One thread, one loop (the Paranoid Pirate shape): poll until the next deadline, read the
clocks once (monotonic ``now``, and the wall clock ``ts_ms`` a leader stamps on writes),
drain each ready socket in bounded batches into the node core (``node_core.py``: every
decision is there), then handle its ``ready`` rounds in the order it demands (send
appends, persist and sync, send votes and acks, apply and answer), send what it queued,
publish the heartbeat it builds and write the snapshots it asks for. Draining a whole
batch before handling ``ready`` is what makes group commit work: every write that
arrived meanwhile shares one WAL write and one fsync, and one append per follower.

Requests and replies carry the client identity, so the node answers on the broker
socket a request came from without the broker remembering anything.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from loguru import logger

from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.limits import KEY_BYTES_MAX, VALUE_BYTES_MAX
from zkv.protocol.liveness import keep_alive
from zkv.protocol.messages import (
    Entry,
    FoundingAnswer,
    FoundingProbe,
    MigrateAck,
    MigrateBatch,
    PeerMessage,
    Role,
)
from zkv.protocol.ring import Ring, RingConfig
from zkv.protocol.security import Curve, TrustStore, ZapHandler, peer_node_id
from zkv.storage_node import durable_state, identity
from zkv.storage_node import membership as mship
from zkv.storage_node.disk_full import Unpersisted
from zkv.storage_node.fsync_policy import FsyncPolicy
from zkv.storage_node.node_core import NodeCore, NodeCoreConfig
from zkv.storage_node.push import LeaderTasks
from zkv.storage_node.replica import Ready, Replica, ReplicaConfig
from zkv.storage_node.snapshot import compactable_index, mapped_or_bytes, save_snapshot
from zkv.storage_node.startup import recover
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.wal import is_disk_full

_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK
BATCH_MAX = 512  # messages drained from one socket per wake-up
#: how often a node whose disk is full retries what it could not write, and a snapshot
DISK_RETRY_S = 0.25
SNAPSHOT_RETRY_S = 5.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    shard_id: int
    data_dir: Path
    listen: str
    advertise: str
    peers: dict[str, str]
    brokers: tuple[str, ...]
    heartbeat_endpoints: tuple[str, ...]
    ring: RingConfig
    fsync: FsyncPolicy
    snapshot_entries: int = 50_000
    #: also snapshot once the log since the last snapshot holds this many bytes of
    #: commands: near-1 MiB values would otherwise keep up to 50,000 MiB in memory
    snapshot_bytes: int = 64 * 1024 * 1024
    #: bytes of keys + values this node's shard may hold (0: no quota); see quota.py
    max_data_bytes: int = 0
    heartbeat_ms: int = 100
    election_timeout_ms: int = 1000
    key_bytes_max: int = KEY_BYTES_MAX
    value_bytes_max: int = VALUE_BYTES_MAX
    extra: dict[str, str] = field(default_factory=dict)
    cluster_id: str = identity.DEFAULT_CLUSTER_ID
    #: found a new shard with ``peers`` as the initial configuration (empty data dir only)
    bootstrap: bool = False
    #: disaster recovery: this node alone becomes the shard (``_force_new_cluster``)
    force_new_cluster: bool = False
    #: a ``zkv keys generate`` dir: Curve on every socket, peers known by their keys
    keys_dir: Path | None = None


class StorageNode:
    def __init__(self, config: NodeConfig, ctx: zmq.Context | None = None) -> None:  # type: ignore[type-arg]
        self.config = config
        self.log = logger.bind(component="node", node=config.node_id, shard=config.shard_id)
        self._ctx = ctx or zmq.Context.instance()
        self._running = True
        self._recover()
        #: every decision is the node core's; this class does the I/O it asks for
        self.node = NodeCore(
            NodeCoreConfig(
                config.node_id, config.shard_id, tuple(sorted({config.node_id, *config.peers})),
                config.advertise, config.heartbeat_ms, config.snapshot_entries,
                config.snapshot_bytes, config.max_data_bytes,
                config.key_bytes_max, config.value_bytes_max, os.getpid(),
                {"fsync": str(config.fsync), **config.extra}, dict(config.peers),
            ),
            self.core, self.state, self.initial_ring, self.tasks,
        )  # fmt: skip
        self.node.identity_extra = self._identity_extra()
        self.node.founding_active = self.founding is not None
        self._peer_conf: mship.Membership | None = None  # the one peer sockets follow
        self._stop_requested = False
        self._stop_deadline = 0.0
        self._stop_after = 0.0
        #: what a full disk refused, retried every DISK_RETRY_S (disk_full.py)
        self._unpersisted = Unpersisted()
        self._disk_full_since: float | None = None
        self._disk_retry_at = 0.0
        self._snapshot_retry_at = 0.0  # after a snapshot found no space
        #: the newest snapshot really on disk (what an append ack may count on)
        self._disk_snapshot_index = self.core.snap_index

    # ------------------------------------------------------------------ startup

    def _recover(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        ring = durable_state.load_ring(cfg.data_dir)
        if ring is None:
            ring = cfg.ring
            durable_state.save_ring(cfg.data_dir, ring)
        # The ring file holds the *initial* ring (the same on every replica); the ring in
        # force is the state machine's, rebuilt from snapshot + log (ownership.py).
        self.initial_ring = Ring(ring)
        self.state = KVStateMachine(shard_id=cfg.shard_id, ring=ring)
        #: leader-only soft state: streams to other shards' leaders, drops in progress
        self.tasks = LeaderTasks(seq0=int.from_bytes(os.urandom(5), "big") << 20)
        # the decision is recovery.plan_recovery's (pure); startup.recover carries it out
        found = recover(cfg.data_dir, cfg.fsync, self.state, self.log)
        hard, snapshot, entries, self.wal = found.hard_state, found.snapshot, found.entries, found.wal
        self._check_identity(hard.term > 0 or bool(entries) or snapshot is not None)
        if cfg.force_new_cluster:
            snapshot, entries = self._force_new_cluster(snapshot, entries)
        members = tuple(sorted({cfg.node_id, *cfg.peers}))
        self.core = Replica(
            ReplicaConfig(
                cfg.node_id, members, cfg.heartbeat_ms, cfg.election_timeout_ms,
                voter=self.identity.voter, incarnation=self.identity.incarnation,
            ),
            hard,
            entries,
            snapshot,
        )
        self.log.info(
            "recovered term={} log={}..{} snapshot={} keys={}",
            hard.term, self.core.snap_index + 1, self.core.last_index,
            self.core.snap_index, self.state.key_count,
        )

    def _check_identity(self, has_state: bool) -> None:
        """Decide from the data dir whether we may vote (``identity.py``); record it."""
        cfg = self.config
        on_disk = identity.load(cfg.data_dir)
        self.identity = identity.decide_start(
            on_disk, has_state, cluster_id=cfg.cluster_id, shard_id=cfg.shard_id,
            node_id=cfg.node_id, bootstrap=cfg.bootstrap, incarnation=identity.new_incarnation(),
        )  # fmt: skip
        if on_disk is None:
            identity.save(cfg.data_dir, self.identity)
            if self.identity.voter:
                self.log.info("adopted data dir written before identities: voter, "
                              "incarnation {}", self.identity.incarnation)
        self.founding = None
        if self.identity.state is identity.IdentityState.BOOTSTRAPPING:
            self.founding = identity.Founding(cfg.node_id, tuple(cfg.peers))
        if not self.identity.voter:
            self.log.warning("not a voter: {}", self.identity.reason)

    def _force_new_cluster(
        self, snapshot: tuple[int, int, object] | None, entries: list[Entry],
    ) -> tuple[tuple[int, int, bytes], list[Entry]]:
        """Disaster recovery when a shard's majority is gone for good: make this node's
        whole log (committed or not: it is the most anyone still knows) its state, in a
        snapshot whose configuration is this node alone; the operator then adds replicas.
        Writes acknowledged by the lost majority and missing here are lost."""
        if not self.identity.voter:
            raise RuntimeError("--force-new-cluster needs a data dir that was a voter; this "
                               f"one is {self.identity.state.value}")
        for e in entries:
            if e.index > self.state.applied_index:
                self.state.apply(e.index, e.data)
        last_index, last_term = (entries[-1].index, entries[-1].term) if entries else (
            (snapshot[0], snapshot[1]) if snapshot else (0, 0))
        conf = mship.Membership((self.config.node_id,))
        blob = mship.wrap_snapshot(conf, self.state.snapshot_bytes())
        save_snapshot(self.config.data_dir, last_index, last_term, blob)
        self.wal.reset(last_index + 1)
        self.log.warning(
            "FORCED NEW CLUSTER (--force-new-cluster): shard {} now has this node as its "
            "only voter, with its log up to index {} (term {}); the former members are out "
            "of it. Remove the flag before the next start; add replicas with "
            "`zkv admin add-replica`.", self.config.shard_id, last_index, last_term)
        return (last_index, last_term, blob), []

    def _set_identity(self, state: identity.IdentityState, reason: str = "") -> None:
        self.identity = self.identity.with_state(state, reason)
        identity.save(self.config.data_dir, self.identity)
        self.core.set_voter(self.identity.voter)
        self.founding = None
        self.node.founding_active = False
        self.node.identity_extra = self._identity_extra()

    def _identity_extra(self) -> dict[str, object]:
        """What the heartbeat says of this data dir (``zkv status``: member, incarnation)."""
        ident = self.identity
        extra: dict[str, object] = {"voter": ident.voter, "membership": ident.state.value,
                                    "incarnation": ident.incarnation}
        if ident.reason:
            extra["membership_reason"] = ident.reason
        return extra

    def _found(self) -> None:
        """Bootstrapping: probe the initial configuration; found or give up."""
        founding = self.founding
        if founding is None:
            return
        if founding.exists:
            self._set_identity(identity.IdentityState.WAITING, (
                "this shard exists already (a member is past term 0), so --bootstrap does "
                "not found it: a non-voter until a leader re-admits it, caught up"))
            self.log.warning("not a voter: {}", self.identity.reason)
        elif founding.founded:
            self._set_identity(identity.IdentityState.VOTER)
            self.log.info("founded shard {} with {} (a majority agreed): voter",
                          self.config.shard_id, sorted(founding.members))
        else:
            probe = FoundingProbe(self.config.node_id, self.config.cluster_id, self.config.shard_id)
            for peer in self.config.peers:
                self._send_peer(peer, probe)  # type: ignore[arg-type]

    def _on_founding(self, sender: str, msg: FoundingProbe | FoundingAnswer) -> None:
        cfg = self.config
        if (msg.cluster_id, msg.shard_id) != (cfg.cluster_id, cfg.shard_id) or msg.node_id != sender:
            self.log.warning("founding message from {} of another cluster or shard", sender)
            return
        if isinstance(msg, FoundingAnswer):
            if self.founding is not None:
                self.founding.on_answer(sender, msg.pristine)
                self._found()
            return
        state = self.identity.state
        pristine = state is identity.IdentityState.BOOTSTRAPPING or (
            state is identity.IdentityState.VOTER and self.core.term == 0
            and self.core.last_index == 0
        )
        self._send_peer(sender, FoundingAnswer(  # type: ignore[arg-type]
            cfg.node_id, cfg.cluster_id, cfg.shard_id, pristine, self.core.term))

    def _start_security(self) -> None:
        """With keys: our pair, the allow-lists, and the ZAP handler (before any bind)."""
        keys = self.config.keys_dir
        self.curve: Curve | None = None
        self.zap: ZapHandler | None = None
        if keys is None:
            return
        trust = TrustStore(keys)
        self.curve = Curve.for_identity(keys / "nodes" / self.config.node_id, trust.public_dir)
        self.zap = ZapHandler(self._ctx, trust, self.log)
        self.node.secure = True

    def _open_sockets(self) -> None:
        cfg, ctx = self.config, self._ctx
        ident = cfg.node_id.encode()
        alive_ms = cfg.election_timeout_ms
        self._start_security()
        curve = self.curve
        self.broker_socks = []
        for endpoint in cfg.brokers:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, ident)
            s.setsockopt(zmq.LINGER, 0)
            keep_alive(s, alive_ms)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.setsockopt(zmq.RCVHWM, 100_000)
            if curve is not None:
                curve.broker_client(s, endpoint)
            s.connect(endpoint)
            self.broker_socks.append(s)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        keep_alive(self.pub, alive_ms)
        for endpoint in cfg.heartbeat_endpoints:
            if curve is not None:  # taken at connect: one server key per broker
                curve.broker_client(self.pub, endpoint)
            self.pub.connect(endpoint)
        self.peer_router = ctx.socket(zmq.ROUTER)
        self.peer_router.setsockopt(zmq.LINGER, 0)
        self.peer_router.setsockopt(zmq.RCVHWM, 100_000)
        # A restarted (or resumed) peer reconnecting under its id takes over the old
        # pipe; without this the ROUTER ignores the new connection while a stale one
        # for the same id lingers.
        self.peer_router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        keep_alive(self.peer_router, alive_ms)
        if curve is not None:
            curve.server(self.peer_router, "peer")
        self.peer_router.bind(cfg.listen)
        self.peer_socks: dict[str, zmq.Socket] = {}  # type: ignore[type-arg]
        self._peer_addrs: dict[str, str] = {}
        for peer, endpoint in cfg.peers.items():
            self.peer_socks[peer] = self._peer_socket(peer, endpoint)
            self._peer_addrs[peer] = endpoint
        #: DEALERs to other shards' nodes, for migration streams (node id -> socket)
        self.migrate_socks: dict[str, zmq.Socket] = {}  # type: ignore[type-arg]
        self._migrate_addrs: dict[str, str] = {}
        self.poller = zmq.Poller()
        for s in self.broker_socks:
            self.poller.register(s, zmq.POLLIN)
        self.poller.register(self.peer_router, zmq.POLLIN)

    def _peer_socket(self, peer: str, endpoint: str) -> zmq.Socket:  # type: ignore[type-arg]
        s: zmq.Socket = self._ctx.socket(zmq.DEALER)  # type: ignore[type-arg]
        s.setsockopt(zmq.IDENTITY, self.config.node_id.encode())
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # drop, don't queue, while the peer is away
        keep_alive(s, self.config.election_timeout_ms)
        s.setsockopt(zmq.SNDHWM, 10_000)
        if self.curve is not None:  # the peer must present that node's key
            self.curve.node_client(s, peer)
        s.connect(endpoint)
        return s

    def close(self) -> None:
        for s in [*self.broker_socks, self.pub, self.peer_router, *self.peer_socks.values(),
                  *self.migrate_socks.values()]:
            s.close(linger=0)
        if getattr(self, "zap", None) is not None:
            self.zap.close()  # type: ignore[union-attr]
        self.wal.close()

    def stop(self) -> None:
        """Exit soon; a leader first hands leadership to an up-to-date voter (SIGTERM),
        so a planned restart costs a round trip, not an election timeout."""
        self._stop_requested = True

    def _check_stop(self, now: float) -> None:
        core = self.core
        if not self._stop_deadline:
            self._stop_deadline = now + 2 * self.config.election_timeout_ms / 1000
            if core.role is Role.LEADER and core.transfer_leadership("", now):
                self.log.info("stopping: handing leadership of shard {} over",
                              self.config.shard_id)
                return
            self._stop_deadline = now  # nobody to hand over to
        if core.role is Role.LEADER and now < self._stop_deadline:
            return
        if not self._stop_after:
            # one more heartbeat interval: our last votes, acks and NOT_LEADER replies
            # leave before the sockets close (they close with linger 0)
            self._stop_after = now + self.config.heartbeat_ms / 1000
        elif now >= self._stop_after:
            self._running = False

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        self._open_sockets()
        self.log.info("node {} ready shard={} listen={}", self.config.node_id,
                      self.config.shard_id, self.config.listen)
        tick_ms = max(5, self.config.heartbeat_ms // 4)
        node = self.node
        try:
            while self._running:
                # a listing in progress goes on at once; otherwise sleep until a message
                events = dict(self.poller.poll(0 if node.busy() else tick_ms))
                now = time.monotonic()
                ts_ms = int(time.time() * 1000)  # the wall clock a leader stamps on writes
                for sock in self.broker_socks:
                    if sock in events:
                        self._drain_broker(sock, now, ts_ms)
                if self.peer_router in events:
                    self._drain_peers(now)
                for sock in self.migrate_socks.values():
                    if sock in events:
                        self._drain_migrate_acks(sock, now)
                node.tick(now)  # the replica's timers and the availability rule
                if self._stop_requested:
                    self._check_stop(now)
                self._handle_ready(now)
                batches = node.pump_tasks(now)
                if batches:
                    self._send_batches(batches)
                self._flush()
                hb = node.heartbeat(now)
                if hb is not None:
                    with contextlib.suppress(zmq.Again):
                        self.pub.send_multipart(codec.encode(hb), zmq.NOBLOCK)
                    node.stats.publish(hb.node_id, hb.shard_id, self.core, self.state,
                                       self.tasks, bool(hb.extra["disk_full"]))
                    self._found()
                    self.wal.sync(now)  # interval policy: sync even when idle
                    if self._unpersisted:
                        self._persist(Ready(), now)  # retry what a full disk refused
                self._maybe_snapshot(now)
                if node.notes:
                    for note in node.notes:
                        self.log.info(note)
                    node.notes.clear()
        finally:
            self.close()

    def _drain_broker(self, sock: zmq.Socket, now: float, ts_ms: int) -> None:  # type: ignore[type-arg]
        """Feed up to ``BATCH_MAX`` waiting messages to the core; bad ones are logged."""
        on_frames = self.node.on_broker_frames
        for _ in range(BATCH_MAX):
            try:
                frames = _recv_frames(sock)
            except zmq.Again:
                return
            try:
                on_frames(sock, frames, now, ts_ms)
            except RemoteProtocolError as exc:
                self.log.warning("bad frames from broker: {}", exc)

    def _drain_peers(self, now: float) -> None:
        on_frames, router = self.node.on_peer_frames, self.peer_router
        secure = self.curve is not None
        for _ in range(BATCH_MAX):
            try:
                frames, key_node = _recv_peer_frames(router, secure)
            except zmq.Again:
                return
            try:
                on_frames(router, frames, now, key_node)
            except RemoteProtocolError as exc:
                self.log.warning("bad peer frames: {}", exc)

    def _on_founding_events(self) -> None:
        """Founding messages the core set aside (the identity is the shell's: a file)."""
        events, self.node.founding_events = self.node.founding_events, []
        for sender, msg in events:
            if msg is None:  # a leader's append: the shard exists
                if self.founding is not None:
                    self.founding.on_answer(sender, False)
                    self._found()
            elif isinstance(msg, FoundingProbe | FoundingAnswer):
                self._on_founding(sender, msg)

    def _drain_migrate_acks(self, sock: zmq.Socket, now: float) -> None:  # type: ignore[type-arg]
        for _ in range(BATCH_MAX):
            try:
                frames = _recv_frames(sock)
            except zmq.Again:
                return
            try:
                ack = codec.decode(frames)
            except RemoteProtocolError as exc:
                self.log.warning("bad frames on a migration socket: {}", exc)
                continue
            if type(ack) is MigrateAck:
                self.node.on_migrate_ack(ack, now)

    def _flush(self) -> None:
        """Send what the core queued this turn: replies, redirects, migration acks."""
        for sock, frames in self.node.take_outgoing():
            self._send_reply(sock, frames)  # type: ignore[arg-type]

    def _send_reply(self, sock: zmq.Socket, frames: tuple[bytes, ...]) -> None:  # type: ignore[type-arg]
        # part by part: markedly cheaper than send_multipart in pyzmq
        ident = frames[0]
        frames = frames[1:]
        try:
            sock.send(ident, _SNDMORE_NOBLOCK)
        except zmq.Again:
            self.log.warning("socket full: reply dropped (the client will retry)")
            return
        except zmq.ZMQError:  # a peer ROUTER that no longer knows the sender
            return
        if len(frames) == 1:
            sock.send(frames[0], zmq.NOBLOCK)
        else:
            sock.send(frames[0], _SNDMORE_NOBLOCK)
            sock.send(frames[1], zmq.NOBLOCK)

    # ------------------------------------------------------------------ ready

    def _handle_ready(self, now: float) -> None:
        """The core's ``ready`` rounds, in the order it demands (node_core.py)."""
        node = self.node
        while node.has_ready():
            nrd = node.ready()
            for to, msg in nrd.send_first:
                self._send_peer(to, msg)
            durable = self._persist(nrd.raft, now)
            # votes and acks promise durable state: only after persisting, and only what
            # the disk holds while it is full
            for to, msg in node.after_persist(nrd, durable, self._durable_index(), now):
                self._send_peer(to, msg)
            node.advance(nrd)
        node.settle()
        if node.founding_events:
            self._on_founding_events()
        core = self.core
        if core.promoted:
            core.promoted = False
            self._set_identity(identity.IdentityState.VOTER)
            self.log.info("admitted as a voter of shard {} (incarnation {})",
                          self.config.shard_id, self.identity.incarnation)
        if core.membership is not self._peer_conf:
            self._sync_peers()

    def _persist(self, rd: Ready, now: float) -> bool:
        """Make ``rd``'s state durable per the fsync policy, in the order the core needs:
        hard state, snapshot, truncation, new entries, then one sync. False while the
        disk is full: what did not fit waits in ``_unpersisted`` (see disk_full.py)."""
        todo = self._unpersisted
        waiting = bool(todo)
        todo.add(rd.hard_state, rd.snapshot, rd.truncate_from, rd.entries)
        try:
            if not todo:
                return True
            if waiting and now < self._disk_retry_at:
                return False
            try:
                self._write_durable(todo, now)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                if self._disk_full_since is None:
                    self._disk_full_since = now
                    self.log.warning("disk full ({}): writes answer DISK_FULL until space "
                                     "returns", exc)
                self._disk_retry_at = now + DISK_RETRY_S
                return False
            if self._disk_full_since is not None:
                self.log.info("disk has room again after {:.1f} s: writes resume",
                              now - self._disk_full_since)
                self._disk_full_since = None
            return True
        finally:
            self.node.unpersisted = bool(todo)
            self.node.disk_full = self._disk_full_since is not None

    def _write_durable(self, todo: Unpersisted, now: float) -> None:
        """Write ``todo`` in order, clearing each part once it is durable."""
        if todo.hard_state is not None:
            durable_state.save_hard_state(self.config.data_dir, todo.hard_state)
            todo.hard_state = None
        if todo.snapshot is not None:
            index, term, data = todo.snapshot
            save_snapshot(self.config.data_dir, index, term, data)
            self.wal.reset(index + 1)
            todo.snapshot = None
            self._disk_snapshot_index = index
            self.node.stats.snapshot("installed", len(data))
        wrote = False
        if todo.truncate_from is not None:
            self.wal.truncate_from(todo.truncate_from)
            todo.truncate_from, wrote = None, True
        entries = len(todo.entries)
        if todo.entries:
            self.wal.append(todo.entries)
            todo.entries, wrote = [], True
        if wrote:
            started = time.perf_counter()
            # One write and (fsync=always) one fsync for everything this turn brought:
            # group commit. The disk is fast next to a Python loop turn, so waiting for
            # it inline costs less than handing it to a thread and back (measured).
            synced = self.wal.sync(now)
            self.node.stats.wal_synced(time.perf_counter() - started if synced else None,
                                       entries)
            self.core.persisted(self.wal.last_index)

    def _durable_index(self) -> int:
        """Where this node's log ends on disk (what an append ack may claim)."""
        return max(self.wal.last_index, self._disk_snapshot_index)

    def _sync_peers(self) -> None:
        """Open a socket to every member the configuration names; close removed ones."""
        conf = self.core.membership
        self._peer_conf = conf
        # the command line first: `zkv cluster up` picks new ports at each start
        wanted = {m: self.config.peers.get(m) or conf.addr_of(m)
                  for m in conf.members if m != self.config.node_id}
        for peer in [p for p in self.peer_socks if p not in wanted]:
            self.peer_socks.pop(peer).close(linger=0)
            self._peer_addrs.pop(peer, None)
        for peer, addr in wanted.items():
            if addr and self._peer_addrs.get(peer) != addr:
                if peer in self.peer_socks:
                    self.peer_socks.pop(peer).close(linger=0)
                self.peer_socks[peer] = self._peer_socket(peer, addr)
                self._peer_addrs[peer] = addr

    def _send_peer(self, to: str, msg: PeerMessage) -> None:
        sock = self.peer_socks.get(to)
        if sock is None:
            return
        frames = codec.encode(msg)
        try:
            if len(frames) == 1:
                sock.send(frames[0], zmq.NOBLOCK)
            else:  # part by part: cheaper than send_multipart
                sock.send(frames[0], _SNDMORE_NOBLOCK)
                sock.send(frames[1], zmq.NOBLOCK)
        except zmq.Again:
            pass  # peer away or slow: Raft tolerates loss, the leader resends

    # ------------------------------------------------------------------ migration

    def _send_batches(self, batches: list[tuple[str, str, MigrateBatch]]) -> None:
        """Send the core's stream batches, each on a DEALER to its target node."""
        for node, addr, batch in batches:
            sock = self.migrate_socks.get(node)
            if sock is None or self._migrate_addrs.get(node) != addr:
                if sock is not None:
                    self.poller.unregister(sock)
                    sock.close(linger=0)
                self._migrate_addrs[node] = addr
                sock = self.migrate_socks[node] = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.IDENTITY, self.config.node_id.encode())
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 100)
                keep_alive(sock, self.config.election_timeout_ms)
                if self.curve is not None:
                    self.curve.node_client(sock, node)
                sock.connect(addr)
                self.poller.register(sock, zmq.POLLIN)
            with contextlib.suppress(zmq.Again):  # a slow peer: the ack timeout resends
                sock.send_multipart(codec.encode(batch), zmq.NOBLOCK)

    # ------------------------------------------------------------------ housekeeping

    def _maybe_snapshot(self, now: float) -> None:
        if now < self._snapshot_retry_at:
            return
        started = time.monotonic()
        task = self.node.take_snapshot()
        if task is None:
            return
        try:
            save_snapshot(self.config.data_dir, task.index, task.term, task.data)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self._snapshot_retry_at = now + SNAPSHOT_RETRY_S
            self.log.warning("no space for a snapshot at index {} ({}); retrying in {} s",
                             task.index, exc, SNAPSHOT_RETRY_S)
            return
        self._disk_snapshot_index = task.index
        self.node.compacted(task, mapped_or_bytes(self.config.data_dir, task.index, task.data))
        self.node.stats.snapshot("taken", len(task.data))
        # keep the log back to the older kept snapshot, so falling back to it (if the
        # newest is ever damaged) still meets a contiguous log
        self.wal.compact(compactable_index(self.config.data_dir))
        self.log.info("snapshot at index {} ({} bytes, {:.0f} ms)", task.index, len(task.data),
                      (time.monotonic() - started) * 1000)


def _recv_frames(sock: zmq.Socket) -> list[bytes]:  # type: ignore[type-arg]
    """``recv_multipart(NOBLOCK)`` without its per-part ``getsockopt(RCVMORE)``: a
    Frame's ``more`` is much cheaper to read. Raises ``zmq.Again`` when empty."""
    frame = sock.recv(zmq.NOBLOCK, copy=False)
    parts = [frame.bytes]
    while frame.more:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts


def _recv_peer_frames(sock: zmq.Socket, secure: bool) -> tuple[list[bytes], str | None]:  # type: ignore[type-arg]
    """``_recv_frames``, plus (``secure``) the node id the sender's key authenticated as
    (ZAP's User-Id; None for a key that is not a node's). Raises ``zmq.Again``."""
    frame = sock.recv(zmq.NOBLOCK, copy=False)
    key_node = peer_node_id(frame) if secure else None
    parts = [frame.bytes]
    while frame.more:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts, key_node
