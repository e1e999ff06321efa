"""What a storage node answers to a client request: admission, leader gating, and the
replies of one loop turn. Pure (the base of ``NodeCore``; see ``node_core.py`` for the
contract with the shell).

Rules:
- Admission: an undecodable request gets ``BAD_REQUEST`` (the request id recovered
  best-effort); a key over ``key_bytes_max`` or a value over ``value_bytes_max`` gets
  ``TOO_LARGE``; a key another shard owns goes back whole to its broker (``Redirect``,
  with our ring) to be routed again; a key moving away answers ``UNAVAILABLE`` (retry);
  an admin request for another shard answers ``WRONG_SHARD``.
- Only the leader proposes writes and admin commands and answers ``leader`` and
  ``linearizable`` reads; others answer ``NOT_LEADER`` with the leader they know as a
  hint, or ``NO_LEADER`` when they know none. ``stale`` reads are answered by anyone.
- A leader whose disk is full answers writes ``DISK_FULL`` (``disk_full``, set by the
  shell); with a data quota (``max_data_bytes``), a put or CAS that would grow the
  shard past it answers ``QUOTA_EXCEEDED``, counting writes proposed but not yet
  applied (``quota.py``: why the leader decides, not the apply). A node that is behind
  on durability (``unpersisted``) does not stand for election.
- A leader stamps each write with ``ts_ms``, the wall clock the shell read for this turn,
  so every replica judges session expiry by the same clock.
- Keys that expire (TTL): ``ttl_requests.py`` holds the rules (deadline stamping, reads
  judged by ``wall_ms``, the latest wall clock the shell gave us).
- A proposed write is remembered (``pending_writes``: index -> whom to answer, with the
  term it was proposed in); a linearizable read goes to the replica's read index with
  whom to answer as its token. ``node_core.py`` answers both.
- Replies are queued per origin (the shell's socket, the simulator's address) and handed
  out once per loop turn by ``take_outgoing``: redirects first (one ``Redirect`` per
  origin), then migration acks, then replies, several to one origin as one
  ``ReplyBatch`` (per-message cost dominates in pyzmq).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode, RemoteProtocolError
from zkv.protocol.limits import KEY_BYTES_MAX, VALUE_BYTES_MAX
from zkv.protocol.messages import (
    AdminRequest,
    Campaign,
    CasRequest,
    Consistency,
    DeleteRequest,
    ErrorReply,
    GetReply,
    GetRequest,
    Heard,
    PingRequest,
    PongReply,
    PutRequest,
    Redirect,
    ReplyBatch,
    RequestBatch,
    Role,
    TtlRequest,
)
from zkv.protocol.multikey import FANOUT_REQUEST_CLASSES
from zkv.protocol.ring import Ring
from zkv.protocol.timing import HEARTBEAT_MS
from zkv.protocol.ttl_messages import TTL_WRITE_CLASSES, PutTtlRequest, TtlWriteRequest
from zkv.protocol.watch import WatchRequest
from zkv.storage_node.admin_requests import ADMIN_STAMP as ADMIN_STAMP  # re-exported
from zkv.storage_node.admin_requests import AdminRequests
from zkv.storage_node.broker_contact import BrokerContact
from zkv.storage_node.commands import Command, command_from_request, encode_command
from zkv.storage_node.multikey_requests import MultiKeyRequests
from zkv.storage_node.push import LeaderTasks
from zkv.storage_node.quota import Quota, write_growth_bytes
from zkv.storage_node.replica import Replica
from zkv.storage_node.snapshot_loader import RECORDS_PER_STEP
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.stats import NodeStats
from zkv.storage_node.ttl_requests import ttl_command, ttl_refusal, ttl_reply, wait_index
from zkv.storage_node.watch_requests import ParkedWatch, WatchRequests

Frames = tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class NodeCoreConfig:
    node_id: str
    shard_id: int
    members: tuple[str, ...]
    advertise: str = ""
    heartbeat_ms: int = HEARTBEAT_MS
    snapshot_entries: int = 50_000
    #: also snapshot once this many bytes of commands were applied since the last one
    snapshot_bytes: int = 64 * 1024 * 1024
    #: bytes of keys + values the shard may hold (0: no quota); see quota.py
    max_data_bytes: int = 0
    key_bytes_max: int = KEY_BYTES_MAX
    value_bytes_max: int = VALUE_BYTES_MAX
    #: the heartbeat's ``pid`` field (the shell's process id; the simulator's any int)
    pid: int = 0
    #: the heartbeat's free-form ``info`` (fsync policy, ...)
    info: dict[str, str] = field(default_factory=dict)
    #: the peer addresses this node was started with (``--peers``): a configuration
    #: change records every member's address, so any member can reach any other
    peers: dict[str, str] = field(default_factory=dict)
    #: the cluster this node belongs to: peer connections announcing another are refused
    cluster_id: str = ""
    #: keys decoded per loop turn while a snapshot from the leader is installed
    #: (``snapshot_loader.py``: a turn stays within milliseconds at any data size)
    install_records_per_step: int = RECORDS_PER_STEP


@dataclass(slots=True)
class Pending:
    """Where to send the answer for a proposed write or a queued read."""

    origin: object
    ident: bytes
    request_id: int
    key: bytes = b""
    command: Command | None = None  # a write's decoded command, applied without re-decoding
    ack_shard: int = -1  # >= 0: a MigrateBatch from a source leader, answered by MigrateAck
    term: int = 0  # the term the write was proposed in
    multi: object = None  # a queued batch read or scan page (multikey_requests.py)
    ttl_read: bool = False  # a queued read is a TtlRequest (answered by TtlReply)


class RequestCore(MultiKeyRequests, AdminRequests, WatchRequests):
    """A node's request admission and reply queue; ``NodeCore`` adds the rest."""

    pending_type = Pending

    def __init__(self, config: NodeCoreConfig, replica: Replica, state: KVStateMachine,
                 initial_ring: Ring, tasks: LeaderTasks) -> None:
        self.config = config
        self.replica = replica
        self.state = state
        #: the ring this replica started from, until the state machine holds one
        self.initial_ring = initial_ring
        #: leader-only soft state: streams to other shards' leaders, drops in progress
        self.tasks = tasks
        self.pending_writes: dict[int, Pending] = {}
        self.waiting_reads: list[tuple[int, Pending]] = []
        #: watch polls waiting for an event (watch_requests.py)
        self.parked_watches: list[ParkedWatch] = []
        self._outbox: dict[object, list[Frames]] = {}
        #: requests for keys another shard owns, handed back whole to their broker
        self._redirects: dict[object, list[Frames]] = {}
        #: frames sent as they are, not batched: migration acks, wrong-node refusals
        self._direct: list[tuple[object, Frames]] = []
        self._was_leader = False
        self._next_heartbeat = 0.0
        self.last_snapshot_index = replica.snap_index
        #: the latest wall clock (ms) the shell gave us: reads judge expiry by it (TTL)
        self.wall_ms = 0
        #: (term, index) of the expiry sweep in flight (node_core.py)
        self.sweep_inflight = (0, 0)
        #: lifecycle lines for the shell to log (the core has no logger)
        self.notes: list[str] = []
        self.quota = Quota(config.max_data_bytes)
        #: bytes of commands applied since the last snapshot (the byte trigger)
        self.log_bytes = 0
        #: counts per op and result (stats.py); the shell publishes them for /metrics
        self.stats = NodeStats()
        #: what the heartbeat says of this data dir (identity.py; the shell's, a file)
        self.identity_extra: dict[str, object] = {}
        #: with Curve, the committed configuration's member keys (``protocol/node_keys``)
        self.keys_extra: dict[str, object] = {}
        #: while bootstrapping, founding messages (and a leader's appends: the shard
        #: exists) are set aside for the shell, which holds the identity
        self.founding_active = False
        self.founding_events: list[tuple[str, object]] = []
        #: set by the shell when Curve is on: peers are known by their keys, and admin
        #: requests need the admin role the broker stamps on them (``ADMIN_STAMP``)
        self.secure = False
        self.impostors = 0
        #: set by the shell: writes find no space (answer DISK_FULL) ...
        self.disk_full = False
        #: ... and something the core asked to persist is still waiting for the disk
        self.unpersisted = False
        #: brokers' ``Heard`` confirmations: a leader none confirms steps down (tick)
        self.broker_contact = BrokerContact(replica.config.election_timeout_ms / 1000)

    # ------------------------------------------------------------------ requests

    def on_broker_frames(self, origin: object, frames: list[bytes], now: float,
                         ts_ms: int) -> None:
        """``[client_ident, header(, blob)]`` or ``[b"", RequestBatch | Campaign |
        Heard]``; raises ``RemoteProtocolError`` on frames that name no client to answer."""
        if len(frames) < 2:
            raise RemoteProtocolError("too few frames")
        if ts_ms > self.wall_ms:
            self.wall_ms = ts_ms
        ident = frames[0]
        if ident == b"":
            msg = codec.decode(frames[1:])
            if isinstance(msg, RequestBatch):
                for item in msg.items:
                    if len(item) >= 2 and item[0]:
                        self.on_request(origin, item[0], item[1:], now, ts_ms)
            elif isinstance(msg, Heard):
                self.broker_contact.heard(msg, self.replica.term, now)
            elif (isinstance(msg, Campaign) and msg.shard_id == self.config.shard_id
                  and not self.unpersisted):  # no standing while behind on durability
                self.notes.append(f"broker {msg.broker_id} asks us to stand (term {msg.term})")
                self.replica.campaign(now, msg.term)
            return
        self.on_request(origin, ident, frames[1:], now, ts_ms)

    def on_request(self, origin: object, ident: bytes, frames: Sequence[bytes], now: float,
                   ts_ms: int) -> None:
        """One client request, as its wire frames (kept to hand back in a Redirect)."""
        try:
            req = codec.decode(frames)
            self.stats.op = type(req)
        except RemoteProtocolError:
            self.stats.op = None
            rid = codec.request_id_of(frames[0])
            self._reply(origin, ident, ErrorReply(rid, ErrorCode.BAD_REQUEST, "malformed request"))
            return
        if isinstance(req, GetRequest):
            if self._check_key(origin, ident, req.request_id, req.key, frames):
                self._on_get(origin, ident, req, now)
        elif isinstance(req, (PutRequest, DeleteRequest, CasRequest)):
            if self._check_key(origin, ident, req.request_id, req.key, frames):
                self._on_write(origin, ident, req, now, ts_ms)
        elif isinstance(req, FANOUT_REQUEST_CLASSES):  # batches, scans: multikey_requests.py
            self._on_fanout(origin, ident, req, now, ts_ms)  # type: ignore[arg-type]
        elif isinstance(req, PingRequest):
            self._reply(origin, ident, PongReply(req.request_id, self.config.node_id))
        elif isinstance(req, TTL_WRITE_CLASSES):
            if self._check_key(origin, ident, req.request_id, req.key, frames):
                self._on_ttl_write(origin, ident, req, now, ts_ms)
        elif isinstance(req, TtlRequest):
            if self._check_key(origin, ident, req.request_id, req.key, frames):
                self._on_get(origin, ident, req, now)
        elif isinstance(req, AdminRequest):
            self._on_admin(origin, ident, req, now)
        elif isinstance(req, WatchRequest):
            self._on_watch(origin, ident, req, now)
        else:
            rid = getattr(req, "request_id", 0)
            self._reply(origin, ident, ErrorReply(rid, ErrorCode.BAD_REQUEST, "not a data request"))

    def _check_key(self, origin: object, ident: bytes, request_id: int, key: bytes,
                   frames: Sequence[bytes]) -> bool:
        if len(key) > self.config.key_bytes_max:
            self._reply(origin, ident, ErrorReply(
                request_id, ErrorCode.TOO_LARGE,
                f"key of {len(key)} bytes is over the limit of {self.config.key_bytes_max}",
            ))  # fmt: skip
            return False
        return self._owned(origin, ident, request_id, key, frames)

    def _owned(self, origin: object, ident: bytes, request_id: int, key: bytes,
               frames: Sequence[bytes] | None = None) -> bool:
        """Whether this shard serves ``key`` now. If not: a request another shard owns
        goes back to its broker whole (``Redirect``) to be re-routed; a moving key is
        answered UNAVAILABLE (retry); with no frames to hand back, WRONG_SHARD."""
        ownership = self.state.ownership
        refused = ownership.refusal(key)
        if refused == ErrorCode.WRONG_SHARD and frames is not None:
            self._redirects.setdefault(origin, []).append((ident, *frames))
            return False
        if refused:
            why = ("key not owned by this shard" if refused == ErrorCode.WRONG_SHARD
                   else "key is moving to another shard; retry")
            self._reply(origin, ident, ErrorReply(request_id, refused, why, epoch=ownership.epoch))
            return False
        return True

    def not_leader(self, request_id: int) -> ErrorReply:
        leader = self.replica.leader_id
        code = ErrorCode.NOT_LEADER if leader else ErrorCode.NO_LEADER
        return ErrorReply(request_id, code, "not the leader", leader_hint=leader)

    def _on_get(self, origin: object, ident: bytes, req: GetRequest | TtlRequest,
                now: float) -> None:
        replica = self.replica
        ttl = type(req) is TtlRequest
        if req.consistency is Consistency.STALE or (
                req.consistency is Consistency.LEADER and replica.role is Role.LEADER):
            self._read_now(origin, ident, req, ttl)
        elif replica.role is not Role.LEADER:
            self._reply(origin, ident, self.not_leader(req.request_id))
        elif (index := replica.read_index_now()) is not None and index <= self.state.applied_index:
            self._read_now(origin, ident, req, ttl)  # a single voter: confirmed as it arrives
        elif not replica.read_index(Pending(origin, ident, req.request_id, req.key,
                                            ttl_read=ttl), now):
            self._reply(origin, ident, ErrorReply(req.request_id, ErrorCode.UNAVAILABLE, "busy"))

    def _read_now(self, origin: object, ident: bytes, req: GetRequest | TtlRequest,
                  ttl: bool) -> None:
        wait = self._answer_get(origin, ident, req.request_id, req.key, ttl)
        if wait:  # rare: see ``_answer_get``
            self.waiting_reads.append(
                (wait, Pending(origin, ident, req.request_id, req.key, ttl_read=ttl)))

    def _answer_get(self, origin: object, ident: bytes, request_id: int, key: bytes,
                    ttl_read: bool = False) -> int:
        """Answer a read; or return the log index it must wait for first (TTL: a key
        expired by ``wall_ms`` with one of our writes on it in flight)."""
        state, now_ms = self.state, self.wall_ms
        wait = wait_index(state, key, now_ms, self.pending_writes)
        if wait > state.applied_index:
            return wait
        if ttl_read:
            self._reply(origin, ident, ttl_reply(state, request_id, key, now_ms))
            return 0
        found = state.get_live(key, now_ms)
        if found is None:
            self._reply(origin, ident, GetReply(request_id, False, 0, b""))
        else:
            self._reply(origin, ident, GetReply(request_id, True, found[1], found[0]))
        return 0

    def _on_write(self, origin: object, ident: bytes, req: PutRequest | DeleteRequest | CasRequest,
                  now: float, ts_ms: int) -> None:
        value = None if isinstance(req, DeleteRequest) else req.value
        growth = self._admit_write(origin, ident, req.request_id, req.key, value)
        if growth is None:
            return
        self._propose_write(origin, ident, req.request_id, command_from_request(req, ts_ms),
                            growth, now)

    def _on_ttl_write(self, origin: object, ident: bytes, req: TtlWriteRequest, now: float,
                      ts_ms: int) -> None:
        """``put(ttl=)``, ``expire``, ``persist``: admitted like a write, proposed with the
        deadline stamped (``ttl_requests.py``)."""
        refused = ttl_refusal(req)
        if refused is not None:
            self._reply(origin, ident, refused)
            return
        value = req.value if isinstance(req, PutTtlRequest) else None
        growth = self._admit_write(origin, ident, req.request_id, req.key, value)
        if growth is None:
            return
        self._propose_write(origin, ident, req.request_id, ttl_command(req, ts_ms), growth, now)

    def _propose_write(self, origin: object, ident: bytes, request_id: int, cmd: Command,
                       growth: int, now: float) -> None:
        """Propose an admitted write; its growth counts against the quota until applied."""
        index = self._propose(cmd, Pending(origin, ident, request_id, command=cmd), now)
        if growth:
            self.quota.proposed(index, growth)

    def _admit_write(self, origin: object, ident: bytes, request_id: int, key: bytes,
                     value: bytes | None) -> int | None:
        """What every single write must pass at the leader, in this order: its value's
        size, leadership, a disk with room, the data quota. None: refused (answered);
        else the bytes the write may grow the shard by (0 for a delete or an expire)."""
        if value is not None and len(value) > self.config.value_bytes_max:
            self._reply(origin, ident, ErrorReply(
                request_id, ErrorCode.TOO_LARGE,
                f"value of {len(value)} bytes is over the limit of {self.config.value_bytes_max}",
            ))  # fmt: skip
            return None
        if self.replica.role is not Role.LEADER:
            self._reply(origin, ident, self.not_leader(request_id))
            return None
        if self.disk_full:
            self._reply(origin, ident, ErrorReply(request_id, ErrorCode.DISK_FULL,
                                                  "the shard leader's disk is full; retry later"))
            return None
        growth = 0
        if value is not None and self.quota.max_data_bytes:
            growth = write_growth_bytes(key, value, self.state.get(key))
            why = self.quota.refusal(self.state.data_bytes, growth)
            if why:
                self._reply(origin, ident, ErrorReply(request_id, ErrorCode.QUOTA_EXCEEDED, why))
                return None
        return growth

    def _propose(self, cmd: Command, pending: Pending, now: float) -> int:
        """Propose ``cmd`` (callers checked we lead), remember whom to answer; its index."""
        replica = self.replica
        index = replica.propose(encode_command(cmd), now)
        assert index is not None  # the callers checked the role
        pending.term = replica.term
        self.pending_writes[index] = pending
        return index

    def _reply(self, origin: object, ident: bytes, reply: object) -> None:
        """Queue a reply; ``take_outgoing`` hands each origin's queue to the shell."""
        self.stats.reply(reply)
        out = self._outbox.get(origin)
        if out is None:
            out = self._outbox[origin] = []
        out.append((ident, *codec.encode(reply)))  # type: ignore[arg-type]

    def take_outgoing(self) -> list[tuple[object, Frames]]:
        """``(origin, frames)`` to send, in order: redirects, migration acks, replies
        (several replies to one origin as one ``ReplyBatch``)."""
        out: list[tuple[object, Frames]] = []
        if self._redirects:
            own = self.state.ownership
            ring = (own.ring or self.initial_ring).config
            for origin, items in self._redirects.items():
                msg = Redirect(self.config.shard_id, ring, tuple(items))
                out.append((origin, (b"", *codec.encode(msg))))
            self._redirects.clear()
        if self._direct:
            out.extend(self._direct)
            self._direct = []
        for origin, items in self._outbox.items():
            if len(items) == 1:
                out.append((origin, items[0]))
            elif items:
                out.append((origin, (b"", codec.encode(ReplyBatch(tuple(items)))[0])))
        self._outbox.clear()
        return out
