"""State-machine commands: what a log entry's ``data`` means (docs/internals.md).

msgpack arrays, first element the op::

    [0]                                                                   NOOP
    [1, client_id, request_id, lowest_pending, ts_ms, key, value]         PUT
    [2, client_id, request_id, lowest_pending, ts_ms, key]                DELETE
    [3, client_id, request_id, lowest_pending, ts_ms, key, expected_version, value]  CAS
    [4, ...]                                                              RING (reserved)

``ts_ms`` is stamped by the leader when it proposes, so every replica judges session
expiry by the same clock. Entries come from the log, which peers fill: ``decode_command``
of any bytes returns a command or raises ``RemoteProtocolError``, nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.errors import RemoteProtocolError
from protocol.messages import CasRequest, DeleteRequest, PutRequest, WriteRequest

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
    RING = 4  # reserved: ring change (add/remove a shard), not implemented yet


@dataclass(frozen=True, slots=True)
class Noop:
    """A new leader's first entry: commits something of its term, changes nothing."""


@dataclass(frozen=True, slots=True)
class PutCommand:
    client_id: bytes
    request_id: int
    lowest_pending: int
    ts_ms: int
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class DeleteCommand:
    client_id: bytes
    request_id: int
    lowest_pending: int
    ts_ms: int
    key: bytes


@dataclass(frozen=True, slots=True)
class CasCommand:
    """Write ``value`` only if the key's version is ``expected_version`` (0: absent)."""

    client_id: bytes
    request_id: int
    lowest_pending: int
    ts_ms: int
    key: bytes
    expected_version: int
    value: bytes


Command = Noop | PutCommand | DeleteCommand | CasCommand
WriteCommand = PutCommand | DeleteCommand | CasCommand

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
        return _pack((_DELETE, c.client_id, c.request_id, c.lowest_pending, c.ts_ms, c.key))  # type: ignore[no-any-return]
    if t is CasCommand:
        c = cmd
        return _pack((  # type: ignore[no-any-return]
            _CAS, c.client_id, c.request_id, c.lowest_pending, c.ts_ms, c.key,
            c.expected_version, c.value,
        ))  # fmt: skip
    if t is Noop:
        return NOOP_DATA
    raise TypeError(f"not a state-machine command: {cmd!r}")


def command_from_request(req: WriteRequest, ts_ms: int) -> WriteCommand:
    """The command a leader proposes for a client write, stamped with its clock."""
    if isinstance(req, PutRequest):
        return PutCommand(
            req.client_id, req.request_id, req.lowest_pending, ts_ms, req.key, req.value
        )
    if isinstance(req, DeleteRequest):
        return DeleteCommand(req.client_id, req.request_id, req.lowest_pending, ts_ms, req.key)
    if isinstance(req, CasRequest):
        return CasCommand(
            req.client_id, req.request_id, req.lowest_pending, ts_ms, req.key,
            req.expected_version, req.value,
        )  # fmt: skip
    raise TypeError(f"not a write request: {req!r}")


# ------------------------------------------------------------------------ decoding


def _uint(v: Any, name: str) -> int:
    if type(v) is not int or v < 0:
        raise RemoteProtocolError(f"command field {name} must be a non-negative int, got {v!r}")
    return v


def _bytes(v: Any, name: str) -> bytes:
    if type(v) is not bytes:
        raise RemoteProtocolError(f"command field {name} must be bytes, got {type(v).__name__}")
    return v


def _head(v: list[Any]) -> tuple[bytes, int, int, int, bytes]:
    return (
        _bytes(v[1], "client_id"),
        _uint(v[2], "request_id"),
        _uint(v[3], "lowest_pending"),
        _uint(v[4], "ts_ms"),
        _bytes(v[5], "key"),
    )


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
    if _head_ok(v):
        return DeleteCommand(v[1], v[2], v[3], v[4], v[5])
    return DeleteCommand(*_head(v))


def _decode_cas(v: list[Any]) -> Command:
    if _head_ok(v) and type(v[6]) is int and v[6] >= 0 and type(v[7]) is bytes:
        return CasCommand(v[1], v[2], v[3], v[4], v[5], v[6], v[7])
    return CasCommand(*_head(v), _uint(v[6], "expected_version"), _bytes(v[7], "value"))


#: op -> (array length, decoder). Op.RING gets its entry when ring changes land.
_DECODERS: dict[int, tuple[int, Callable[[list[Any]], Command]]] = {
    Op.NOOP: (1, _decode_noop),
    Op.PUT: (7, _decode_put),
    Op.DELETE: (6, _decode_delete),
    Op.CAS: (8, _decode_cas),
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
    length, decode = spec
    if len(v) != length:
        raise RemoteProtocolError(f"command op {v[0]} needs {length} fields, got {len(v)}")
    return decode(v)
