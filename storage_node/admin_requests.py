"""Admin requests at a storage node: the role check, then ring-change ops
(``admin.py``), membership ops and a snapshot for ``zkv admin snapshot save``.

A mixin of ``RequestCore`` (``node_requests.py``). Rules: under Curve an admin op needs
the admin role the broker stamped on it (``ADMIN_STAMP``; the few ops a client key may
run are ``CLIENT_ADMIN_OPS``); an op for another shard is ``WRONG_SHARD``; only the
leader acts (others answer ``NOT_LEADER``/``NO_LEADER``). Membership ops are proposed
and answered at once (the caller watches ``AdminMembers``); ring-change commands are
answered when applied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    ADMIN_REPLY_CLASSES,
    MEMBERSHIP_REQUEST_CLASSES,
    AdminInfo,
    AdminMembers,
    AdminMembersReply,
    AdminRequest,
    AdminSnapshotReply,
    AdminSnapshotSave,
    AdminTransferLeader,
    ErrorReply,
    Role,
)
from zkv.storage_node import membership as mship
from zkv.storage_node.admin import AdminError, admin_request
from zkv.storage_node.commands import Command

#: A secure broker forwards a request under its client ident prefixed with the role of
#: the key that sent it (``broker.server_security.stamp``); only this prefix may run admin ops.
ADMIN_STAMP = b"A"
#: Admin requests the client role may make: a read-only view without data.
CLIENT_ADMIN_OPS = (AdminInfo, AdminMembers)

if TYPE_CHECKING:
    from zkv.protocol.ring import Ring
    from zkv.storage_node.node_requests import NodeCoreConfig, Pending
    from zkv.storage_node.push import LeaderTasks
    from zkv.storage_node.replica import Replica
    from zkv.storage_node.state_machine import KVStateMachine


class AdminRequests:
    """Admin methods of ``RequestCore`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: NodeCoreConfig
        replica: Replica
        state: KVStateMachine
        initial_ring: Ring
        tasks: LeaderTasks
        secure: bool
        notes: list[str]

        pending_type: Callable[..., Pending]

        def _reply(self, origin: object, ident: bytes, reply: object) -> None: ...
        def not_leader(self, request_id: int) -> ErrorReply: ...
        def _propose(self, cmd: Command, pending: Pending, now: float) -> int: ...

    def _on_admin(self, origin: object, ident: bytes, req: AdminRequest, now: float) -> None:
        if self.secure and ident[:1] != ADMIN_STAMP and not isinstance(req, CLIENT_ADMIN_OPS):
            self._reply(origin, ident, ErrorReply(
                req.request_id, ErrorCode.PERMISSION_DENIED,
                f"{type(req).__name__} needs an admin key; this request came with a client key"))
            return
        if req.shard_id != self.config.shard_id:
            self._reply(origin, ident, ErrorReply(req.request_id, ErrorCode.WRONG_SHARD,
                                                  f"this node serves shard {self.config.shard_id}"))
            return
        if self.replica.role is not Role.LEADER:
            self._reply(origin, ident, self.not_leader(req.request_id))
            return
        if isinstance(req, MEMBERSHIP_REQUEST_CLASSES):
            self._reply(origin, ident, self._membership_admin(req, now))
            return
        if isinstance(req, AdminSnapshotSave):
            self._reply(origin, ident, self._snapshot_for_backup(req.request_id))
            return
        try:
            answer = admin_request(self.state, self.tasks, req)
        except AdminError as exc:
            self._reply(origin, ident, ErrorReply(req.request_id, exc.code, str(exc)))
            return
        if isinstance(answer, ADMIN_REPLY_CLASSES):
            self._reply(origin, ident, answer)
            return
        cmd = cast(Command, answer)
        self._propose(cmd, self.pending_type(origin, ident, req.request_id, command=cmd), now)

    def _membership_admin(self, req: AdminRequest, now: float) -> AdminMembersReply | ErrorReply:
        """Membership ops at the leader: proposed now, answered at once; the caller
        watches ``AdminMembers`` (or ``zkv status``) for the change to take effect."""
        replica, cfg = self.replica, self.config
        index, to = 0, ""
        try:
            if isinstance(req, AdminTransferLeader):
                if not replica.transfer_leadership(req.node_id, now):
                    raise mship.MembershipError(
                        f"no up-to-date voter {req.node_id!r} to hand over to")
                to = req.node_id
            elif not isinstance(req, AdminMembers):
                new = mship.change_for(req, replica.membership)
                if new is not None:  # every member's address, so any member reaches any
                    known = {**cfg.peers, cfg.node_id: cfg.advertise}
                    addrs = {m: a for m, a in known.items() if m in new.members}
                    new = dataclasses.replace(
                        new, addrs=tuple(sorted({**addrs, **dict(new.addrs)}.items())))
                    index = replica.propose_membership(new, now)
                    self.notes.append(f"proposed configuration {mship.describe(new)} at "
                                      f"index {index} ({type(req).__name__})")
        except mship.MembershipError as exc:
            code = (ErrorCode.UNAVAILABLE if isinstance(exc, mship.MembershipBusy)
                    else ErrorCode.BAD_REQUEST)
            return ErrorReply(req.request_id, code, str(exc))
        conf = replica.membership
        return AdminMembersReply(
            req.request_id, cfg.node_id, tuple(conf.voters), tuple(conf.learners),
            dict(conf.addrs), dict(conf.incarnations), dict(conf.replaces),
            replica.change_pending(), index, to,
        )  # fmt: skip

    def _snapshot_for_backup(self, request_id: int) -> AdminSnapshotReply | ErrorReply:
        """``zkv admin snapshot save``: the leader's whole state, which holds every write
        it acknowledged, once it has applied all it committed (a new leader first
        commits its no-op: before that its commit index may lag the old leader's)."""
        replica, state = self.replica, self.state
        if (replica.term_at(replica.commit_index) != replica.term
                or state.applied_index < replica.commit_index):
            return ErrorReply(request_id, ErrorCode.UNAVAILABLE, "leader not settled; retry")
        index = state.applied_index
        term = replica.term_at(index)
        if term is None:
            return ErrorReply(request_id, ErrorCode.UNAVAILABLE, "log moved; retry")
        ring = (state.ownership.ring or self.initial_ring).config
        return AdminSnapshotReply(request_id, self.config.node_id, index, term,
                                  state.key_count, ring, state.snapshot_bytes())
