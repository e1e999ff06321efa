"""Operator side of membership changes: ``zkv admin add-replica / remove-replica /
replace-replica / transfer-leader`` (storage_node/membership.py has the rules).

Each command sends one ``AdminRequest`` to the shard's leader through the broker (the
ops are idempotent, so the SDK's retries are safe), then polls the leader's ``members``
until the change has taken effect, asking again for a change that was lost (proposed by
a leader that lost leadership before committing it): a new replica is a learner until
it has caught up and the leader promotes it; a replacement ends when the old voter is
removed. With ``--data-dir`` (a ``zkv cluster up`` dir) the supervisor starts the new
node's process first (``cluster.json`` names it, with its peer port) and stops a
removed one last.
With ``--public-key FILE`` (the new node's public certificate, e.g. its ``<id>.key``) the
change carries the node's Curve key: once committed, the shard's members and the brokers
trust that key as that node, so it need not be copied into every ``keys/public/nodes``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zkv.client.sdk import KVClient
from zkv.ops import cluster
from zkv.protocol.errors import Timeout, Unavailable
from zkv.protocol.messages import (
    AdminAddReplica,
    AdminMembers,
    AdminMembersReply,
    AdminRemoveReplica,
    AdminReplaceReplica,
    AdminRequest,
    AdminTransferLeader,
)
from zkv.protocol.security import load_public

POLL_S = 0.2


def add_arguments(asub: Any, common: argparse.ArgumentParser) -> None:
    a = asub.add_parser("add-replica", parents=[common],
                        help="add a replica to a shard (a learner, promoted once caught up)")
    a.add_argument("shard_id", type=int)
    _new_node_args(a)
    a = asub.add_parser("remove-replica", parents=[common], help="remove a shard's replica")
    a.add_argument("shard_id", type=int)
    a.add_argument("old_id", metavar="NODE_ID")
    a.add_argument("--data-dir", help="the `zkv cluster up` dir: its supervisor stops the node")
    a = asub.add_parser("replace-replica", parents=[common],
                        help="add NEW as a learner, promote it once caught up, remove OLD")
    a.add_argument("shard_id", type=int)
    a.add_argument("old_id", metavar="OLD_ID")
    _new_node_args(a)
    a = asub.add_parser("transfer-leader", parents=[common],
                        help="hand a shard's leadership to an up-to-date voter")
    a.add_argument("shard_id", type=int)
    a.add_argument("--to", default="", help="node id (default: the most up-to-date voter)")
    for name in ("add-replica", "remove-replica", "replace-replica", "transfer-leader"):
        asub.choices[name].add_argument("--wait", type=float, default=300.0,
                                        help="seconds to wait for the change to take effect")


def _new_node_args(a: argparse.ArgumentParser) -> None:
    a.add_argument("--node-id", required=True)
    a.add_argument("--peer-addr", default="", help="the new node's peer address "
                   "(tcp://host:port); with --data-dir, chosen for you if omitted")
    a.add_argument("--data-dir", help="the `zkv cluster up` dir: its supervisor starts the "
                   "new node")
    a.add_argument("--public-key", type=Path, metavar="FILE",
                   help="the new node's public certificate (pyzmq format, e.g. its <id>.key): "
                   "trusted as that node once the change commits, without publishing it")


def public_key_text(path: Path | None) -> str:
    """The z85 public key of a pyzmq certificate file ("" without one)."""
    return "" if path is None else load_public(path).decode()


def run(kv: KVClient, args: argparse.Namespace, say: Callable[[str], None]) -> int:
    cmd, shard = args.admin_command, args.shard_id
    if cmd == "transfer-leader":
        before = _call(kv, AdminTransferLeader(b"", 0, shard, args.to)).node
        leader = _wait(kv, shard, args.wait, lambda m: m.node != before).node
        say(f"shard {shard}: leadership moved from {before} to {leader}")
        return 0
    if cmd == "remove-replica":
        remove = AdminRemoveReplica(b"", 0, shard, args.old_id)
        _again(kv, remove, args.wait)
        _wait(kv, shard, args.wait, lambda m: args.old_id not in _members(m), remove)
        say(f"shard {shard}: {args.old_id} removed")
        if args.data_dir:
            cluster.spec_remove_replica(Path(args.data_dir), args.old_id)
        return 0
    key = public_key_text(args.public_key)  # a bad file fails before anything changes
    addr = args.peer_addr
    if args.data_dir:
        addr = cluster.spec_add_replica(Path(args.data_dir), shard, args.node_id, addr)
        say(f"{args.node_id} added to {args.data_dir} at {addr}; the supervisor starts it")
    if not addr:
        raise ValueError("--peer-addr is needed (or --data-dir)")
    new = args.node_id
    if cmd == "add-replica":
        add = AdminAddReplica(b"", 0, shard, new, addr, key)
        _again(kv, add, args.wait)
        say(f"shard {shard}: {new} joins as a learner; waiting for it to catch up")
        _wait(kv, shard, args.wait, lambda m: new in m.voters, add, lambda m: new in _members(m))
        say(f"shard {shard}: {new} is a voter")
        return 0
    old = args.old_id
    replace = AdminReplaceReplica(b"", 0, shard, old, new, addr, key)
    _again(kv, replace, args.wait)
    say(f"shard {shard}: {new} joins as a learner replacing {old}; waiting for it to catch up")
    _wait(kv, shard, args.wait, lambda m: new in m.voters and old not in _members(m), replace,
          lambda m: new in _members(m) and m.replaces.get(new) == old)
    say(f"shard {shard}: {new} is a voter and {old} is removed")
    if args.data_dir:
        cluster.spec_remove_replica(Path(args.data_dir), old)
    return 0


def _call(kv: KVClient, request: AdminRequest,
          timeout: float | None = None) -> AdminMembersReply:
    reply = kv.admin(request, timeout=timeout)
    if not isinstance(reply, AdminMembersReply):
        raise ValueError(f"unexpected answer {type(reply).__name__} to {type(request).__name__}")
    return reply


def members(kv: KVClient, shard: int) -> AdminMembersReply:
    """The configuration in force at ``shard``'s leader."""
    return _call(kv, AdminMembers(b"", 0, shard))


