"""State-machine commands: what a log entry's ``data`` means (docs/internals.md).

msgpack arrays, first element the op::

    [0]                                                                   NOOP
    [1, client_id, request_id, lowest_pending, ts_ms, key, value]         PUT
    [2, client_id, request_id, lowest_pending, ts_ms, key(, expected_version)]  DELETE
    [3, client_id, request_id, lowest_pending, ts_ms, key, expected_version, value]  CAS
    [4, ring]                                     RING_SET: adopt ``ring`` if its epoch is newer
    [5, old_ring, new_ring]                       FENCE: refuse keys leaving this shard
    [6, old_ring, new_ring]                       MIGRATE_BEGIN: expect keys from old owners
    [7, new_epoch, src, phase, v0, done, cursor, items(, after)]  MIGRATE_IN: a batch of moved keys
    [8, new_epoch, src, version_next, sessions]   MIGRATE_SESSIONS: the source's sessions
    [9, epoch(, keys, last)]                      DROP_UNOWNED: forget keys not owned at epoch
    [10, old_ring, new_ring]                      MIGRATE_OUT: note every write to a leaving key
    [11, voters, learners, addrs, replaces, incs(, keys)] CONFIG: read by the replica core; a no-op here
    [100, client_id, request_id, lowest_pending, ts_ms, kind, keys, values]  MULTI_WRITE
                                                  (``multikey_commands.py``: a batch's part)
    [120..122, ...]                               TTL: PUT_TTL, EXPIRE_SET, EXPIRE_SWEEP
                                                  (``ttl_commands.py``)

``after`` (MIGRATE_IN) is the stream cursor the batch continues from: the batch applies
only where the target's progress stands exactly there (``None``: no such check, the
form written before streams were direct). DROP_UNOWNED with ``keys`` forgets those of
them not owned, and with ``last`` marks the drop complete; without, it scans every key.

A ring travels as ``RingConfig.to_wire()`` (``[epoch, [shard, ...], vnodes]``, checked
by ``RingConfig.from_wire``); ``phase`` is a ``protocol.admin.Phase``; ``items`` and ``sessions`` are
msgpack blobs decoded by the state machine (see ``storage_node/ownership.py``).

``ts_ms`` is stamped by the leader when it proposes, so every replica judges session
expiry by the same clock. Entries come from the log, which peers fill: ``decode_command``
of any bytes returns a command or raises ``RemoteProtocolError``, nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import msgpack

from zkv.protocol.admin import Phase
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import CasRequest, DeleteRequest, PutRequest, WriteRequest
from zkv.protocol.record import record
from zkv.protocol.ring import RingConfig
from zkv.storage_node.command_fields import blob as _bytes
from zkv.storage_node.command_fields import head as _head
from zkv.storage_node.command_fields import uint as _uint
from zkv.storage_node.multikey_commands import (
    MULTI_WRITE_OP,
    MultiWrite,
    decode_multi_write,
    encode_multi_write,
)
from zkv.storage_node.ttl_commands import (
    TTL_DECODERS,
    ExpireCommand,
    PutTtlCommand,
    SweepCommand,
    TtlCommand,
    encode_ttl,
)

#: A command holds one key and one value (<= 1 MiB by default); 64 MiB leaves room for
#: raised limits and for the future ring-change command. msgpack's ``unpackb`` already
#: bounds every length it reads by the size of the buffer, so garbage cannot make it
#: allocate more than the command's own size.
COMMAND_BYTES_MAX = 64 * 1024 * 1024


class Op(enum.IntEnum):
    """Wire values: never renumber."""

    NOOP = 0
    PUT = 1
    DELETE = 2
    CAS = 3
    RING = 4  # RING_SET
    FENCE = 5
    MIGRATE_BEGIN = 6
    MIGRATE_IN = 7
    MIGRATE_SESSIONS = 8
    DROP_UNOWNED = 9
    MIGRATE_OUT = 10
    CONFIG = 11  # the shard's configuration (storage_node/membership.py): for the replica


@record
class Noop:
    """A new leader's first entry: commits something of its term, changes nothing."""


