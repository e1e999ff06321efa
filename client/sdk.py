"""The synchronous zkv client: one request at a time on one DEALER socket.

Theory of operation (the ZeroMQ Guide's Lazy Pirate, made idempotent):

- Every client draws a 16-byte random ``client_id``; every call gets the next
  ``request_id``. A retry resends *the same* frames (same client id and request id), so a
  storage node that already applied a write answers from its session table instead of
  applying it twice.
- A call has an overall deadline (``timeout``). Each attempt waits at most
  ``attempt_timeout_s`` (default ``min(1 s, timeout)``). When an attempt gets no reply,
  the socket is closed with linger 0 (dropping whatever it still queued), a new socket is
  connected to the next endpoint of the list (round robin), and the request is resent.
- A reply with a retryable code (``RETRYABLE_CODES``: the leader moved, no leader yet,
  wrong shard, unavailable, server-side timeout) is followed by a short exponential
  backoff with jitter (10 ms doubling to 200 ms) and a resend on the same socket.
- A reply whose request id is not the current one is a stale answer to an attempt we
  gave up on: it is dropped. So are frames that do not decode.
- No usable reply by the deadline raises ``Timeout`` (for a write: outcome unknown); its
  ``__cause__`` is the last retryable error, if any. Other error codes raise the
  exception that ``error_for_code`` maps them to.

Sizes are checked before sending (``TooLarge``), types too (``TypeError``). A client is
not meant to be shared between threads; a lock serializes calls if it is.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from zkv.protocol import codec
from zkv.protocol.errors import (
    RETRYABLE_CODES,
    KVError,
    RemoteProtocolError,
    RequestError,
    Timeout,
    TooLarge,
    error_for_code,
)
from zkv.protocol.messages import (
    AdminReply,
    AdminRequest,
    CasReply,
    CasRequest,
    Consistency,
    DeleteReply,
    DeleteRequest,
    ErrorReply,
    GetReply,
    GetRequest,
    Message,
    PingRequest,
    PongReply,
    PutReply,
    PutRequest,
    StatusReply,
    StatusRequest,
)
from zkv.protocol.security import Curve

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
KEY_BYTES_MAX = 16 * 1024
VALUE_BYTES_MAX = 1024 * 1024
ATTEMPT_TIMEOUT_S_MAX = 1.0
BACKOFF_S_MIN = 0.010
BACKOFF_S_MAX = 0.200


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


class _Limits:
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


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Exponential backoff from 10 ms, capped at 200 ms, with full jitter on the upper half."""
    ceiling = min(BACKOFF_S_MAX, BACKOFF_S_MIN * float(2 ** min(attempt, 16)))
    return ceiling / 2 + rng.random() * ceiling / 2


def retry_pause(attempt: int, now: float, deadline: float, rng: random.Random) -> float | None:
    """How long to back off before resending after a retryable error reply; None when
    the pause would run past the deadline (give up now rather than sleep in vain)."""
    pause = backoff_s(attempt, rng)
    return None if now + pause >= deadline else pause


def give_up(
    rid: int, attempt: int, now: float, deadline: float, retries: int | None,
    total_s: float, last_error: KVError | None,
) -> Timeout | None:
    """The ``Timeout`` to raise after ``attempt`` attempts, or None to keep trying.
    Shared by the sync and asyncio clients so both give up by the same rules."""
    out_of_retries = retries is not None and attempt > retries
    if now < deadline and not out_of_retries:
        return None
    what = "retries" if out_of_retries and now < deadline else "deadline"
    return Timeout(
        f"request {rid} got no answer ({what} exhausted after {attempt} "
        f"attempts, {total_s:g}s; last: {_describe(last_error)})"
    )


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
            "ring": dict(reply.ring)}


