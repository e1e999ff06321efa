"""The node's side of ring-change administration: an ``AdminRequest`` op becomes an
answer now or a replicated command to propose. Pure (the shell owns sockets and
proposes what this returns; ``LeaderTasks`` is the leader's soft state).

Answered by the leader at once:
- ``info``: ring, fence, incoming migration progress, applied index, key count, and
  the leader's running streams (``pushes``).
- ``push {old, new, dst, phase, v0, after, targets, limit, bytes_max}``: start
  streaming the keys that move from this shard to ``dst`` when ring ``old`` becomes
  ``new``, straight to ``dst``'s leader (``storage_node/push.py``), from cursor
  ``after``. ``targets`` = ``[[node id, peer address], ...]`` of ``dst``'s nodes;
  ``rate`` (optional) bounds the stream in bytes per second.
  Phase 2 only once the FENCE is applied here. Progress shows in ``info``.
- ``sessions {new}``: the session table and the next version, once fenced.
- ``drop {epoch}`` while the unowned keys are still being listed: the listing progress.

Proposed as commands (answered when applied): ``begin``, ``track``, ``fence``,
``merge_sessions``,
``ring_set``, and ``drop`` once listed (a batch of keys per request).
"""

from __future__ import annotations

from typing import Any

import msgpack

from zkv.protocol.errors import ErrorCode
from zkv.protocol.ring import RingConfig
from zkv.storage_node.commands import (
    RING_TOKENS_MAX,
    Command,
    Fence,
    MigrateBegin,
    MigrateOut,
    MigrateSessions,
    RingSet,
)
from zkv.storage_node.ownership import PHASE_COPY, PHASE_DELTA
from zkv.storage_node.push import LeaderTasks, PushSpec
from zkv.storage_node.state_machine import KVStateMachine

SCAN_LIMIT_MAX = 10_000
SCAN_BYTES_MAX = 8 * 1024 * 1024


class AdminError(Exception):
    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


def _ring(args: dict[str, Any], name: str) -> RingConfig:
    v = args.get(name)
    if (type(v) is not list or len(v) != 3 or type(v[0]) is not int or type(v[2]) is not int
            or type(v[1]) is not list or not v[1] or any(type(s) is not int or s < 0 for s in v[1])
            or v[0] < 0 or v[2] < 1 or len(v[1]) * v[2] > RING_TOKENS_MAX):
        raise AdminError(f"{name} must be a ring [epoch, [shards], vnodes]")
    return RingConfig(v[0], tuple(v[1]), v[2])


def _int(args: dict[str, Any], name: str) -> int:
    v = args.get(name)
    if type(v) is not int or v < 0:
        raise AdminError(f"{name} must be a non-negative int")
    return v


def _bytes(args: dict[str, Any], name: str) -> bytes:
    v = args.get(name)
    if type(v) is not bytes:
        raise AdminError(f"{name} must be bytes")
    return v


def _targets(args: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    v = args.get("targets")
    if (type(v) is not list or not v or len(v) > 64 or any(
            type(t) is not list or len(t) != 2 or type(t[0]) is not str
            or type(t[1]) is not str or not t[0] or not t[1] for t in v)):
        raise AdminError("targets must be [[node id, peer address], ...]")
    return tuple((t[0], t[1]) for t in v)


def admin_request(sm: KVStateMachine, tasks: LeaderTasks, op: str, args: dict[str, Any],
                  payload: bytes) -> tuple[dict[str, Any], bytes] | Command:
    """The answer to send now, or the command to propose; ``AdminError`` if malformed."""
    own = sm.ownership
    if op == "info":
        return {"ok": True, **own.info(), "applied": sm.applied_index,
                "keys": sm.key_count, "pushes": tasks.status()}, b""
    if op == "drop":
        step = tasks.drop_step(sm, _int(args, "epoch"))
        return (step, b"") if isinstance(step, dict) else step
    if op not in ("push", "sessions"):
        return admin_command(op, args, payload)
    old, new = _ring(args, "old"), _ring(args, "new")
    if own.epoch >= new.epoch:
        return {"ok": True, "flipped": True, "epoch": own.epoch}, b""
    if own.ring is None or own.ring.config != old:
        raise AdminError(f"ring is at epoch {own.epoch}, not {old.epoch}")
    fenced = own.fence is not None and own.fence.config == new
    if op == "sessions":
        if not fenced:
            raise AdminError("sessions are taken only once the source is fenced")
        version_next = sm.applied_index + own.version_offset + 1
        packed = msgpack.packb(sm.sessions.to_state(), use_bin_type=True)
        return {"ok": True, "version_next": version_next}, packed
    dst, phase = _int(args, "dst"), _int(args, "phase")
    if not PHASE_COPY <= phase <= PHASE_DELTA:
        raise AdminError("phase must be 1 (copy), 2 (catch-up) or 3 (final delta)")
    if phase == PHASE_DELTA and not fenced:
        raise AdminError("the final delta needs the fence applied first")
    if own.outgoing is None or own.outgoing.new != new:
        raise AdminError("a stream needs the migration begun here first (track)")
    if own.shard_id is None or dst == own.shard_id:
        raise AdminError("dst must be another shard")
    spec = PushSpec(old, new, own.shard_id, dst, phase, _int(args, "v0"), _bytes(args, "after"),
                    _targets(args), min(_int(args, "limit"), SCAN_LIMIT_MAX) or 1,
                    min(_int(args, "bytes_max"), SCAN_BYTES_MAX) or 1,
                    _int({"rate": args.get("rate", 0)}, "rate"))
    return tasks.start_push(spec, sm), b""


def admin_command(op: str, args: dict[str, Any], payload: bytes) -> Command:
    """The replicated command for a command op; ``AdminError`` if malformed."""
    if op == "begin":
        return MigrateBegin(_ring(args, "old"), _ring(args, "new"))
    if op == "fence":
        return Fence(_ring(args, "old"), _ring(args, "new"))
    if op == "track":
        return MigrateOut(_ring(args, "old"), _ring(args, "new"))
    if op == "ring_set":
        return RingSet(_ring(args, "ring"))
    if op == "merge_sessions":
        return MigrateSessions(_int(args, "new_epoch"), _int(args, "src"),
                               _int(args, "version_next"), payload)
    raise AdminError(f"unknown admin op {op!r}")