@record
class PutCommand:
    client_id: bytes
    request_id: int
    lowest_pending: int
    ts_ms: int
    key: bytes
    value: bytes


@record
class DeleteCommand:
    """Remove ``key``; with ``expected_version`` > 0 only if that is its version (0:
    unconditional, written without the field, as before conditional deletes)."""

    client_id: bytes
    request_id: int
    lowest_pending: int
    ts_ms: int
    key: bytes
    expected_version: int = 0


@record
class CasCommand:
    """Write ``value`` only if the key's version is ``expected_version`` (0: absent)."""

    client_id: bytes
    request_id: int
    lowest_pending: int
    ts_ms: int
    key: bytes
    expected_version: int
    value: bytes


@record
class RingSet:
    ring: RingConfig


@record
class Fence:
    old: RingConfig
    new: RingConfig


@record
class MigrateBegin:
    old: RingConfig
    new: RingConfig


@record
class MigrateOut:
    """Source side of a ring change: from here on, record the log index of every
    write to a key that leaves this shard, so the fenced delta is only those keys."""

    old: RingConfig
    new: RingConfig


@record
class MigrateIn:
    """Phase 1: ``items`` = ``[[key, value, version], ...]``; phases 2-3 add bare
    ``[key]`` for keys deleted since; ``done`` closes the phase for ``src``."""

    new_epoch: int
    src: int
    phase: Phase
    v0: int
    done: bool
    cursor: bytes
    items: bytes
    after: bytes | None = None


@record
class MigrateSessions:
    new_epoch: int
    src: int
    version_next: int
    sessions: bytes


@record
class DropUnowned:
    """``keys=None``: scan every key (small shards, and the older log form); else drop
    just these (the leader lists them off the loop's hot path, a batch at a time)."""

    epoch: int
    keys: tuple[bytes, ...] | None = None
    last: bool = True


RingCommand = (
    RingSet | Fence | MigrateBegin | MigrateOut | MigrateIn | MigrateSessions | DropUnowned
)
Command = (Noop | PutCommand | DeleteCommand | CasCommand | RingCommand | MultiWrite
           | TtlCommand)
WriteCommand = PutCommand | DeleteCommand | CasCommand
#: client writes answered through the session table (``KVStateMachine._apply_write``)
SessionCommand = WriteCommand | PutTtlCommand | ExpireCommand

NOOP_DATA: bytes = msgpack.packb([Op.NOOP.value])


_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_PUT, _DELETE, _CAS = int(Op.PUT), int(Op.DELETE), int(Op.CAS)  # no enum lookups per write


def encode_command(cmd: Command) -> bytes:
    """The log-entry bytes for ``cmd`` (on every write's path: kept lean)."""
    t = type(cmd)
    if t is PutCommand:
        c: Any = cmd
        return _pack((_PUT, c.client_id, c.request_id, c.lowest_pending, c.ts_ms, c.key, c.value))  # type: ignore[no-any-return]
    if t is DeleteCommand:
        c = cmd
        if c.expected_version:
            return _pack((_DELETE, c.client_id, c.request_id, c.lowest_pending, c.ts_ms,  # type: ignore[no-any-return]
                          c.key, c.expected_version))
        return _pack((_DELETE, c.client_id, c.request_id, c.lowest_pending, c.ts_ms, c.key))  # type: ignore[no-any-return]
    if t is CasCommand:
        c = cmd
        return _pack((  # type: ignore[no-any-return]
            _CAS, c.client_id, c.request_id, c.lowest_pending, c.ts_ms, c.key,
            c.expected_version, c.value,
        ))  # fmt: skip
    if t is Noop:
        return NOOP_DATA
    if t is MultiWrite:
        return encode_multi_write(cmd)  # type: ignore[arg-type]
    if t is PutTtlCommand or t is ExpireCommand or t is SweepCommand:
        return _pack(encode_ttl(cmd))  # type: ignore[arg-type,no-any-return]
    return _encode_ring_command(cmd)


