"""Ring-change administration and migration messages: one frozen, slotted dataclass per
admin op and per reply, validated by the codec like every other message.

Flows (``ops/rebalance.py`` drives them; ``storage_node/ownership.py`` has the rules):

  coordinator -> broker -> leader of ``shard_id`` : Admin* requests
  leader -> coordinator                           : Admin*Reply (or ``ErrorReply``)
  source leader -> target node (peer port)        : MigrateBatch
  target node -> source leader                    : MigrateAck

Every admin request starts ``[client_id, request_id, shard_id]``, so the broker routes
it from the header alone (``codec.admin_shard``: position 4, like a data request's key).
Answered by the leader at once: ``AdminInfo`` (-> ``AdminInfoReply``), ``AdminPush``
(-> ``AdminPushReply``), ``AdminSessions`` (-> ``AdminSessionsReply``) and ``AdminDrop``
while the leader still lists the keys to drop (-> ``AdminListingReply``). The others
(``AdminBegin``, ``AdminTrack``, ``AdminFence``, ``AdminMergeSessions``,
``AdminRingSet``, ``AdminDrop`` once listed) are proposed as replicated commands and
answered once applied with ``AdminAppliedReply``: what the command did (``Applied``),
the same at every replica. ``MigrateAck`` carries the same ``Applied`` for a batch.

Records nested in these messages (``Applied``, ``Target``, ``SourceInfo``, ...) travel
as msgpack arrays of their fields in declaration order; a ring travels as
``RingConfig.to_wire()``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from zkv.protocol.ring import RingConfig


class Phase(enum.IntEnum):
    """Where a (source, target) stream of a ring change stands, as the target records
    it: the bulk copy, the catch-up of what was written meanwhile (unfenced), the final
    delta (fenced), done. Wire and log values: never renumber."""

    COPY = 1
    CATCHUP = 2
    DELTA = 3
    DONE = 4


class StreamState(enum.IntEnum):
    """A source leader's stream (``storage_node/push.py``)."""

    LISTING = 0
    SENDING = 1
    DONE = 2
    FAILED = 3


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Applied:
    """What a ring command did when applied (every replica computes the same).
    ``ok`` false: refused, ``error`` says why, nothing changed. ``noop``: the shard is
    already past this change. ``phase``/``cursor``/``stale``: a target's progress for
    the source after a ``MigrateIn``; ``not_leader`` (only in a ``MigrateAck``): the
    node that got the batch does not lead its shard."""

    ok: bool
    error: str = ""
    epoch: int = 0
    noop: bool = False
    phase: Phase | None = None
    cursor: bytes = b""
    stale: bool = False
    stray: int = 0
    deleted: int = 0
    sessions: bool = False
    sources: tuple[int, ...] = ()
    dropped: int = 0
    done: bool = False
    not_leader: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """A node of a stream's target shard, and the address of its peer port."""

    node_id: str
    peer_addr: str


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """A target's replicated progress for one source (``ownership.SourceProgress``)."""

    shard: int
    phase: Phase
    cursor: bytes
    v0: int
    sessions: bool
    v1: int


@dataclass(frozen=True, slots=True)
class IncomingInfo:
    old: RingConfig
    new: RingConfig
    sources: tuple[SourceInfo, ...]

    def source(self, shard: int) -> SourceInfo | None:
        return next((s for s in self.sources if s.shard == shard), None)


@dataclass(frozen=True, slots=True)
class OutgoingInfo:
    old: RingConfig
    new: RingConfig
    dirty: int


@dataclass(frozen=True, slots=True)
class PushInfo:
    """One stream at its source leader: ``(epoch, dst, phase)`` names it."""

    epoch: int
    dst: int
    phase: Phase
    state: StreamState
    listed_permille: int
    total: int | None
    sent: int
    sent_bytes: int
    batches: int
    resends: int
    target: str
    error: str


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class AdminInfo:
    """The leader's ring, fence, migration progress and running streams."""

    TYPE: ClassVar[int] = 60
    client_id: bytes
    request_id: int
    shard_id: int


@dataclass(frozen=True, slots=True)
class AdminBegin:
    """At a target: expect the keys that move to it when ``old`` becomes ``new``."""

    TYPE: ClassVar[int] = 61
    client_id: bytes
    request_id: int
    shard_id: int
    old: RingConfig
    new: RingConfig


@dataclass(frozen=True, slots=True)
class AdminTrack:
    """At a source: from now on note every write to a key that leaves this shard."""

    TYPE: ClassVar[int] = 62
    client_id: bytes
    request_id: int
    shard_id: int
    old: RingConfig
    new: RingConfig


