"""The node's side of ring-change administration: an admin request (``protocol.admin``)
becomes a reply now or a replicated command to propose. Pure (the shell owns sockets
and proposes what this returns; ``LeaderTasks`` is the leader's soft state).

Answered by the leader at once:
- ``AdminInfo``: ring, fence, incoming migration progress, applied index, key count,
  and the leader's running streams.
- ``AdminPush``: start streaming the keys that move from this shard to ``dst`` when
  ring ``old`` becomes ``new``, straight to ``dst``'s leader (``storage_node/push.py``),
  from cursor ``after``, to one of ``targets`` (``dst``'s nodes), at most
  ``rate_bytes_s`` (0: unbounded). ``Phase.DELTA`` only once the FENCE is applied here.
  Progress shows in ``AdminInfoReply.pushes``.
- ``AdminSessions``: the session table and the next version, once fenced.
- ``AdminDrop`` while the unowned keys are still being listed: the listing progress.

Proposed as commands (answered with ``AdminAppliedReply`` when applied):
``AdminBegin``, ``AdminTrack``, ``AdminFence``, ``AdminMergeSessions``,
``AdminRingSet``, and ``AdminDrop`` once listed (a batch of keys per request).

The codec checked every field's type and every ring; what is checked here is what
depends on this shard's state. A request that does not fit it raises ``AdminError``
(the shell answers ``BAD_REQUEST``).
"""

from __future__ import annotations

import msgpack

from zkv.protocol.admin import (
    AdminAppliedReply,
    AdminBegin,
    AdminDrop,
    AdminFence,
    AdminInfo,
    AdminInfoReply,
    AdminListingReply,
    AdminMergeSessions,
    AdminPush,
    AdminPushReply,
    AdminReply,
    AdminRequest,
    AdminRingSet,
    AdminSessions,
    AdminSessionsReply,
    AdminTrack,
    Applied,
    Phase,
)
from zkv.protocol.errors import ErrorCode
from zkv.protocol.limits import (
    ADMIN_TARGETS_MAX,
    MIGRATE_BATCH_BYTES_MAX,
    MIGRATE_BATCH_KEYS_MAX,
)
from zkv.storage_node.commands import (
    Command,
    Fence,
    MigrateBegin,
    MigrateOut,
    MigrateSessions,
    RingSet,
)
from zkv.storage_node.push import LeaderTasks, PushSpec
from zkv.storage_node.state_machine import KVStateMachine


class AdminError(Exception):
    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


def admin_request(sm: KVStateMachine, tasks: LeaderTasks,
                  req: AdminRequest) -> AdminReply | Command:
    """The reply to send now, or the command to propose; ``AdminError`` if it does
    not fit this shard's state."""
    own = sm.ownership
    rid = req.request_id
    if isinstance(req, AdminInfo):
        return AdminInfoReply(
            rid, own.shard_id, own.ring.config if own.ring else None,
            own.fence.config if own.fence else None, own.incoming_info(), own.outgoing_info(),
            own.version_offset, own.undropped, sm.applied_index, sm.key_count, tasks.status())
    if isinstance(req, AdminDrop):
        if own.epoch < req.epoch or own.ring is None:
            return AdminAppliedReply(rid, Applied(
                False, f"ring is at epoch {own.epoch}, not {req.epoch}"))
        step = tasks.drop_step(sm, req.epoch)
        return AdminListingReply(rid, req.epoch, step) if isinstance(step, int) else step
    if not isinstance(req, (AdminPush, AdminSessions)):
        return admin_command(req)
    old, new = req.old, req.new
    if own.epoch >= new.epoch:  # already flipped: only rolling forward remains
        if isinstance(req, AdminSessions):
            return AdminSessionsReply(rid, True, own.epoch, 0, b"")
        return AdminPushReply(rid, True, own.epoch, False, None)
    if own.ring is None or own.ring.config != old:
        raise AdminError(f"ring is at epoch {own.epoch}, not {old.epoch}")
    fenced = own.fence is not None and own.fence.config == new
    if isinstance(req, AdminSessions):
        if not fenced:
            raise AdminError("sessions are taken only once the source is fenced")
        version_next = sm.applied_index + own.version_offset + 1
        packed = msgpack.packb(sm.sessions.to_state(), use_bin_type=True)
        return AdminSessionsReply(rid, False, own.epoch, version_next, packed)
    return _push(sm, tasks, req, fenced)


def _push(sm: KVStateMachine, tasks: LeaderTasks, req: AdminPush,
          fenced: bool) -> AdminPushReply:
    own = sm.ownership
    if req.phase == Phase.DONE:
        raise AdminError("phase must be copy, catch-up or the final delta")
    if req.phase == Phase.DELTA and not fenced:
        raise AdminError("the final delta needs the fence applied first")
    if own.outgoing is None or own.outgoing.new != req.new:
        raise AdminError("a stream needs the migration begun here first (track)")
    if own.shard_id is None or req.dst == own.shard_id:
        raise AdminError("dst must be another shard")
    if not req.targets or len(req.targets) > ADMIN_TARGETS_MAX or any(
            not t.node_id or not t.peer_addr for t in req.targets):
        raise AdminError(f"targets: 1 to {ADMIN_TARGETS_MAX} nodes with their peer address")
    spec = PushSpec(req.old, req.new, own.shard_id, req.dst, req.phase, req.v0, req.after,
                    tuple((t.node_id, t.peer_addr) for t in req.targets),
                    min(req.batch_keys, MIGRATE_BATCH_KEYS_MAX) or 1,
                    min(req.batch_bytes, MIGRATE_BATCH_BYTES_MAX) or 1, req.rate_bytes_s)
    push, running = tasks.start_push(spec, sm)
    return AdminPushReply(req.request_id, False, own.epoch, running, push)


def admin_command(req: AdminRequest) -> Command:
    """The replicated command for a command request; ``AdminError`` for any other."""
    if isinstance(req, AdminBegin):
        return MigrateBegin(req.old, req.new)
    if isinstance(req, AdminFence):
        return Fence(req.old, req.new)
    if isinstance(req, AdminTrack):
        return MigrateOut(req.old, req.new)
    if isinstance(req, AdminRingSet):
        return RingSet(req.ring)
    if isinstance(req, AdminMergeSessions):
        return MigrateSessions(req.new_epoch, req.src, req.version_next, req.sessions)
    raise AdminError(f"{type(req).__name__} is not a replicated admin command")