def _encode_ring_command(cmd: Command) -> bytes:
    t = type(cmd)
    c: Any = cmd
    if t is RingSet:
        return _pack((int(Op.RING), c.ring.to_wire()))  # type: ignore[no-any-return]
    if t is Fence or t is MigrateBegin or t is MigrateOut:
        op = Op.FENCE if t is Fence else Op.MIGRATE_BEGIN if t is MigrateBegin else Op.MIGRATE_OUT
        return _pack((int(op), c.old.to_wire(), c.new.to_wire()))  # type: ignore[no-any-return]
    if t is MigrateIn:
        fields = (int(Op.MIGRATE_IN), c.new_epoch, c.src, c.phase, c.v0, c.done, c.cursor,
                  c.items)
        return _pack(fields if c.after is None else (*fields, c.after))  # type: ignore[no-any-return]
    if t is MigrateSessions:
        return _pack((int(Op.MIGRATE_SESSIONS), c.new_epoch, c.src, c.version_next,  # type: ignore[no-any-return]
                      c.sessions))
    if t is DropUnowned:
        if c.keys is None:
            return _pack((int(Op.DROP_UNOWNED), c.epoch))  # type: ignore[no-any-return]
        return _pack((int(Op.DROP_UNOWNED), c.epoch, list(c.keys), c.last))  # type: ignore[no-any-return]
    raise TypeError(f"not a state-machine command: {cmd!r}")


def command_from_request(req: WriteRequest, ts_ms: int) -> WriteCommand:
    """The command a leader proposes for a client write, stamped with its clock."""
    if isinstance(req, PutRequest):
        return PutCommand(
            req.client_id, req.request_id, req.lowest_pending, ts_ms, req.key, req.value
        )
    if isinstance(req, DeleteRequest):
        return DeleteCommand(req.client_id, req.request_id, req.lowest_pending, ts_ms, req.key,
                             req.expected_version)
    if isinstance(req, CasRequest):
        return CasCommand(
            req.client_id, req.request_id, req.lowest_pending, ts_ms, req.key,
            req.expected_version, req.value,
        )  # fmt: skip
    raise TypeError(f"not a write request: {req!r}")


# ------------------------------------------------------------------------ decoding


def _head_ok(v: list[Any]) -> bool:
    """The common fields are well typed (the apply path's fast check; ``_head`` then
    only runs to say what is wrong)."""
    return (
        type(v[1]) is bytes and type(v[2]) is int and type(v[3]) is int
        and type(v[4]) is int and type(v[5]) is bytes
        and v[2] >= 0 and v[3] >= 0 and v[4] >= 0
    )  # fmt: skip


def _decode_noop(v: list[Any]) -> Command:
    return Noop()


def _decode_put(v: list[Any]) -> Command:
    if _head_ok(v) and type(v[6]) is bytes:
        return PutCommand(v[1], v[2], v[3], v[4], v[5], v[6])
    return PutCommand(*_head(v), _bytes(v[6], "value"))


def _decode_delete(v: list[Any]) -> Command:
    if len(v) == 7:
        return DeleteCommand(*_head(v), _uint(v[6], "expected_version"))
    if _head_ok(v):
        return DeleteCommand(v[1], v[2], v[3], v[4], v[5])
    return DeleteCommand(*_head(v))


def _decode_cas(v: list[Any]) -> Command:
    if _head_ok(v) and type(v[6]) is int and v[6] >= 0 and type(v[7]) is bytes:
        return CasCommand(v[1], v[2], v[3], v[4], v[5], v[6], v[7])
    return CasCommand(*_head(v), _uint(v[6], "expected_version"), _bytes(v[7], "value"))


_ring = RingConfig.from_wire


def _phase(v: Any) -> Phase:
    if type(v) is not int or v not in _PHASES:
        raise RemoteProtocolError(f"command field phase must be a phase, got {v!r}")
    return Phase(v)


