"""A tiny KV state machine for the simulator (not zkv's real one: just enough to check).

Commands are ``Entry.data`` = msgpack ``[op, client, seq, key, value, expected_version]``
with op 1 = put, 2 = delete, 3 = cas; ``[0]`` (the core's no-op) does nothing. A key's
version is the index of the entry that last wrote it. Each client's last (seq, result)
is remembered, so a retried command (same client and seq) is applied once and answered
with the first result.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

NOOP, PUT, DELETE, CAS = 0, 1, 2, 3
OP_CODES = {"put": PUT, "delete": DELETE, "cas": CAS}


def encode(op: str, client: int, seq: int, key: str, value: str | None, expected: int | None) -> bytes:
    return msgpack.packb([OP_CODES[op], client, seq, key, value, expected])


def decode(data: bytes) -> list[Any]:
    return msgpack.unpackb(data)


class KV:
    __slots__ = ("store", "sessions", "applied")

    def __init__(self) -> None:
        self.store: dict[str, tuple[str, int]] = {}
        self.sessions: dict[int, tuple[int, Any]] = {}  # client -> (seq, result)
        self.applied = 0

    def apply(self, index: int, data: bytes) -> tuple[int, int, Any] | None:
        """Apply one committed entry; (client, seq, result) for a command, else None."""
        if index != self.applied + 1:
            raise AssertionError(f"applying index {index} after {self.applied}")
        self.applied = index
        cmd = decode(data)
        if cmd[0] == NOOP:
            return None
        op, client, seq, key, value, expected = cmd
        last = self.sessions.get(client)
        if last is not None and seq <= last[0]:
            return (client, seq, last[1]) if seq == last[0] else None  # dedupe
        cur = self.store.get(key)
        if op == PUT:
            self.store[key] = (value, index)
            result: Any = index
        elif op == DELETE:
            result = cur is not None
            self.store.pop(key, None)
        else:
            version = cur[1] if cur else 0
            if version == expected:
                self.store[key] = (value, index)
                result = (True, index)
            else:
                result = (False, version)
        self.sessions[client] = (seq, result)
        return client, seq, result

    def get(self, key: str) -> tuple[str | None, int]:
        cur = self.store.get(key)
        return (cur[0], cur[1]) if cur else (None, 0)

    def snapshot(self) -> bytes:
        return msgpack.packb(
            [self.applied, sorted(self.store.items()), sorted(self.sessions.items())]
        )

    @classmethod
    def restore(cls, data: bytes) -> KV:
        kv = cls()
        applied, store, sessions = msgpack.unpackb(data, strict_map_key=False)
        kv.applied = applied
        kv.store = {k: (v[0], v[1]) for k, v in store}
        kv.sessions = {c: (s[0], _tuple(s[1])) for c, s in sessions}
        return kv

    def digest(self) -> str:
        return hashlib.blake2b(self.snapshot(), digest_size=8).hexdigest()


def _tuple(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x