def _again(kv: KVClient, change: AdminRequest, timeout: float | None = None) -> str:
    """Ask for ``change`` (again: ops are idempotent). A refusal for now (UNAVAILABLE:
    ``MembershipBusy``, no leader) that outlasts the call waits for the next poll, which
    asks again, and is returned (the operator is told why if it lasts); a refusal for
    good (BAD_REQUEST) is raised."""
    try:
        _call(kv, change, timeout)
    except (Unavailable, Timeout) as exc:
        return str(exc)  # "retry shortly" for longer than a call: the next poll asks
    return ""


def _members(m: AdminMembersReply) -> list[str]:
    return [*m.voters, *m.learners]


def _wait(kv: KVClient, shard: int, timeout_s: float,
          done: Callable[[AdminMembersReply], bool], change: AdminRequest | None = None,
          under_way: Callable[[AdminMembersReply], bool] = lambda m: False,
          ) -> AdminMembersReply:
    """Poll the leader's configuration until ``done``. A change neither made, pending
    nor ``under_way`` was lost (proposed by a leader that lost leadership before
    committing it, and missing from the next leader's log): ``change`` is asked again."""
    deadline = time.monotonic() + timeout_s
    refusal = ""
    while True:
        m = _call(kv, AdminMembers(b"", 0, shard))
        if done(m) and not m.pending:
            return m
        if change is not None and not m.pending and not done(m) and not under_way(m):
            # within what is left of the wait (at least a second: one round trip)
            refusal = _again(kv, change, max(1.0, deadline - time.monotonic())) or refusal
        if time.monotonic() >= deadline:
            raise ValueError(f"shard {shard}: the change did not take effect in "
                             f"{timeout_s:g}s (voters {list(m.voters)}, learners "
                             f"{list(m.learners)})"
                             + (f"; the leader's last answer: {refusal}" if refusal else ""))
        time.sleep(POLL_S)