class KVClient:
    """Synchronous zkv client. See the module docstring for the retry rules."""

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        timeout_s: float = 5.0,
        *,
        retries: int | None = None,
        attempt_timeout_s: float | None = None,
        consistency: Consistency = Consistency.LINEARIZABLE,
        key_bytes_max: int = KEY_BYTES_MAX,
        value_bytes_max: int = VALUE_BYTES_MAX,
        context: zmq.Context[Any] | None = None,
        seed: int | None = None,
        keys: str | os.PathLike[str] | None = None,
    ) -> None:
        """``retries``: resends allowed per call (None: as many as the deadline allows).
        ``attempt_timeout_s``: wait per attempt before a socket reset (default
        ``min(1 s, timeout)``)."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.endpoints = parse_endpoints(endpoints)
        self.timeout_s = timeout_s
        self.retries = retries
        self.attempt_timeout_s = attempt_timeout_s
        self.consistency = Consistency(consistency)
        self.limits = _Limits(key_bytes_max, value_bytes_max)
        self.client_id = os.urandom(16)
        #: Curve identity (``keys``: a client or admin dir of ``zkv keys generate``)
        self._curve = None if keys is None else Curve.for_identity(Path(keys))
        self._ctx = context or zmq.Context.instance()
        self._rng = random.Random(seed)
        self._next_request_id = 1
        self._endpoint_index = 0
        self._lock = threading.Lock()
        self._socket: zmq.Socket[bytes] | None = None
        self._poller = zmq.Poller()
        self._closed = False
        #: Counters a caller (or a test) may read: attempts resent, sockets reset.
        self.resends = 0
        self.resets = 0

    # ------------------------------------------------------------------ public API

    def get(
        self,
        key: str | bytes,
        *,
        consistency: Consistency | None = None,
        timeout: float | None = None,
    ) -> bytes | None:
        found = self.get_versioned(key, consistency=consistency, timeout=timeout)
        return None if found is None else found[0]

    def get_versioned(
        self,
        key: str | bytes,
        *,
        consistency: Consistency | None = None,
        timeout: float | None = None,
    ) -> tuple[bytes, int] | None:
        k = self.limits.key(key)
        level = self.consistency if consistency is None else Consistency(consistency)
        reply = self._call(
            lambda rid: GetRequest(self.client_id, rid, k, level), GetReply, timeout
        )
        return (reply.value, reply.version) if reply.found else None

    def put(self, key: str | bytes, value: str | bytes, *, timeout: float | None = None) -> int:
        """Store ``value``; return the key's new version."""
        k, v = self.limits.key(key), self.limits.value(value)
        reply = self._call(
            lambda rid: PutRequest(self.client_id, rid, k, rid, v), PutReply, timeout
        )
        return int(reply.version)

    def delete(self, key: str | bytes, *, timeout: float | None = None) -> bool:
        """Remove ``key``; True if it existed."""
        k = self.limits.key(key)
        reply = self._call(
            lambda rid: DeleteRequest(self.client_id, rid, k, rid), DeleteReply, timeout
        )
        return bool(reply.deleted)

    def cas(
        self,
        key: str | bytes,
        expected_version: int,
        value: str | bytes,
        *,
        timeout: float | None = None,
    ) -> bool:
        """Write ``value`` only if the key's version is ``expected_version`` (0: absent)."""
        return self.cas_versioned(key, expected_version, value, timeout=timeout)[0]

    def cas_versioned(
        self,
        key: str | bytes,
        expected_version: int,
        value: str | bytes,
        *,
        timeout: float | None = None,
    ) -> tuple[bool, int]:
        """Like ``cas`` but also return the key's version after the call."""
        k, v = self.limits.key(key), self.limits.value(value)
        expected = check_version(expected_version)
        reply = self._call(
            lambda rid: CasRequest(self.client_id, rid, k, rid, expected, v), CasReply, timeout
        )
        return bool(reply.swapped), int(reply.version)

    def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The broker's view: ``{"broker_id", "nodes": [heartbeat dicts + age_ms], "ring"}``."""
        reply = self._call(lambda rid: StatusRequest(self.client_id, rid), StatusReply, timeout)
        return status_dict(reply)

    def admin(
        self, shard_id: int, op: str, args: dict[str, Any] | None = None,
        payload: bytes = b"", *, timeout: float | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        """A ring-change admin op at the leader of ``shard_id`` (``client/rebalance.py``);
        returns ``(result, payload)``. Retried like any request: every op is idempotent."""
        reply = self._call(
            lambda rid: AdminRequest(self.client_id, rid, shard_id, op, dict(args or {}), payload),
            AdminReply, timeout,
        )
        return dict(reply.result), reply.payload

    def ping(self, *, timeout: float | None = None) -> str:
        """Round trip to a broker; returns its broker id."""
        reply = self._call(lambda rid: PingRequest(self.client_id, rid), PongReply, timeout)
        return str(reply.broker_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_socket()

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: never leave a socket behind
        try:
            if not self._closed:
                self._drop_socket()
        except Exception:
            pass

    @property
    def endpoint(self) -> str:
        """The endpoint the current (or next) socket connects to."""
        return self.endpoints[self._endpoint_index]

    # ------------------------------------------------------------------ machinery

    def _call(self, build: Any, expected: type, timeout: float | None) -> Any:
        with self._lock:
            if self._closed:
                raise ClientClosed("client is closed")
            rid = self._next_request_id
            self._next_request_id += 1
            frames = codec.encode(build(rid))
            return check_reply(self._exchange(rid, frames, timeout), expected)

    def _exchange(self, rid: int, frames: list[bytes], timeout: float | None) -> Message:
        """Send until a non-retryable reply arrives or the deadline passes."""
        total_s = self.timeout_s if timeout is None else timeout
        if total_s <= 0:
            raise ValueError("timeout must be > 0")
        attempt_s = self.attempt_timeout_s or min(ATTEMPT_TIMEOUT_S_MAX, total_s)
        now = time.monotonic()
        deadline = now + total_s
        last_error: KVError | None = None
        attempt = 0
        while True:
            sock = self._ensure_socket()
            sock.send_multipart(frames, copy=len(frames[-1]) < 65536)
            reply = self._await_reply(rid, min(deadline, time.monotonic() + attempt_s))
            now = time.monotonic()
            if reply is None:
                # Lazy Pirate: the socket may hold a dead connection; start afresh.
                self._reset_socket()
                last_error = Timeout(f"no reply from {self.endpoint} within {attempt_s:g}s")
            elif isinstance(reply, ErrorReply) and reply.code in RETRYABLE_CODES:
                last_error = error_for_code(
                    reply.code, reply.message, reply.leader_hint, reply.epoch
                )
                pause = retry_pause(attempt, now, deadline, self._rng)
                if pause is None:
                    now = deadline
                else:
                    time.sleep(pause)
                    now = time.monotonic()
            else:
                return reply
            attempt += 1
            failure = give_up(rid, attempt, now, deadline, self.retries, total_s, last_error)
            if failure is not None:
                raise failure from last_error
            self.resends += 1

    def _await_reply(self, rid: int, until: float) -> Message | None:
        """The reply to ``rid``, or None if none came before ``until``."""
        sock = self._socket
        assert sock is not None
        while True:
            left_ms = math.ceil((until - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._poller.poll(left_ms):
                return None
            frames = sock.recv_multipart()
            try:
                reply = codec.decode(frames)
            except RemoteProtocolError:
                continue  # garbage from the wire: drop it, keep waiting
            if getattr(reply, "request_id", None) == rid:
                return reply
            # A stale reply to an attempt we already gave up on: drop it.

    def _ensure_socket(self) -> zmq.Socket[bytes]:
        if self._socket is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                self._curve.broker_client(sock, self.endpoints[self._endpoint_index])
            sock.connect(self.endpoints[self._endpoint_index])
            self._poller.register(sock, zmq.POLLIN)
            self._socket = sock
        return self._socket

    def _drop_socket(self) -> None:
        if self._socket is not None:
            self._poller.unregister(self._socket)
            self._socket.close(linger=0)
            self._socket = None

    def _reset_socket(self) -> None:
        self._drop_socket()
        self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
        self.resets += 1


def _describe(error: KVError | None) -> str:
    if error is None:
        return "nothing"
    if isinstance(error, RequestError):
        hint = f" (leader hint {error.leader_hint})" if error.leader_hint else ""
        return f"{error.code.name}{hint}"
    return str(error)
