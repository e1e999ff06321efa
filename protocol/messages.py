"""Every message that crosses a zkv socket: one frozen, slotted dataclass per type.

Wire shape (see ``zkv.protocol.codec``): frame 0 is a msgpack array
``[PROTOCOL_VERSION, TYPE, field, field, ...]`` in the field order declared here; a
message with a ``BLOB`` field (a value or a snapshot chunk) carries it as frame 1, so
large values are never copied through msgpack.

Data requests put ``key`` at header position 4 (``[v, type, client_id, request_id, key]``)
so the broker can route from the header alone (``codec.route_fields``).

Flows:
  client  -> broker frontend : *Request
  broker  -> node            : *Request (forwarded, client identity in front), Campaign,
                               Heard
  node    -> broker          : *Reply (addressed to the client identity)
  node    -> broker SUB      : Heartbeat
  node   <-> node            : VoteRequest/VoteReply, AppendEntries/AppendReply,
                               InstallSnapshot/SnapshotReply
  ring changes               : ``protocol.admin`` (Admin* requests and replies,
                               MigrateBatch/MigrateAck), re-exported here

A ring travels as ``RingConfig.to_wire()`` (``protocol.ring``) wherever it appears.
Version 2: typed admin messages, one ring wire format (Heartbeat, Redirect, StatusReply).
"""

from __future__ import annotations

import enum
from dataclasses import field
from typing import Any, ClassVar, NewType

from zkv.protocol.admin import (
    ADMIN_REPLY_CLASSES,
    ADMIN_REQUEST_CLASSES,
    ADMIN_REQUEST_TYPES,
    MEMBERSHIP_REQUEST_CLASSES,
    AdminAddReplica,
    AdminAppliedReply,
    AdminBegin,
    AdminDrop,
    AdminFence,
    AdminInfo,
    AdminInfoReply,
    AdminListingReply,
    AdminMembers,
    AdminMembersReply,
    AdminMergeSessions,
    AdminPush,
    AdminPushReply,
    AdminRemoveReplica,
    AdminReplaceReplica,
    AdminReply,
    AdminRequest,
    AdminRingSet,
    AdminSessions,
    AdminSessionsReply,
    AdminSnapshotReply,
    AdminSnapshotSave,
    AdminTrack,
    AdminTransferLeader,
    Applied,
    MigrateAck,
    MigrateBatch,
    MigrationMessage,
    Phase,
)
from zkv.protocol.consistency import Consistency
from zkv.protocol.record import record
from zkv.protocol.ring import RingConfig
from zkv.protocol.ttl_messages import (
    TTL_REPLY_CLASSES,
    TTL_REQUEST_CLASSES,
    ExpireReply,
    ExpireRequest,
    PersistRequest,
    PutTtlRequest,
    TtlReply,
    TtlRequest,
    TtlWriteRequest,
)

PROTOCOL_VERSION = 2

NodeId = NewType("NodeId", str)
ShardId = NewType("ShardId", int)
Term = NewType("Term", int)
LogIndex = NewType("LogIndex", int)


class Role(enum.IntEnum):
    FOLLOWER = 0
    CANDIDATE = 1
    LEADER = 2


# --------------------------------------------------------------------------- client


@record
class GetRequest:
    TYPE: ClassVar[int] = 1
    client_id: bytes
    request_id: int
    key: bytes
    consistency: Consistency = Consistency.LINEARIZABLE


@record
class PutRequest:
    """A write; (client_id, request_id) makes a retry idempotent.

    ``lowest_pending`` is the smallest request id this client still awaits an answer
    for: the server may forget the client's replies below it (RIFL-style sessions).
    """

    TYPE: ClassVar[int] = 2
    BLOB: ClassVar[str] = "value"
    client_id: bytes
    request_id: int
    key: bytes
    lowest_pending: int
    value: bytes


@record
class DeleteRequest:
    """Remove ``key``; with ``expected_version`` > 0, only if the key's version is that
    (checked where the delete is applied, so nothing can land in between). 0 means
    unconditional: "must not exist" means nothing for a delete, and a sender that
    predates the field omits it (a trailing default), so the wire stays compatible."""

    TYPE: ClassVar[int] = 3
    client_id: bytes
    request_id: int
    key: bytes
    lowest_pending: int
    expected_version: int = 0


