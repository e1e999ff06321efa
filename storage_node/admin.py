"""The node's side of ring-change administration: ``AdminRequest`` ops to answers or to
replicated commands. Pure (the shell owns sockets and proposes what this returns).

Reads, answered by the leader from its applied state:
- ``info``: ring, fence, incoming migration progress, applied index, key count.
- ``scan {old, new, dst, phase, after, v0, limit, bytes_max}``: the next batch of keys
  that move from this shard to ``dst`` when ring ``old`` becomes ``new``, in key order
  after the cursor ``after`` (b"" = from the start, else b"\\x01" + last key). Phase 1
  sends ``[key, value, version]``; phase 2 (only once the FENCE is applied here) sends
  the value only for versions above ``v0`` and ``[key]`` otherwise. The moving keys are
  listed and sorted once per (epoch, dst, phase) and cached: ``applied`` in the result is
  the applied index that list was taken at (the target keeps the minimum as ``v0``).
- ``sessions {new}``: the session table and the next version, once fenced.

Commands (``begin``, ``fence``, ``migrate``, ``merge_sessions``, ``ring_set``, ``drop``)
become ``storage_node.commands`` ring commands; the shell proposes them and answers
when they apply.
"""

from __future__ import annotations

import bisect
from typing import Any

import msgpack

from protocol.errors import ErrorCode
from protocol.ring import Ring, RingConfig, position
from storage_node.commands import (
    RING_TOKENS_MAX,
    Command,
    DropUnowned,
    Fence,
    MigrateBegin,
    MigrateIn,
    MigrateSessions,
    RingSet,
)
from storage_node.ownership import PHASE_DELTA
from storage_node.state_machine import KVStateMachine

SCAN_LIMIT_MAX = 10_000
SCAN_BYTES_MAX = 8 * 1024 * 1024
CURSOR_START = b""


class AdminError(Exception):
    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


def cursor_of(key: bytes) -> bytes:
    return b"\x01" + key


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


class ScanCache:
    """Sorted moving keys per (new epoch, dst, phase): ``(applied index, keys)``."""

    ENTRIES_MAX = 16

    def __init__(self) -> None:
        self._lists: dict[tuple[int, int, int], tuple[int, list[bytes]]] = {}

    def clear(self) -> None:
        self._lists.clear()

    def get(self, sm: KVStateMachine, old: Ring, new: Ring, dst: int,
            phase: int) -> tuple[int, list[bytes]]:
        key = (new.config.epoch, dst, phase)
        found = self._lists.get(key)
        if found is None:
            me = sm.ownership.shard_id
            keys = []
            for k in sm.data:  # one pass: position once, two bisects
                p = position(k)
                if old.owner_of_position(p) == me and new.owner_of_position(p) == dst:
                    keys.append(k)
            keys.sort()
            if len(self._lists) >= self.ENTRIES_MAX:
                self._lists.clear()
            found = self._lists[key] = (sm.applied_index, keys)
        return found


def admin_read(sm: KVStateMachine, scans: ScanCache, op: str,
               args: dict[str, Any]) -> tuple[dict[str, Any], bytes] | None:
    """The answer to a read op, or None if ``op`` is a command."""
    own = sm.ownership
    if op == "info":
        return {"ok": True, **own.info(), "applied": sm.applied_index,
                "keys": sm.key_count}, b""
    if op not in ("scan", "sessions"):
        return None
    old, new = _ring(args, "old"), _ring(args, "new")
    if own.epoch >= new.epoch:
        scans.clear()
        return {"ok": True, "flipped": True, "epoch": own.epoch}, b""
    if own.ring is None or own.ring.config != old:
        raise AdminError(f"ring is at epoch {own.epoch}, not {old.epoch}")
    fenced = own.fence is not None and own.fence.config == new
    if op == "sessions":
        if not fenced:
            raise AdminError("sessions are taken only once the source is fenced")
        version_next = sm.applied_index + own.version_offset + 1
        payload = msgpack.packb(sm.sessions.to_state(), use_bin_type=True)
        return {"ok": True, "version_next": version_next}, payload
    dst, phase = _int(args, "dst"), _int(args, "phase")
    if phase == PHASE_DELTA and not fenced:
        raise AdminError("phase 2 needs the fence applied first")
    after = _bytes(args, "after")
    v0 = _int(args, "v0")
    limit = min(_int(args, "limit"), SCAN_LIMIT_MAX) or 1
    bytes_max = min(_int(args, "bytes_max"), SCAN_BYTES_MAX) or 1
    applied, keys = scans.get(sm, own.ring, Ring(new), dst, phase)
    start = 0 if after == CURSOR_START else bisect.bisect_right(keys, after[1:])
    items: list[list[Any]] = []
    size = 0
    i = start
    data = sm.data
    while i < len(keys) and len(items) < limit and size < bytes_max:
        k = keys[i]
        i += 1
        found = data.get(k)
        if found is None:
            continue  # deleted since the list was taken
        if phase == PHASE_DELTA and found[1] <= v0:
            items.append([k])
            size += len(k) + 4
        else:
            items.append([k, found[0], found[1]])
            size += len(k) + len(found[0]) + 12
    done = i >= len(keys)
    cursor = cursor_of(keys[i - 1]) if i > start else after
    payload = msgpack.packb(items, use_bin_type=True)
    return {"ok": True, "applied": applied, "cursor": cursor, "done": done,
            "count": len(items), "total": len(keys)}, payload


def admin_command(op: str, args: dict[str, Any], payload: bytes) -> Command:
    """The replicated command for a command op; ``AdminError`` if malformed."""
    if op == "begin":
        return MigrateBegin(_ring(args, "old"), _ring(args, "new"))
    if op == "fence":
        return Fence(_ring(args, "old"), _ring(args, "new"))
    if op == "ring_set":
        return RingSet(_ring(args, "ring"))
    if op == "drop":
        return DropUnowned(_int(args, "epoch"))
    if op == "migrate":
        done = args.get("done")
        if type(done) is not bool:
            raise AdminError("done must be a bool")
        return MigrateIn(_int(args, "new_epoch"), _int(args, "src"), _int(args, "phase"),
                         _int(args, "v0"), done, _bytes(args, "cursor"), payload)
    if op == "merge_sessions":
        return MigrateSessions(_int(args, "new_epoch"), _int(args, "src"),
                               _int(args, "version_next"), payload)
    raise AdminError(f"unknown admin op {op!r}")