_PHASES = frozenset(int(p) for p in Phase)


def _bool(v: Any, name: str) -> bool:
    if type(v) is not bool:
        raise RemoteProtocolError(f"command field {name} must be a bool, got {v!r}")
    return v


def _decode_ring_set(v: list[Any]) -> Command:
    return RingSet(_ring(v[1]))


def _decode_fence(v: list[Any]) -> Command:
    return Fence(_ring(v[1]), _ring(v[2]))


def _decode_begin(v: list[Any]) -> Command:
    return MigrateBegin(_ring(v[1]), _ring(v[2]))


def _decode_out(v: list[Any]) -> Command:
    return MigrateOut(_ring(v[1]), _ring(v[2]))


def _decode_migrate_in(v: list[Any]) -> Command:
    return MigrateIn(
        _uint(v[1], "new_epoch"), _uint(v[2], "src"), _phase(v[3]), _uint(v[4], "v0"),
        _bool(v[5], "done"), _bytes(v[6], "cursor"), _bytes(v[7], "items"),
        _bytes(v[8], "after") if len(v) > 8 else None,
    )  # fmt: skip


def _decode_sessions(v: list[Any]) -> Command:
    return MigrateSessions(
        _uint(v[1], "new_epoch"), _uint(v[2], "src"), _uint(v[3], "version_next"),
        _bytes(v[4], "sessions"),
    )  # fmt: skip


def _decode_drop(v: list[Any]) -> Command:
    if len(v) == 2:
        return DropUnowned(_uint(v[1], "epoch"))
    keys = v[2]
    if type(keys) is not list or any(type(k) is not bytes for k in keys):
        raise RemoteProtocolError("drop keys must be a list of bytes")
    return DropUnowned(_uint(v[1], "epoch"), tuple(keys), _bool(v[3], "last"))


#: op -> (array lengths accepted, decoder).
_DECODERS: dict[int, tuple[tuple[int, ...], Callable[[list[Any]], Command]]] = {
    Op.NOOP: ((1,), _decode_noop),
    Op.PUT: ((7,), _decode_put),
    Op.DELETE: ((6, 7), _decode_delete),
    Op.CAS: ((8,), _decode_cas),
    Op.RING: ((2,), _decode_ring_set),
    Op.FENCE: ((3,), _decode_fence),
    Op.MIGRATE_BEGIN: ((3,), _decode_begin),
    Op.MIGRATE_IN: ((8, 9), _decode_migrate_in),
    Op.MIGRATE_SESSIONS: ((5,), _decode_sessions),
    Op.DROP_UNOWNED: ((2, 4), _decode_drop),
    Op.MIGRATE_OUT: ((3,), _decode_out),
    Op.CONFIG: ((6, 7), lambda v: Noop()),  # 7: with member keys
    MULTI_WRITE_OP: ((8,), decode_multi_write),  # multikey_commands.py
    **TTL_DECODERS,
}


def decode_command(data: bytes) -> Command:
    """Parse a log entry's data; any defect raises ``RemoteProtocolError``."""
    if type(data) is not bytes:
        raise RemoteProtocolError("command data is not bytes")
    if len(data) > COMMAND_BYTES_MAX:
        raise RemoteProtocolError(f"command of {len(data)} bytes is over {COMMAND_BYTES_MAX}")
    try:
        v = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises many types on garbage; all mean "bad input"
        raise RemoteProtocolError(f"undecodable command: {exc.__class__.__name__}") from exc
    if type(v) is not list or not v or type(v[0]) is not int:
        raise RemoteProtocolError("command is not an array [op, ...]")
    spec = _DECODERS.get(v[0])
    if spec is None:
        raise RemoteProtocolError(f"unknown or unsupported command op {v[0]}")
    lengths, decode = spec
    if len(v) not in lengths:
        raise RemoteProtocolError(f"command op {v[0]} needs {' or '.join(map(str, lengths))} "
                                  f"fields, got {len(v)}")
    return decode(v)