@record
class CasRequest:
    """Compare-and-set: write ``value`` only if the key's version is ``expected_version``
    (0 means "the key must not exist")."""

    TYPE: ClassVar[int] = 4
    BLOB: ClassVar[str] = "value"
    client_id: bytes
    request_id: int
    key: bytes
    lowest_pending: int
    expected_version: int
    value: bytes


@record
class StatusRequest:
    """Answered by the broker from its heartbeat table."""

    TYPE: ClassVar[int] = 5
    client_id: bytes
    request_id: int


@record
class PingRequest:
    TYPE: ClassVar[int] = 6
    client_id: bytes
    request_id: int


@record
class GetReply:
    TYPE: ClassVar[int] = 20
    BLOB: ClassVar[str] = "value"
    request_id: int
    found: bool
    version: int
    value: bytes


@record
class PutReply:
    TYPE: ClassVar[int] = 21
    request_id: int
    version: int


@record
class DeleteReply:
    """``deleted``: ``version`` is the delete's own version. Not deleted: ``version`` is
    the key's current version, 0 when it did not exist; > 0 only when a conditional
    delete found another version (like ``CasReply``)."""

    TYPE: ClassVar[int] = 22
    request_id: int
    deleted: bool
    version: int


@record
class CasReply:
    """``version`` is the key's version after the call (the new one when swapped)."""

    TYPE: ClassVar[int] = 23
    request_id: int
    swapped: bool
    version: int


@record
class ErrorReply:
    TYPE: ClassVar[int] = 24
    request_id: int
    code: int
    message: str = ""
    leader_hint: str = ""
    epoch: int = 0


@record
class StatusReply:
    """``nodes`` holds one dict per node the broker remembers: the fields of its latest
    Heartbeat plus ``age_ms`` and ``live``; ``ring`` is the adopted ring (None before
    the broker heard one)."""

    TYPE: ClassVar[int] = 25
    request_id: int
    broker_id: str
    nodes: tuple[dict[str, Any], ...]
    ring: RingConfig | None


@record
class PongReply:
    TYPE: ClassVar[int] = 26
    request_id: int
    broker_id: str


# --------------------------------------------------------------------------- cluster


@record
class Heartbeat:
    """Published by every node every ``heartbeat_ms``; the broker's only source of truth."""

    TYPE: ClassVar[int] = 40
    node_id: str
    shard_id: int
    role: Role
    term: int
    leader_id: str
    last_log_term: int
    last_index: int
    commit_index: int
    applied_index: int
    key_count: int
    pid: int
    peer_addr: str
    members: tuple[str, ...]
    ring: RingConfig
    heartbeat_ms: int
    extra: dict[str, Any] = field(default_factory=dict)


@record
class Campaign:
    """Broker -> node: the shard's leader is gone, stand for election.

    ``term`` is the highest term the broker has seen for the shard; a node whose term is
    already above it, or that hears a live leader, ignores the request.
    """

    TYPE: ClassVar[int] = 41
    shard_id: int
    term: int
    broker_id: str


@record
class Heard:
    """Broker -> node, as ``[b"", Heard]`` every heartbeat interval: "I hear your
    heartbeats" (the latest at ``term``), sent only to nodes heard within a few heartbeat
    intervals. A leader that no broker has confirmed for an election timeout steps down
    (``storage_node/node_core.py``): nobody could route to it, and its followers would
    refuse to elect anyone else while it lives. Older nodes drop it as an unknown type.
    """

    TYPE: ClassVar[int] = 45
    broker_id: str
    term: int


@record
class RequestBatch:
    """Broker -> node: client requests for one node taken in one drain of the frontend,
    sent as one frame. Each item is ``(client_ident, header[, blob])`` exactly as the
    single-request form would carry them. Per-message cost dominates in pyzmq, so one
    message for many requests is most of the broker's and the node's savings under load.
    """

    TYPE: ClassVar[int] = 42
    items: tuple[tuple[bytes, ...], ...]


@record
class ReplyBatch:
    """Node -> broker: the replies of one loop iteration, ``(client_ident, reply[, blob])``
    each; the broker sends every item to its client as a separate message."""

    TYPE: ClassVar[int] = 43
    items: tuple[tuple[bytes, ...], ...]