@dataclass(frozen=True, slots=True)
class AdminPush:
    """At a source: stream ``phase`` of the keys moving to ``dst`` straight to one of
    ``targets``, from cursor ``after``; ``rate_bytes_s`` 0 means unbounded."""

    TYPE: ClassVar[int] = 63
    client_id: bytes
    request_id: int
    shard_id: int
    old: RingConfig
    new: RingConfig
    dst: int
    phase: Phase
    v0: int
    after: bytes
    targets: tuple[Target, ...]
    batch_keys: int
    batch_bytes: int
    rate_bytes_s: int = 0


@dataclass(frozen=True, slots=True)
class AdminFence:
    """At a source: refuse the moving keys from this log position on."""

    TYPE: ClassVar[int] = 64
    client_id: bytes
    request_id: int
    shard_id: int
    old: RingConfig
    new: RingConfig


@dataclass(frozen=True, slots=True)
class AdminSessions:
    """At a fenced source: its session table, for the targets."""

    TYPE: ClassVar[int] = 65
    client_id: bytes
    request_id: int
    shard_id: int
    old: RingConfig
    new: RingConfig


@dataclass(frozen=True, slots=True)
class AdminMergeSessions:
    """At a target: merge source ``src``'s session table (msgpack, as sent)."""

    TYPE: ClassVar[int] = 66
    BLOB: ClassVar[str] = "sessions"
    client_id: bytes
    request_id: int
    shard_id: int
    new_epoch: int
    src: int
    version_next: int
    sessions: bytes


@dataclass(frozen=True, slots=True)
class AdminRingSet:
    TYPE: ClassVar[int] = 67
    client_id: bytes
    request_id: int
    shard_id: int
    ring: RingConfig


@dataclass(frozen=True, slots=True)
class AdminDrop:
    """Forget the keys not owned at ring ``epoch``, a batch per request."""

    TYPE: ClassVar[int] = 68
    client_id: bytes
    request_id: int
    shard_id: int
    epoch: int


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class AdminInfoReply:
    TYPE: ClassVar[int] = 70
    request_id: int
    shard: int | None
    ring: RingConfig | None
    fence: RingConfig | None
    incoming: IncomingInfo | None
    outgoing: OutgoingInfo | None
    version_offset: int
    undropped: bool
    applied: int
    keys: int
    pushes: tuple[PushInfo, ...]

    def push(self, epoch: int, dst: int, phase: Phase) -> PushInfo | None:
        return next((p for p in self.pushes if (p.epoch, p.dst, p.phase) == (epoch, dst, phase)),
                    None)


@dataclass(frozen=True, slots=True)
class AdminPushReply:
    """``flipped``: the shard is already at the new ring (nothing started)."""

    TYPE: ClassVar[int] = 71
    request_id: int
    flipped: bool
    epoch: int
    running: bool
    push: PushInfo | None


@dataclass(frozen=True, slots=True)
class AdminSessionsReply:
    TYPE: ClassVar[int] = 72
    BLOB: ClassVar[str] = "sessions"
    request_id: int
    flipped: bool
    epoch: int
    version_next: int
    sessions: bytes


@dataclass(frozen=True, slots=True)
class AdminAppliedReply:
    TYPE: ClassVar[int] = 73
    request_id: int
    result: Applied


@dataclass(frozen=True, slots=True)
class AdminListingReply:
    """``AdminDrop`` while the leader is still listing the keys to drop: come back."""

    TYPE: ClassVar[int] = 74
    request_id: int
    epoch: int
    listed_permille: int


# --------------------------------------------------------------------------- membership
# Answered by the shard leader's replica core (storage_node/membership.py has the rules):
# a change is proposed and answered at once with the configuration in force; the caller
# watches ``AdminMembers`` (or ``zkv status``) until the change took effect. Retried
# like any admin request: each is idempotent (a change already made proposes nothing).


@dataclass(frozen=True, slots=True)
class AdminAddReplica:
    """Add ``node_id`` (reachable at ``peer_addr``) as a learner; promoted once caught up.
    ``public_key``: its Curve public key (z85) for a node whose certificate is not in
    ``keys/public/nodes``; the committed configuration makes members and brokers trust it."""

    TYPE: ClassVar[int] = 80
    client_id: bytes
    request_id: int
    shard_id: int
    node_id: str
    peer_addr: str
    public_key: str = ""


@dataclass(frozen=True, slots=True)
class AdminRemoveReplica:
    TYPE: ClassVar[int] = 81
    client_id: bytes
    request_id: int
    shard_id: int
    node_id: str


@dataclass(frozen=True, slots=True)
class AdminReplaceReplica:
    """Add ``node_id`` as a learner; once promoted, ``old_id`` is removed.
    ``public_key``: as in ``AdminAddReplica``."""

    TYPE: ClassVar[int] = 82
    client_id: bytes
    request_id: int
    shard_id: int
    old_id: str
    node_id: str
    peer_addr: str
    public_key: str = ""


