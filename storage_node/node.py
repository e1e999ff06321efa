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
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from loguru import logger

from zkv.protocol import codec
from zkv.protocol.drain import more_waiting
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.limits import KEY_BYTES_MAX, VALUE_BYTES_MAX
from zkv.protocol.messages import MigrateAck, PeerMessage
from zkv.protocol.ring import Ring, RingConfig
from zkv.protocol.security import peer_node_id
from zkv.protocol.timing import ELECTION_TIMEOUT_MS, HEARTBEAT_MS
from zkv.storage_node import durable_state, identity, peer_link
from zkv.storage_node import membership as mship
from zkv.storage_node.disk_full import Unpersisted
from zkv.storage_node.fsync_policy import FsyncMode, FsyncPolicy
from zkv.storage_node.graceful_stop import GracefulStop
from zkv.storage_node.node_core import NodeCore, NodeCoreConfig
from zkv.storage_node.node_disk import NodeDisk
from zkv.storage_node.node_identity import NodeIdentity
from zkv.storage_node.node_sockets import NodeSockets
from zkv.storage_node.push import LeaderTasks
from zkv.storage_node.replica import Ready, Replica, ReplicaConfig
from zkv.storage_node.snapshot import BackgroundSave
from zkv.storage_node.snapshot_child import CAN_FORK, SnapshotChild
from zkv.storage_node.startup import recover
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.wal_sync import WAL_SYNC_DEFAULT, open_syncer

_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK
BATCH_MAX = 512  # messages drained from one socket per wake-up


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
    #: write snapshots from a forked child, never stopping the loop (snapshot_child.py)
    background_snapshots: bool = CAN_FORK
    #: fsync=always: where the WAL's fsync runs (off the loop unless "inline";
    #: wal_sync.py)
    wal_sync: str = WAL_SYNC_DEFAULT
    #: also snapshot once the log since the last snapshot holds this many bytes of
    #: commands: near-1 MiB values would otherwise keep up to 50,000 MiB in memory
    snapshot_bytes: int = 64 * 1024 * 1024
    #: bytes of keys + values this node's shard may hold (0: no quota); see quota.py
    max_data_bytes: int = 0
    heartbeat_ms: int = HEARTBEAT_MS
    election_timeout_ms: int = ELECTION_TIMEOUT_MS
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


