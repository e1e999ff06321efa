"""The field checks every log command's decoder shares (``commands.py``,
``ttl_commands.py``, ``multikey_commands.py``): a defect in a decoded entry is a
``RemoteProtocolError`` naming the field, never an exception from deeper down."""

from __future__ import annotations

from typing import Any

from zkv.protocol.errors import RemoteProtocolError


def uint(v: Any, name: str) -> int:
    if type(v) is not int or v < 0:
        raise RemoteProtocolError(f"command field {name} must be a non-negative int, got {v!r}")
    return v


def blob(v: Any, name: str) -> bytes:
    if type(v) is not bytes:
        raise RemoteProtocolError(f"command field {name} must be bytes, got {type(v).__name__}")
    return v


def head(v: list[Any]) -> tuple[bytes, int, int, int, bytes]:
    """A keyed write's common fields: client id, request id, lowest pending, stamp, key."""
    return (blob(v[1], "client_id"), uint(v[2], "request_id"),
            uint(v[3], "lowest_pending"), uint(v[4], "ts_ms"), blob(v[5], "key"))