@record
class Redirect:
    """Node -> broker, as ``[b"", Redirect]``: requests this node refused as not its
    shard's at ``ring`` (``WRONG_SHARD``), handed back whole so the broker
    re-routes them instead of failing the client. Each item is the request exactly as
    it arrived, ``(client_ident, header[, blob])``. The broker adopts the ring if it is
    newer than its own and forwards each item to the leader its ring now names; if that
    is still ``shard_id`` (the refusing shard), the client gets ``WRONG_SHARD`` and its
    SDK retries. So a request is re-routed at most once per ring epoch the broker
    learns, and never bounces between two nodes."""

    TYPE: ClassVar[int] = 44
    shard_id: int
    ring: RingConfig
    items: tuple[tuple[bytes, ...], ...]


# --------------------------------------------------------------------------- peers


@record
class Entry:
    """One log entry; ``data`` is an encoded state-machine command (opaque here)."""

    term: int
    index: int
    data: bytes


@record
class VoteRequest:
    """``pre_vote`` asks "would you vote for me at ``term``?" without anyone changing
    state, so a node that cannot win never bumps the cluster's term (Raft thesis 9.6)."""

    TYPE: ClassVar[int] = 50
    term: int
    candidate_id: str
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    #: the leader handed over (``TimeoutNow``): voters grant despite hearing that leader
    transfer: bool = False


@record
class VoteReply:
    """``candidate``: whom the vote is for. Two candidates can share a term, and a reply
    that reaches the other one (a stale address now used by it) must not count there:
    a candidate counts only votes naming it ("" from an older node: counted as before)."""

    TYPE: ClassVar[int] = 51
    term: int
    voter_id: str
    granted: bool
    pre_vote: bool = False
    candidate: str = ""


@record
class AppendEntries:
    """Also the leader's heartbeat to followers (empty ``entries``). ``read_seq`` lets a
    majority of replies confirm leadership for a batch of linearizable reads."""

    TYPE: ClassVar[int] = 52
    term: int
    leader_id: str
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit_index: int
    read_seq: int


@record
class AppendReply:
    """On failure ``match_index`` is a hint: the follower's last index (or a conflict)."""

    TYPE: ClassVar[int] = 53
    term: int
    follower_id: str
    success: bool
    match_index: int
    read_seq: int
    #: False from a node whose data dir cannot vote (empty, not admitted): the leader
    #: does not count its log toward a commit, a read or its own liveness
    voter: bool = True
    #: a non-voter's data dir incarnation, recorded when the leader promotes it
    incarnation: str = ""


@record
class InstallSnapshot:
    TYPE: ClassVar[int] = 54
    BLOB: ClassVar[str] = "data"
    term: int
    leader_id: str
    last_index: int
    last_term: int
    offset: int
    done: bool
    data: bytes


@record
class SnapshotReply:
    """``offset`` is the next byte the follower expects (the total size once done)."""

    TYPE: ClassVar[int] = 55
    term: int
    follower_id: str
    last_index: int
    offset: int
    success: bool


# --------------------------------------------------------------------------- membership


@record
class TimeoutNow:
    """Leader -> an up-to-date follower: stand for election now (leadership transfer,
    Raft thesis 3.10); its vote requests carry ``transfer`` so voters ignore the lease."""

    TYPE: ClassVar[int] = 49
    term: int
    leader_id: str


@record
class FoundingProbe:
    """Peer -> peer: a node bootstrapping a new shard asks a member of its initial
    configuration for its state (``storage_node/identity.py``)."""

    TYPE: ClassVar[int] = 58
    node_id: str
    cluster_id: str
    shard_id: int


@record
class WrongNode:
    """A node's answer to peer traffic on a connection that announced another target
    node or another cluster (``storage_node.peer_link``): who it really is, and why it
    refused. The dialer redials (resolving the name again) and logs the stale address."""

    TYPE: ClassVar[int] = 46
    node_id: str
    shard_id: int
    cluster_id: str
    reason: str


@record
class FoundingAnswer:
    """Answer to ``FoundingProbe``: ``pristine`` if the member is bootstrapping on an
    empty data dir, or founded and still at term 0; ``term`` is its current term."""

    TYPE: ClassVar[int] = 59
    node_id: str
    cluster_id: str
    shard_id: int
    pristine: bool
    term: int


