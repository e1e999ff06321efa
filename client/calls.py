"""What both clients (sync and asyncio) check and convert around a call: endpoints,
key and value types and sizes, versions, and a reply's type or error.

Checked before anything is sent, so a bad argument is a ``TypeError``/``ValueError`` or
``TooLarge`` raised in the caller, never a round trip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from zkv.protocol.errors import KVError, RemoteProtocolError, TooLarge, error_for_code
from zkv.protocol.messages import ErrorReply, Message, StatusReply

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


class ClientClosed(KVError):
    """The client was closed; no request can be sent on it."""


def parse_endpoints(endpoints: str | Sequence[str] | None) -> list[str]:
    """``None`` -> env ``ZKV_ENDPOINT`` or the default; a str may list several, comma-separated."""
    if endpoints is None:
        endpoints = os.environ.get("ZKV_ENDPOINT") or DEFAULT_ENDPOINT
    if isinstance(endpoints, str):
        endpoints = endpoints.split(",")
    result = [e.strip() for e in endpoints if e.strip()]
    if not result:
        raise ValueError("no endpoint given")
    return result


def to_bytes(what: str, data: Any) -> bytes:
    """str is UTF-8 encoded, bytes pass; anything else is a TypeError."""
    if type(data) is bytes:
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytes):
        return bytes(data)
    raise TypeError(f"{what} must be str or bytes, not {type(data).__name__}")


class Limits:
    """Client-side validation shared by the sync and async clients."""

    def __init__(self, key_bytes_max: int, value_bytes_max: int) -> None:
        self.key_bytes_max = key_bytes_max
        self.value_bytes_max = value_bytes_max

    def key(self, key: Any) -> bytes:
        k = to_bytes("key", key)
        if len(k) > self.key_bytes_max:
            raise TooLarge(f"key is {len(k)} bytes, limit is {self.key_bytes_max}")
        return k

    def value(self, value: Any) -> bytes:
        v = to_bytes("value", value)
        if len(v) > self.value_bytes_max:
            raise TooLarge(f"value is {len(v)} bytes, limit is {self.value_bytes_max}")
        return v


def check_version(expected_version: Any) -> int:
    if type(expected_version) is not int:
        raise TypeError(f"expected_version must be int, not {type(expected_version).__name__}")
    if expected_version < 0:
        raise ValueError("expected_version must be >= 0 (0: the key must not exist)")
    return expected_version


def check_delete_version(expected_version: Any) -> int:
    """The wire's ``DeleteRequest.expected_version``: None (unconditional) is 0."""
    if expected_version is None:
        return 0
    if type(expected_version) is not int:
        raise TypeError(f"expected_version must be int, not {type(expected_version).__name__}")
    if expected_version < 1:
        raise ValueError("expected_version of a delete must be >= 1 (a key's version), "
                         "or None for an unconditional delete")
    return expected_version


def check_reply(reply: Message, expected: type) -> Any:
    """Raise for an error reply or a reply of the wrong type; else return the reply."""
    if isinstance(reply, ErrorReply):
        raise error_for_code(reply.code, reply.message, reply.leader_hint, reply.epoch)
    if not isinstance(reply, expected):
        raise RemoteProtocolError(
            f"expected {expected.__name__}, got {type(reply).__name__}"
        )
    return reply


def status_dict(reply: StatusReply) -> dict[str, Any]:
    return {"broker_id": reply.broker_id, "nodes": [dict(n) for n in reply.nodes],
            "ring": {} if reply.ring is None else reply.ring.as_dict()}
