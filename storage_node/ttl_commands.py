"""State-machine commands of keys that expire (TTL); registered in ``commands.py``.

msgpack arrays, first element the op (wire values, never renumber)::

    [120, client_id, request_id, lowest_pending, ts_ms, key, value, deadline_ms]  PUT_TTL
    [121, client_id, request_id, lowest_pending, ts_ms, key, deadline_ms]         EXPIRE_SET
    [122, now_ms, [key, ...]]                                                     EXPIRE_SWEEP

Every time here is the leader's wall clock in milliseconds, read by the shell and
stamped when it proposed the entry, so applying the log is a pure function of it:

- PUT_TTL stores a value whose ``deadline_ms`` = the leader's ``ts_ms`` + the TTL.
- EXPIRE_SET gives an existing key the deadline ``deadline_ms``; 0 removes the key's
  deadline (``persist``). Answered by ``ExpireReply``.
- EXPIRE_SWEEP removes the listed keys whose deadline is <= ``now_ms`` when the entry
  applies (a key written again since the leader listed it keeps its new life).
  The leader lists at most ``SWEEP_KEYS_MAX`` keys per entry.

``decode_ttl`` of any array returns a command or raises ``RemoteProtocolError``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.record import record
from zkv.storage_node.command_fields import blob as _bytes
from zkv.storage_node.command_fields import head as _head
from zkv.storage_node.command_fields import uint as _uint

#: Keys per EXPIRE_SWEEP entry: bounds the work of one apply and one loop turn.
SWEEP_KEYS_MAX = 1000


class TtlOp(enum.IntEnum):
    """Wire values (the commands' op numbers): never renumber."""

    PUT_TTL = 120
    EXPIRE_SET = 121
    EXPIRE_SWEEP = 122


@record
class PutTtlCommand:
    client_id: bytes
    request_id: int
    lowest_pending: int
    ts_ms: int
    key: bytes
    value: bytes
    deadline_ms: int


@record
class ExpireCommand:
    """Set (``deadline_ms`` > 0) or clear (0) the deadline of an existing key."""

    client_id: bytes
    request_id: int
    lowest_pending: int
    ts_ms: int
    key: bytes
    deadline_ms: int


@record
class SweepCommand:
    """Remove these keys if they are expired at ``now_ms``."""

    now_ms: int
    keys: tuple[bytes, ...]


TtlCommand = PutTtlCommand | ExpireCommand | SweepCommand
TTL_COMMANDS = (PutTtlCommand, ExpireCommand, SweepCommand)


def encode_ttl(cmd: TtlCommand) -> tuple[Any, ...]:
    """The array for ``cmd`` (``commands.encode_command`` packs it)."""
    if isinstance(cmd, PutTtlCommand):
        return (int(TtlOp.PUT_TTL), cmd.client_id, cmd.request_id, cmd.lowest_pending,
                cmd.ts_ms, cmd.key, cmd.value, cmd.deadline_ms)
    if isinstance(cmd, ExpireCommand):
        return (int(TtlOp.EXPIRE_SET), cmd.client_id, cmd.request_id, cmd.lowest_pending,
                cmd.ts_ms, cmd.key, cmd.deadline_ms)
    return int(TtlOp.EXPIRE_SWEEP), cmd.now_ms, list(cmd.keys)



def _decode_put_ttl(v: list[Any]) -> TtlCommand:
    return PutTtlCommand(*_head(v), _bytes(v[6], "value"), _uint(v[7], "deadline_ms"))


def _decode_expire(v: list[Any]) -> TtlCommand:
    return ExpireCommand(*_head(v), _uint(v[6], "deadline_ms"))


def _decode_sweep(v: list[Any]) -> TtlCommand:
    keys = v[2]
    if type(keys) is not list or any(type(k) is not bytes for k in keys):
        raise RemoteProtocolError("sweep keys must be a list of bytes")
    return SweepCommand(_uint(v[1], "now_ms"), tuple(keys))


#: op -> (array lengths accepted, decoder), merged into ``commands._DECODERS``.
TTL_DECODERS: dict[int, tuple[tuple[int, ...], Callable[[list[Any]], TtlCommand]]] = {
    TtlOp.PUT_TTL: ((8,), _decode_put_ttl),
    TtlOp.EXPIRE_SET: ((7,), _decode_expire),
    TtlOp.EXPIRE_SWEEP: ((3,), _decode_sweep),
}