ClientRequest = (
    GetRequest | PutRequest | DeleteRequest | CasRequest | StatusRequest | PingRequest
    | AdminRequest | PutTtlRequest | ExpireRequest | PersistRequest | TtlRequest
)
WriteRequest = PutRequest | DeleteRequest | CasRequest
ClientReply = (
    GetReply | PutReply | DeleteReply | CasReply | ErrorReply | StatusReply | PongReply
    | AdminReply | ExpireReply | TtlReply
)
PeerMessage = (
    VoteRequest | VoteReply | AppendEntries | AppendReply | InstallSnapshot | SnapshotReply
    | TimeoutNow
)
FoundingMessage = FoundingProbe | FoundingAnswer
# Batches and scans live in their own module (they need ``Consistency`` from here).
from zkv.protocol.multikey import (  # noqa: E402
    MULTIKEY_MESSAGE_TYPES,
    MultiDeleteRequest,
    MultiGetRequest,
    MultiPutRequest,
    MultiReply,
    ScanReply,
    ScanRequest,
)
from zkv.protocol.watch import WATCH_MESSAGE_TYPES, WatchReply, WatchRequest  # noqa: E402

MultiKeyMessage = (
    MultiGetRequest | MultiPutRequest | MultiDeleteRequest | ScanRequest | MultiReply
    | ScanReply
)
Message = (
    ClientRequest | ClientReply | Heartbeat | Campaign | Heard | RequestBatch | ReplyBatch
    | Redirect | PeerMessage | MigrationMessage | FoundingMessage | WrongNode
    | MultiKeyMessage | WatchRequest | WatchReply
)

ALL_MESSAGE_TYPES: tuple[type, ...] = (
    GetRequest, PutRequest, DeleteRequest, CasRequest, StatusRequest, PingRequest,
    *ADMIN_REQUEST_CLASSES,
    GetReply, PutReply, DeleteReply, CasReply, ErrorReply, StatusReply, PongReply,
    *ADMIN_REPLY_CLASSES,
    Heartbeat, Campaign, Heard, RequestBatch, ReplyBatch, Redirect,
    VoteRequest, VoteReply, AppendEntries, AppendReply, InstallSnapshot, SnapshotReply,
    MigrateBatch, MigrateAck, FoundingProbe, FoundingAnswer, TimeoutNow, WrongNode,
    *MULTIKEY_MESSAGE_TYPES,
    *TTL_REQUEST_CLASSES, *TTL_REPLY_CLASSES,
    *WATCH_MESSAGE_TYPES,
)  # fmt: skip

DATA_REQUEST_TYPES: frozenset[int] = frozenset(
    {GetRequest.TYPE, PutRequest.TYPE, DeleteRequest.TYPE, CasRequest.TYPE}
    | {cls.TYPE for cls in TTL_REQUEST_CLASSES}
)

__all__ = [
    "ADMIN_REPLY_CLASSES", "ADMIN_REQUEST_CLASSES", "ADMIN_REQUEST_TYPES",
    "ALL_MESSAGE_TYPES", "MEMBERSHIP_REQUEST_CLASSES", "AdminAddReplica", "AdminMembers",
    "AdminMembersReply", "AdminRemoveReplica", "AdminReplaceReplica", "AdminSnapshotReply",
    "AdminSnapshotSave", "AdminTransferLeader", "FoundingAnswer", "FoundingMessage",
    "FoundingProbe", "TimeoutNow", "AdminAppliedReply", "AdminBegin", "AdminDrop", "AdminFence",
    "AdminInfo", "AdminInfoReply", "AdminListingReply", "AdminMergeSessions", "AdminPush",
    "AdminPushReply", "AdminReply", "AdminRequest", "AdminRingSet", "AdminSessions",
    "AdminSessionsReply", "AdminTrack", "AppendEntries", "AppendReply", "Applied",
    "Campaign", "CasReply", "CasRequest", "ClientReply", "ClientRequest", "Consistency",
    "DATA_REQUEST_TYPES", "DeleteReply", "DeleteRequest", "Entry", "ErrorReply",
    "GetReply", "GetRequest", "Heard", "Heartbeat", "InstallSnapshot", "LogIndex", "Message",
    "MigrateAck", "MigrateBatch", "MigrationMessage", "NodeId", "PROTOCOL_VERSION",
    "PeerMessage", "Phase", "PingRequest", "PongReply", "PutReply", "PutRequest",
    "Redirect", "ReplyBatch", "RequestBatch", "RingConfig", "Role", "ShardId",
    "SnapshotReply", "StatusReply", "StatusRequest", "Term", "VoteReply", "VoteRequest",
    "WriteRequest", "WrongNode", "PutTtlRequest", "ExpireRequest", "PersistRequest",
    "TtlRequest", "ExpireReply", "TtlReply", "TtlWriteRequest",
]
