"""The storage node shell: sockets, files and the clock around the replica core.

One thread, one loop (the Paranoid Pirate shape): poll until the next deadline, read the
clock once, drain each ready socket in bounded batches, feed the core, then handle its
``Ready`` in the order the core demands (persist, sync, send, apply, answer). Draining a
whole batch before handling ``Ready`` is what makes group commit work: every write that
arrived meanwhile shares one WAL write and one fsync, and one append per follower.

Requests and replies carry the client identity, so the node answers on the broker
socket a request came from without the broker remembering anything.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from loguru import logger

from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode, RemoteProtocolError
from zkv.protocol.liveness import keep_alive
from zkv.protocol.messages import (
    AdminReply,
    AdminRequest,
    AppendEntries,
    Campaign,
    CasRequest,
    Consistency,
    DeleteRequest,
    ErrorReply,
    GetReply,
    GetRequest,
    Heartbeat,
    InstallSnapshot,
    MigrateAck,
    MigrateBatch,
    PeerMessage,
    PingRequest,
    PongReply,
    PutRequest,
    Redirect,
    ReplyBatch,
    RequestBatch,
    Role,
)
from zkv.protocol.ring import Ring, RingConfig
from zkv.protocol.security import Curve, TrustStore, ZapHandler, peer_node_id
from zkv.storage_node import durable_state
from zkv.storage_node.admin import AdminError, admin_request
from zkv.storage_node.commands import Command, command_from_request, encode_command
from zkv.storage_node.fsync_policy import FsyncPolicy
from zkv.storage_node.push import LeaderTasks, command_for, not_leader_ack
from zkv.storage_node.replica import Ready, Replica, ReplicaConfig
from zkv.storage_node.snapshot import compactable_index, load_latest_snapshot, save_snapshot
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.wal import WriteAheadLog

_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK
BATCH_MAX = 512  # messages drained from one socket per wake-up
PEER_TYPES = frozenset({50, 51, 52, 53, 54, 55})
#: What a leader may send before its own log is durable (Raft allows it: the leader
#: counts itself toward a commit only once persisted). Sending them first lets the
#: followers' fsyncs run while the leader's own fsync does.
_SEND_BEFORE_PERSIST = (AppendEntries, InstallSnapshot)
#: A secure broker forwards a request under its client ident prefixed with the role of
#: the key that sent it (``broker.server._stamp``); only this prefix may run admin ops.
ADMIN_STAMP = b"A"
#: Admin ops the client role may run: a read-only view without data (ring, counts).
CLIENT_ADMIN_OPS = frozenset({"info"})


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
    heartbeat_ms: int = 100
    election_timeout_ms: int = 1000
    key_bytes_max: int = 16 * 1024
    value_bytes_max: int = 1024 * 1024
    extra: dict[str, str] = field(default_factory=dict)
    #: a ``zkv keys generate`` dir: Curve on every socket, peers known by their keys
    keys_dir: Path | None = None


@dataclass(slots=True)
class _Pending:
    """Where to send the answer for a proposed write or a queued read."""

    sock: zmq.Socket  # type: ignore[type-arg]
    ident: bytes
    request_id: int
    key: bytes = b""
    command: Command | None = None  # a write's decoded command, applied without re-decoding
    ack_shard: int = -1  # >= 0: a MigrateBatch from a source leader, answered by MigrateAck


class StorageNode:
    def __init__(self, config: NodeConfig, ctx: zmq.Context | None = None) -> None:  # type: ignore[type-arg]
        self.config = config
        self.log = logger.bind(component="node", node=config.node_id, shard=config.shard_id)
        self._ctx = ctx or zmq.Context.instance()
        self._running = True
        self._recover()
        self._pending_writes: dict[int, _Pending] = {}
        self._outbox: dict[zmq.Socket, list[tuple[bytes, ...]]] = {}  # type: ignore[type-arg]
        #: requests for keys another shard owns, handed back whole to their broker
        self._redirects: dict[zmq.Socket, list[tuple[bytes, ...]]] = {}  # type: ignore[type-arg]
        self._waiting_reads: list[tuple[int, _Pending]] = []
        self._was_leader = False
        self._next_heartbeat = 0.0
        self._last_snapshot_index = self.core.snap_index

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
        hard = durable_state.load_hard_state(cfg.data_dir)
        self.state = KVStateMachine(shard_id=cfg.shard_id, ring=ring)
        #: leader-only soft state: streams to other shards' leaders, drops in progress
        self.tasks = LeaderTasks(seq0=int.from_bytes(os.urandom(5), "big") << 20)
        snap = load_latest_snapshot(cfg.data_dir)
        snapshot = None
        if snap is not None:
            self.state.restore(snap.data)
            snapshot = (snap.last_index, snap.last_term, snap.data)
        self.wal, entries = WriteAheadLog.open(cfg.data_dir / "wal", cfg.fsync)
        if snap is not None and entries and entries[0].index > snap.last_index + 1:
            raise RuntimeError(
                f"{cfg.data_dir}: the log starts at {entries[0].index} but the snapshot ends "
                f"at {snap.last_index}; remove the data directory to rebuild from peers"
            )
        members = tuple(sorted({cfg.node_id, *cfg.peers}))
        self.core = Replica(
            ReplicaConfig(
                cfg.node_id, members, cfg.heartbeat_ms, cfg.election_timeout_ms,
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
        self._impostors = 0

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
        for peer, endpoint in cfg.peers.items():
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, ident)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IMMEDIATE, 1)  # drop, don't queue, while the peer is away
            keep_alive(s, alive_ms)
            s.setsockopt(zmq.SNDHWM, 10_000)
            if curve is not None:
                curve.node_client(s, peer)
            s.connect(endpoint)
            self.peer_socks[peer] = s
        #: DEALERs to other shards' nodes, for migration streams (node id -> socket)
        self.migrate_socks: dict[str, zmq.Socket] = {}  # type: ignore[type-arg]
        self._migrate_addrs: dict[str, str] = {}
        self.poller = zmq.Poller()
        for s in self.broker_socks:
            self.poller.register(s, zmq.POLLIN)
        self.poller.register(self.peer_router, zmq.POLLIN)

    def close(self) -> None:
        for s in [*self.broker_socks, self.pub, self.peer_router, *self.peer_socks.values(),
                  *self.migrate_socks.values()]:
            s.close(linger=0)
        if getattr(self, "zap", None) is not None:
            self.zap.close()  # type: ignore[union-attr]
        self.wal.close()

    def stop(self) -> None:
        self._running = False

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        self._open_sockets()
        self.log.info("node {} ready shard={} listen={}", self.config.node_id,
                      self.config.shard_id, self.config.listen)
        tick_ms = max(5, self.config.heartbeat_ms // 4)
        try:
            while self._running:
                # a listing in progress goes on at once; otherwise sleep until a message
                events = dict(self.poller.poll(0 if self.tasks.busy() else tick_ms))
                now = time.monotonic()
                for sock in self.broker_socks:
                    if sock in events:
                        self._drain_broker(sock, now)
                if self.peer_router in events:
                    self._drain_peers(now)
                for sock in self.migrate_socks.values():
                    if sock in events:
                        self._drain_migrate_acks(sock, now)
                self.core.tick(now)
                self._handle_ready(now)
                if self.tasks.pushes or self.tasks.drops:
                    self._pump_tasks(now)
                self._flush_replies()
                if now >= self._next_heartbeat:
                    self._next_heartbeat = now + self.config.heartbeat_ms / 1000
                    self._publish_heartbeat()
                    self.wal.sync(now)  # interval policy: sync even when idle
                self._maybe_snapshot()
        finally:
            self.close()

    def _drain_broker(self, sock: zmq.Socket, now: float) -> None:  # type: ignore[type-arg]
        self._drain(sock, self._on_broker_frames, "from broker", now)

    def _drain(self, sock: zmq.Socket, handle: Callable[[zmq.Socket, list[bytes], float], None],  # type: ignore[type-arg]
               where: str, now: float) -> None:
        """Feed up to ``BATCH_MAX`` waiting messages to ``handle``; bad ones are logged."""
        for _ in range(BATCH_MAX):
            try:
                frames = _recv_frames(sock)
            except zmq.Again:
                return
            try:
                handle(sock, frames, now)
            except RemoteProtocolError as exc:
                self.log.warning("bad frames {}: {}", where, exc)

    def _drain_peers(self, now: float) -> None:
        secure = self.curve is not None
        for _ in range(BATCH_MAX):
            try:
                frames, key_node = _recv_peer_frames(self.peer_router, secure)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            try:
                msg = codec.decode(frames[1:])
            except RemoteProtocolError as exc:
                self.log.warning("bad peer frames: {}", exc)
                continue
            if type(msg) is MigrateBatch:
                self._on_migrate_batch(frames[0], msg, now)
                continue
            if getattr(msg, "TYPE", None) not in PEER_TYPES:
                self.log.warning("unexpected {} on the peer socket", type(msg).__name__)
                continue
            if not secure:
                sender = frames[0].decode(errors="replace")
            elif key_node is not None and key_node in self.core.config.members:
                sender = key_node  # who the key says, whatever the routing id or payload
            else:
                self._impostor(key_node, frames[0], msg)
                continue
            self.core.step(sender, msg, now)  # type: ignore[arg-type]

    def _impostor(self, key_node: str | None, ident: bytes, msg: object) -> None:
        """A Raft message from a key that is not a member of this group: ignored."""
        self._impostors += 1
        if self._impostors <= 10 or self._impostors % 1000 == 0:
            self.log.warning("ignored {} #{} from key {!r} (routing id {!r}): not a member "
                             "of shard {}", type(msg).__name__, self._impostors, key_node,
                             ident[:64], self.config.shard_id)

    # ------------------------------------------------------------------ requests

    def _on_broker_frames(self, sock: zmq.Socket, frames: list[bytes], now: float) -> None:  # type: ignore[type-arg]
        if len(frames) < 2:
            raise RemoteProtocolError("too few frames")
        ident = frames[0]
        if ident == b"":
            msg = codec.decode(frames[1:])
            if isinstance(msg, RequestBatch):
                for item in msg.items:
                    if len(item) >= 2 and item[0]:
                        self._on_request(sock, item[0], item[1:], now)
            elif isinstance(msg, Campaign) and msg.shard_id == self.config.shard_id:
                self.log.info("broker {} asks us to stand (term {})", msg.broker_id, msg.term)
                self.core.campaign(now, msg.term)
            return
        self._on_request(sock, ident, frames[1:], now)

    def _on_request(self, sock: zmq.Socket, ident: bytes, frames: Sequence[bytes], now: float) -> None:  # type: ignore[type-arg]
        try:
            req = codec.decode(frames)
        except RemoteProtocolError:
            rid = codec.request_id_of(frames[0])
            self._reply(sock, ident, ErrorReply(rid, ErrorCode.BAD_REQUEST, "malformed request"))
            return
        if isinstance(req, GetRequest):
            if self._check_key(sock, ident, req.request_id, req.key, frames):
                self._on_get(sock, ident, req, now)
        elif isinstance(req, (PutRequest, DeleteRequest, CasRequest)):
            if self._check_key(sock, ident, req.request_id, req.key, frames):
                self._on_write(sock, ident, req, now)
        elif isinstance(req, PingRequest):
            self._reply(sock, ident, PongReply(req.request_id, self.config.node_id))
        elif isinstance(req, AdminRequest):
            self._on_admin(sock, ident, req, now)
        else:
            rid = getattr(req, "request_id", 0)
            self._reply(sock, ident, ErrorReply(rid, ErrorCode.BAD_REQUEST, "not a data request"))

    def _check_key(self, sock: zmq.Socket, ident: bytes, request_id: int, key: bytes,  # type: ignore[type-arg]
                   frames: Sequence[bytes]) -> bool:
        if len(key) > self.config.key_bytes_max:
            self._reply(sock, ident, ErrorReply(
                request_id, ErrorCode.TOO_LARGE,
                f"key of {len(key)} bytes is over the limit of {self.config.key_bytes_max}",
            ))  # fmt: skip
            return False
        return self._owned(sock, ident, request_id, key, frames)

    def _owned(self, sock: zmq.Socket, ident: bytes, request_id: int, key: bytes,  # type: ignore[type-arg]
               frames: Sequence[bytes] | None = None) -> bool:
        """Whether this shard serves ``key`` now. If not: a request another shard owns
        goes back to its broker whole (``Redirect``) to be re-routed; a moving key is
        answered UNAVAILABLE (retry); with no frames to hand back, WRONG_SHARD."""
        ownership = self.state.ownership
        refused = ownership.refusal(key)
        if refused == ErrorCode.WRONG_SHARD and frames is not None:
            self._redirects.setdefault(sock, []).append((ident, *frames))
            return False
        if refused:
            why = ("key not owned by this shard" if refused == ErrorCode.WRONG_SHARD
                   else "key is moving to another shard; retry")
            self._reply(sock, ident, ErrorReply(request_id, refused, why, epoch=ownership.epoch))
            return False
        return True

    def _on_admin(self, sock: zmq.Socket, ident: bytes, req: AdminRequest, now: float) -> None:  # type: ignore[type-arg]
        if (self.curve is not None and ident[:1] != ADMIN_STAMP
                and req.op not in CLIENT_ADMIN_OPS):
            self._reply(sock, ident, ErrorReply(
                req.request_id, ErrorCode.PERMISSION_DENIED,
                f"admin operation {req.op!r} needs an admin key; this request came with a "
                "client key"))
            return
        if req.shard_id != self.config.shard_id:
            self._reply(sock, ident, ErrorReply(req.request_id, ErrorCode.WRONG_SHARD,
                                                f"this node serves shard {self.config.shard_id}"))
            return
        if self.core.role is not Role.LEADER:
            self._reply(sock, ident, self._not_leader(req.request_id))
            return
        try:
            answer = admin_request(self.state, self.tasks, req.op, req.args, req.payload)
        except AdminError as exc:
            self._reply(sock, ident, ErrorReply(req.request_id, exc.code, str(exc)))
            return
        if isinstance(answer, tuple):
            result, payload = answer
            result.setdefault("node", self.config.node_id)
            self._reply(sock, ident, AdminReply(req.request_id, result, payload))
            return
        cmd = answer
        index = self.core.propose(encode_command(cmd), now)
        assert index is not None  # we checked the role just above
        self._pending_writes[index] = _Pending(sock, ident, req.request_id, command=cmd)

    def _not_leader(self, request_id: int) -> ErrorReply:
        leader = self.core.leader_id
        code = ErrorCode.NOT_LEADER if leader else ErrorCode.NO_LEADER
        return ErrorReply(request_id, code, "not the leader", leader_hint=leader)

    def _on_get(self, sock: zmq.Socket, ident: bytes, req: GetRequest, now: float) -> None:  # type: ignore[type-arg]
        if req.consistency is Consistency.STALE:
            self._answer_get(sock, ident, req.request_id, req.key)
        elif self.core.role is not Role.LEADER:
            self._reply(sock, ident, self._not_leader(req.request_id))
        elif req.consistency is Consistency.LEADER:
            self._answer_get(sock, ident, req.request_id, req.key)
        elif not self.core.read_index(_Pending(sock, ident, req.request_id, req.key), now):
            self._reply(sock, ident, ErrorReply(req.request_id, ErrorCode.UNAVAILABLE, "busy"))

    def _answer_get(self, sock: zmq.Socket, ident: bytes, request_id: int, key: bytes) -> None:  # type: ignore[type-arg]
        found = self.state.get(key)
        if found is None:
            self._reply(sock, ident, GetReply(request_id, False, 0, b""))
        else:
            self._reply(sock, ident, GetReply(request_id, True, found[1], found[0]))

    def _on_write(self, sock: zmq.Socket, ident: bytes, req: PutRequest | DeleteRequest | CasRequest, now: float) -> None:  # type: ignore[type-arg]
        if isinstance(req, (PutRequest, CasRequest)) and len(req.value) > self.config.value_bytes_max:
            self._reply(sock, ident, ErrorReply(
                req.request_id, ErrorCode.TOO_LARGE,
                f"value of {len(req.value)} bytes is over the limit of {self.config.value_bytes_max}",
            ))  # fmt: skip
            return
        if self.core.role is not Role.LEADER:
            self._reply(sock, ident, self._not_leader(req.request_id))
            return
        cmd = command_from_request(req, int(time.time() * 1000))
        index = self.core.propose(encode_command(cmd), now)
        assert index is not None  # we checked the role just above
        self._pending_writes[index] = _Pending(sock, ident, req.request_id, command=cmd)

    def _reply(self, sock: zmq.Socket, ident: bytes, reply: object) -> None:  # type: ignore[type-arg]
        """Queue a reply; ``_flush_replies`` sends each socket's queue at the end of the
        loop iteration, as one ``ReplyBatch`` when there are several."""
        out = self._outbox.get(sock)
        if out is None:
            out = self._outbox[sock] = []
        out.append((ident, *codec.encode(reply)))  # type: ignore[arg-type]

    def _flush_replies(self) -> None:
        if self._redirects:
            self._flush_redirects()
        for sock, items in self._outbox.items():
            if len(items) == 1:
                self._send_reply(sock, items[0])
            elif items:
                self._send_reply(sock, (b"", codec.encode(ReplyBatch(tuple(items)))[0]))
        self._outbox.clear()

    def _flush_redirects(self) -> None:
        own = self.state.ownership
        ring = (own.ring or self.initial_ring).config
        for sock, items in self._redirects.items():
            msg = Redirect(self.config.shard_id, ring.epoch, ring.shards, ring.vnodes,
                           tuple(items))
            with contextlib.suppress(zmq.Again):  # the broker is away: its clients retry
                sock.send_multipart([b"", *codec.encode(msg)], zmq.NOBLOCK)
        self._redirects.clear()

    def _send_reply(self, sock: zmq.Socket, frames: tuple[bytes, ...]) -> None:  # type: ignore[type-arg]
        # part by part: markedly cheaper than send_multipart in pyzmq
        ident = frames[0]
        frames = frames[1:]
        try:
            sock.send(ident, _SNDMORE_NOBLOCK)
        except zmq.Again:
            self.log.warning("broker socket full: reply dropped (the client will retry)")
            return
        if len(frames) == 1:
            sock.send(frames[0], zmq.NOBLOCK)
        else:
            sock.send(frames[0], _SNDMORE_NOBLOCK)
            sock.send(frames[1], zmq.NOBLOCK)

    # ------------------------------------------------------------------ ready

    def _handle_ready(self, now: float) -> None:
        core = self.core
        while core.has_ready():
            rd = core.ready()
            later = rd.messages
            if rd.hard_state is None and rd.messages:
                later = []
                for to, msg in rd.messages:
                    if isinstance(msg, _SEND_BEFORE_PERSIST):
                        self._send_peer(to, msg)
                    else:
                        later.append((to, msg))
            self._persist(rd, now)
            for to, msg in later:  # votes and acks promise durable state: after persisting
                self._send_peer(to, msg)
            pending_writes = self._pending_writes
            for entry in rd.committed:
                pending = pending_writes.pop(entry.index, None) if pending_writes else None
                if pending is None:
                    self.state.apply(entry.index, entry.data)
                    continue
                assert pending.command is not None
                reply = self.state.apply_command(entry.index, pending.command)
                if pending.ack_shard >= 0:  # a stream batch: answer the source leader
                    self._send_ack(pending, reply if type(reply) is dict else {"ok": False})
                    continue
                if type(reply) is dict:  # a ring command: answer the coordinator
                    self._reply(pending.sock, pending.ident,
                                AdminReply(pending.request_id, reply, b""))
                elif reply is not None:
                    self._reply(pending.sock, pending.ident, reply)
            if rd.committed:
                core.applied(rd.committed[-1].index)
            for token, index in rd.reads:
                self._waiting_reads.append((index, token))  # type: ignore[arg-type]
            for token in rd.failed_reads:
                p: _Pending = token  # type: ignore[assignment]
                self._reply(p.sock, p.ident, self._not_leader(p.request_id))
        self._serve_reads()
        is_leader = core.role is Role.LEADER
        if is_leader != self._was_leader:
            self._was_leader = is_leader
            if is_leader:
                self.log.info("became leader of shard {} at term {}", self.config.shard_id, core.term)
            else:
                self.log.info("stepped down in shard {} at term {}", self.config.shard_id, core.term)
                for pending in self._pending_writes.values():
                    if pending.ack_shard >= 0:
                        self._send_ack(pending, {"ok": False, "not_leader": True})
                    else:
                        self._reply(pending.sock, pending.ident, self._not_leader(pending.request_id))
                self._pending_writes.clear()
                self.tasks.clear()

    def _persist(self, rd: Ready, now: float) -> None:
        """Make ``rd``'s state durable per the fsync policy, in the order the core needs:
        hard state, snapshot, truncation, new entries, then one sync."""
        if rd.hard_state is not None:
            durable_state.save_hard_state(self.config.data_dir, rd.hard_state)
        if rd.snapshot is not None:
            index, term, data = rd.snapshot
            save_snapshot(self.config.data_dir, index, term, data)
            self.state.restore(data)
            self.wal.reset(index + 1)
            self._last_snapshot_index = index
            self.log.info("installed snapshot at index {} from the leader", index)
        if rd.truncate_from is not None:
            self.wal.truncate_from(rd.truncate_from)
        if rd.entries:
            self.wal.append(rd.entries)
        if rd.entries or rd.truncate_from is not None:
            # One write and (fsync=always) one fsync for everything this turn brought:
            # group commit. The disk is fast next to a Python loop turn, so waiting for
            # it inline costs less than handing it to a thread and back (measured).
            self.wal.sync(now)
            self.core.persisted(self.wal.last_index)

    def _serve_reads(self) -> None:
        if not self._waiting_reads:
            return
        applied = self.state.applied_index
        keep = []
        for index, p in self._waiting_reads:
            if index <= applied:
                # ownership again at serve time: a fence applied since the request came
                # means the key may already be written at its new owner
                if self._owned(p.sock, p.ident, p.request_id, p.key):
                    self._answer_get(p.sock, p.ident, p.request_id, p.key)
            else:
                keep.append((index, p))
        self._waiting_reads = keep

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

    def _pump_tasks(self, now: float) -> None:
        """Advance the leader's streams and drops (a listing slice, the next batch)."""
        if self.core.role is not Role.LEADER:
            self.tasks.clear()
            return
        for node, addr, batch in self.tasks.pump(self.state, now):
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

    def _drain_migrate_acks(self, sock: zmq.Socket, now: float) -> None:  # type: ignore[type-arg]
        self._drain(sock, self._on_migrate_ack, "on a migration socket", now)

    def _on_migrate_ack(self, sock: zmq.Socket, frames: list[bytes], now: float) -> None:  # type: ignore[type-arg]
        ack = codec.decode(frames)
        if type(ack) is MigrateAck:
            self.tasks.on_ack(ack, now)

    def _on_migrate_batch(self, ident: bytes, batch: MigrateBatch, now: float) -> None:
        """A source leader's stream batch: propose it, answer once applied."""
        if batch.dst_shard != self.config.shard_id:
            self._send_peer_reply(ident, MigrateAck(batch.seq, batch.dst_shard, {
                "ok": False, "error": f"this node serves shard {self.config.shard_id}"}, ""))
            return
        if self.core.role is not Role.LEADER:
            self._send_peer_reply(ident, not_leader_ack(batch, self.core.leader_id or ""))
            return
        cmd = command_for(batch)
        index = self.core.propose(encode_command(cmd), now)
        assert index is not None  # we checked the role just above
        self._pending_writes[index] = _Pending(self.peer_router, ident, batch.seq, command=cmd,
                                               ack_shard=batch.dst_shard)

    def _send_ack(self, pending: _Pending, result: dict) -> None:  # type: ignore[type-arg]
        hint = self.core.leader_id or "" if result.get("not_leader") else ""
        self._send_peer_reply(pending.ident,
                              MigrateAck(pending.request_id, pending.ack_shard, result, hint))

    def _send_peer_reply(self, ident: bytes, msg: MigrateAck) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.peer_router.send_multipart([ident, *codec.encode(msg)], zmq.NOBLOCK)

    # ------------------------------------------------------------------ housekeeping

    def _publish_heartbeat(self) -> None:
        core, cfg = self.core, self.config
        current = self.state.ownership.ring
        ring = (current or self.initial_ring).config
        hb = Heartbeat(
            cfg.node_id, cfg.shard_id, core.role, core.term, core.leader_id, core.last_term,
            core.last_index, core.commit_index, self.state.applied_index, self.state.key_count,
            os.getpid(), cfg.advertise, tuple(sorted({cfg.node_id, *cfg.peers})),
            ring.epoch, ring.shards, ring.vnodes,
            cfg.heartbeat_ms, {"fsync": str(cfg.fsync), **cfg.extra},
        )
        with contextlib.suppress(zmq.Again):
            self.pub.send_multipart(codec.encode(hb), zmq.NOBLOCK)

    def _maybe_snapshot(self) -> None:
        applied = self.state.applied_index
        if applied - self._last_snapshot_index < self.config.snapshot_entries:
            return
        term = self.core.term_at(applied)
        if term is None:
            return
        started = time.monotonic()
        data = self.state.snapshot_bytes()
        save_snapshot(self.config.data_dir, applied, term, data)
        self.core.compacted(applied, term, data)
        # keep the log back to the older kept snapshot, so falling back to it (if the
        # newest is ever damaged) still meets a contiguous log
        self.wal.compact(compactable_index(self.config.data_dir))
        self._last_snapshot_index = applied
        self.log.info("snapshot at index {} ({} bytes, {:.0f} ms)", applied, len(data),
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
