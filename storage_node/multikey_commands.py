"""The log entry of a batch write: one shard's part of an ``mset`` or ``mdelete``.

    [100, client_id, request_id, lowest_pending, ts_ms, kind, keys, values]   MULTI_WRITE

``kind`` 0 puts ``values[i]`` at ``keys[i]``, 1 deletes ``keys`` (``values`` empty).
One entry for the whole part, so a shard applies all of its keys or none
(``multikey_state.py``). Op 100 sits far above the single-key ops (0-11) so that other
new ops can take the numbers after them. ``decode_multi_write`` of any array returns a
command or raises ``RemoteProtocolError``, like ``commands.decode_command``.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any

import msgpack

from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.record import record
from zkv.storage_node.command_fields import uint as _uint

#: Wire value of the op: never renumber.
MULTI_WRITE_OP = 100


class MultiKind(enum.IntEnum):
    PUT = 0
    DELETE = 1


@record
class MultiWrite:
    client_id: bytes
    request_id: int
    lowest_pending: int
    ts_ms: int
    kind: MultiKind
    keys: tuple[bytes, ...]
    values: tuple[bytes, ...] = ()


_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def encode_multi_write(c: MultiWrite) -> bytes:
    return _pack((MULTI_WRITE_OP, c.client_id, c.request_id, c.lowest_pending, c.ts_ms,  # type: ignore[no-any-return]
                  int(c.kind), list(c.keys), list(c.values)))


def _blobs(v: Any, name: str) -> tuple[bytes, ...]:
    if type(v) is not list or any(type(x) is not bytes for x in v):
        raise RemoteProtocolError(f"command field {name} must be a list of bytes")
    return tuple(v)


def decode_multi_write(v: list[Any]) -> MultiWrite:
    """From the unpacked array (``commands.decode_command`` checked its length is 8)."""
    if type(v[1]) is not bytes:
        raise RemoteProtocolError("command field client_id must be bytes")
    kind = v[5]
    if type(kind) is not int or kind not in (0, 1):
        raise RemoteProtocolError(f"command field kind must be 0 or 1, got {kind!r}")
    keys, values = _blobs(v[6], "keys"), _blobs(v[7], "values")
    if (kind == MultiKind.PUT and len(values) != len(keys)) or (
            kind == MultiKind.DELETE and values):
        raise RemoteProtocolError("command keys and values do not match")
    return MultiWrite(v[1], _uint(v[2], "request_id"), _uint(v[3], "lowest_pending"),
                      _uint(v[4], "ts_ms"), MultiKind(kind), keys, values)


def key_hash(key: bytes) -> int:
    """64 bits naming a key in the session table (``sessions.MultiCached``): which keys a
    batch's request id already wrote, without keeping the keys."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