class StorageNode(NodeIdentity, NodeDisk, NodeSockets):
    """The shell; its identity, durable-write and socket methods are in the mixins
    ``node_identity.py``, ``node_disk.py`` and ``node_sockets.py``."""

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
                config.cluster_id,
            ),
            self.core, self.state, self.initial_ring, self.tasks,
        )  # fmt: skip
        self.node.identity_extra = self._identity_extra()
        self.node.founding_active = self.founding is not None
        self._peer_conf: mship.Membership | None = None  # the one peer sockets follow
        self._keys_conf: mship.Membership | None = None  # the committed one keys follow
        self._stop_requested = False
        self._graceful_stop = GracefulStop(config.shard_id, config.heartbeat_ms,
                                           config.election_timeout_ms)
        #: what a full disk refused, retried every DISK_RETRY_S (disk_full.py)
        self._unpersisted = Unpersisted()
        #: the leader's snapshot being written on a helper thread, and the acks and
        #: votes waiting for it (node_disk.py)
        self._install_save: BackgroundSave | None = None
        self._install_held: list[tuple[str, PeerMessage]] = []
        self._disk_full_since: float | None = None
        self._disk_retry_at = 0.0
        self._snapshot_retry_at = 0.0  # after a snapshot found no space
        self._snapshot_child: SnapshotChild | None = None  # writing one in the background
        #: the newest snapshot really on disk (what an append ack may count on)
        self._disk_snapshot_index = self.core.snap_index
        #: fsync=always: the WAL is fsynced off the loop (wal_sync.py: Linux AIO or a
        #: helper thread); acks and votes wait in ``_held`` (index they claim,
        #: messages) until it is durable
        self._syncer = (open_syncer(config.wal_sync, config.data_dir, self.wal.fsync_call,
                                    self.log)
                        if config.fsync.mode is FsyncMode.ALWAYS else None)
        self._synced_index = self.wal.last_index  # what recovery found is on disk
        self._unsynced_entries = 0
        self._held: deque[tuple[int, list[tuple[str, PeerMessage]]]] = deque()
        self._held_since = 0.0  # when the oldest held messages started waiting

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
        members = self._initial_members()
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

    def stop(self) -> None:
        """Exit soon; a leader first hands leadership to an up-to-date voter (SIGTERM),
        so a planned restart costs a round trip, not an election timeout
        (``graceful_stop.py`` decides when to exit)."""
        self._stop_requested = True

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        self._open_sockets()
        self.log.info("node {} ready shard={} listen={}", self.config.node_id,
                      self.config.shard_id, self.config.listen)
        tick_ms = max(5, self.config.heartbeat_ms // 4)
        node = self.node
        syncer = self._syncer
        if syncer is not None:
            self.poller.register(syncer.fileno(), zmq.POLLIN)
        stall_s = self.config.heartbeat_ms / 1000  # a turn longer delays heartbeats
        try:
            while self._running:
                # a listing in progress goes on at once; otherwise sleep until a message
                events = dict(self.poller.poll(0 if node.busy() else tick_ms))
                now = time.monotonic()
                ts_ms = int(time.time() * 1000)  # the wall clock a leader stamps on writes
                if syncer is not None and syncer.fileno() in events:
                    self._sync_collected(now)
                for sock in self.broker_socks:
                    if sock in events:
                        self._drain_broker(sock, now, ts_ms)
                if self.peer_router in events:
                    self._drain_peers(now)
                for sock in self.migrate_socks.values():
                    if sock in events:
                        self._drain_migrate_acks(sock, now)
                # what the messages decided goes out before the timers run: reads answered
                # at once, appends of new writes, acks and replies of what committed
                if node.has_ready():
                    self._handle_ready(now)
                self._flush()
                # the replica's timers and the availability rule when due (TIMER_STEP_S),
                # the expiry sweep (TTL) every turn
                node.tick_when_due(now, ts_ms)
                if self._stop_requested and self._graceful_stop.due(self.core, now, node.notes):
                    self._running = False
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
                    self._follow_peer_keys()
                    self._follow_refusals(now)
                    self._drain_peer_dealers(now)  # WrongNode refusals only
                    if syncer is None:
                        self.wal.sync(now)  # interval policy: sync even when idle
                    else:
                        self._ack_while_syncing(now)  # a slow disk: the leader hears us
                    if self._unpersisted:
                        self._persist(Ready(), now)  # retry what a full disk refused
                self._maybe_snapshot(now)
                if node.notes:
                    for note in node.notes:
                        self.log.info(note)
                    node.notes.clear()
                took = time.monotonic() - now
                if took > stall_s:
                    self._stalled(took)
        finally:
            self.close()

    def _stalled(self, took: float) -> None:
        """A turn outlasted a heartbeat interval: heartbeats and acks waited that long.
        Counted and logged, as Redis's latency monitor would (``bench.stall`` reads it)."""
        self.node.stats.loop_stalled(took)
        self.log.warning("the loop stood still for {:.0f} ms (longer than a {} ms "
                         "heartbeat interval)", took * 1000, self.config.heartbeat_ms)

    def _drain_broker(self, sock: zmq.Socket, now: float, ts_ms: int) -> None:  # type: ignore[type-arg]
        """Feed up to ``BATCH_MAX`` waiting messages to the core; bad ones are logged.
        After the first, ask whether another waits (``protocol/drain.py``)."""
        on_frames = self.node.on_broker_frames
        for i in range(BATCH_MAX):
            if i == 1 and not more_waiting(sock):
                return
            try:
                frames = _recv_frames(sock)
            except zmq.Again:
                return
            # read after the frames arrived: a TTL deadline is never stamped early, and
            # a read never judges expiry by a clock older than the request (TTL)
            ts_ms = int(time.time() * 1000)
            try:
                on_frames(sock, frames, now, ts_ms)
            except RemoteProtocolError as exc:
                self.log.warning("bad frames from broker: {}", exc)

    def _drain_peers(self, now: float) -> None:
        on_frames, router = self.node.on_peer_frames, self.peer_router
        secure = self.curve is not None
        for i in range(BATCH_MAX):
            if i == 1 and not more_waiting(router):
                return
            try:
                frames, key_node, announced = _recv_peer_frames(router, secure)
            except zmq.Again:
                return
            try:
                on_frames(router, frames, now, key_node, announced)
            except RemoteProtocolError as exc:
                self.log.warning("bad peer frames: {}", exc)

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
        if self._install_save is not None:
            self._install_written(now)
        while node.has_ready():
            nrd = node.ready()
            for to, msg in nrd.send_first:
                self._send_peer(to, msg)
            durable = self._persist(nrd.raft, now)
            # votes and acks promise durable state: only after persisting, and only what
            # the disk holds while it is full (or all of it once an installed snapshot
            # being written is on disk: they wait for it in _send_durable)
            durable = durable or self._install_save is not None
            self._send_durable(node.after_persist(nrd, durable, self._durable_index(), now), now)
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
        self._follow_committed_config()


def _recv_frames(sock: zmq.Socket) -> list[bytes]:  # type: ignore[type-arg]
    """``recv_multipart(NOBLOCK)`` without its per-part ``getsockopt(RCVMORE)``: a
    Frame's ``more`` is much cheaper to read. Raises ``zmq.Again`` when empty."""
    frame = sock.recv(zmq.NOBLOCK, copy=False)
    parts = [frame.bytes]
    while frame.more:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts


def _recv_peer_frames(
    sock: zmq.Socket, secure: bool,  # type: ignore[type-arg]
) -> tuple[list[bytes], str | None, str | None]:
    """``_recv_frames``, plus (``secure``) the node id the sender's key authenticated as
    (ZAP's User-Id; None for a key that is not a node's) and what the sender's
    connection announced (``peer_link``; None from a node that announces nothing).
    Raises ``zmq.Again``."""
    frame = sock.recv(zmq.NOBLOCK, copy=False)
    key_node = peer_node_id(frame) if secure else None
    try:
        announced: str | None = str(frame.get(peer_link.PROPERTY))
    except zmq.ZMQError:
        announced = None
    parts = [frame.bytes]
    while frame.more:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts, key_node, announced