@dataclass(frozen=True, slots=True)
class AdminTransferLeader:
    """Hand leadership to voter ``node_id`` ("": the most up-to-date voter)."""

    TYPE: ClassVar[int] = 83
    client_id: bytes
    request_id: int
    shard_id: int
    node_id: str


@dataclass(frozen=True, slots=True)
class AdminMembers:
    TYPE: ClassVar[int] = 84
    client_id: bytes
    request_id: int
    shard_id: int


@dataclass(frozen=True, slots=True)
class AdminSnapshotSave:
    """``zkv admin snapshot save``: the leader's whole state, once it applied all it
    committed (answered ``UNAVAILABLE`` until then)."""

    TYPE: ClassVar[int] = 85
    client_id: bytes
    request_id: int
    shard_id: int


@dataclass(frozen=True, slots=True)
class AdminMembersReply:
    """The configuration in force at the leader ``node``: its voters and learners, each
    member's peer address and admitted incarnation, replacements under way; ``pending``
    while a change is not committed yet; ``index`` of the change just proposed (0: none
    needed); ``to``: the node a transfer was handed to."""

    TYPE: ClassVar[int] = 86
    request_id: int
    node: str
    voters: tuple[str, ...]
    learners: tuple[str, ...]
    addrs: dict[str, Any]
    incarnations: dict[str, Any]
    replaces: dict[str, Any]
    pending: bool
    index: int
    to: str


@dataclass(frozen=True, slots=True)
class AdminSnapshotReply:
    """A shard's state at ``index`` (``term``) with ``keys`` keys and the ring in force,
    from leader ``node``; ``data`` is the state machine snapshot."""

    TYPE: ClassVar[int] = 87
    BLOB: ClassVar[str] = "data"
    request_id: int
    node: str
    index: int
    term: int
    keys: int
    ring: RingConfig
    data: bytes


MEMBERSHIP_REQUEST_CLASSES: tuple[type, ...] = (
    AdminAddReplica, AdminRemoveReplica, AdminReplaceReplica, AdminTransferLeader,
    AdminMembers,
)  # fmt: skip


# --------------------------------------------------------------------------- migration


@dataclass(frozen=True, slots=True)
class MigrateBatch:
    """Source shard leader -> a node of the target shard (its peer port): the next
    batch of a moving range stream (``storage_node/push.py``). ``after`` is the cursor
    this batch continues from and ``cursor`` where it ends; the target applies a batch
    only if ``after`` is exactly where its replicated progress stands, so a resent or
    late duplicate is acknowledged without being applied twice. ``items`` is msgpack
    ``[[key, value, version] | [key], ...]``."""

    TYPE: ClassVar[int] = 56
    BLOB: ClassVar[str] = "items"
    seq: int
    src_shard: int
    dst_shard: int
    new_epoch: int
    phase: Phase
    v0: int
    after: bytes
    cursor: bytes
    done: bool
    items: bytes


@dataclass(frozen=True, slots=True)
class MigrateAck:
    """Target -> source for ``MigrateBatch`` ``seq``: what the batch's ``MigrateIn``
    did; when this node is not the target's leader, ``result.not_leader`` is set and
    ``leader_hint`` names the leader it knows."""

    TYPE: ClassVar[int] = 57
    seq: int
    dst_shard: int
    result: Applied
    leader_hint: str


AdminRequest = (
    AdminInfo | AdminBegin | AdminTrack | AdminPush | AdminFence | AdminSessions
    | AdminMergeSessions | AdminRingSet | AdminDrop
    | AdminAddReplica | AdminRemoveReplica | AdminReplaceReplica | AdminTransferLeader
    | AdminMembers | AdminSnapshotSave
)
AdminReply = (
    AdminInfoReply | AdminPushReply | AdminSessionsReply | AdminAppliedReply | AdminListingReply
    | AdminMembersReply | AdminSnapshotReply
)
MigrationMessage = MigrateBatch | MigrateAck

ADMIN_REQUEST_CLASSES: tuple[type, ...] = (
    AdminInfo, AdminBegin, AdminTrack, AdminPush, AdminFence, AdminSessions,
    AdminMergeSessions, AdminRingSet, AdminDrop, *MEMBERSHIP_REQUEST_CLASSES, AdminSnapshotSave,
)  # fmt: skip
ADMIN_REPLY_CLASSES: tuple[type, ...] = (
    AdminInfoReply, AdminPushReply, AdminSessionsReply, AdminAppliedReply, AdminListingReply,
    AdminMembersReply, AdminSnapshotReply,
)  # fmt: skip
ADMIN_REQUEST_TYPES: frozenset[int] = frozenset(c.TYPE for c in ADMIN_REQUEST_CLASSES)  # type: ignore[attr-defined]
