"""The asyncio zkv client: many requests in flight on one DEALER socket.

Theory of operation:

- One reader task receives every reply and resolves the future of the pending request
  with the same ``request_id``; a reply for an id no longer pending (an answer to an
  attempt given up on, or to a request already answered) is dropped.
- Each request keeps its own deadline. An attempt that gets no reply within
  ``attempt_timeout_s`` (default ``min(1 s, timeout)``) is resent *with the same
  frames* (client id, request id), so the storage node deduplicates a retried write.
  A retryable error code is followed by a jittered exponential backoff (10..200 ms) and
  a resend.
- Socket policy: resends normally go out on the same socket, because one slow or lost
  request says nothing about the connection while other replies keep arriving. The
  socket is reset (closed with linger 0, reconnected to the next endpoint, round robin)
  only when an attempt times out and *no reply at all* has arrived since that attempt
  was sent: then every in-flight request timed out and the connection is presumed dead.
  After a reset, every pending request is resent at once on the new socket (their
  earlier copies died with the old one).
- At most ``max_in_flight`` requests (default 1024) are outstanding; further calls wait
  on a semaphore, so memory and the broker's queues stay bounded.
- ``lowest_pending`` of a write is the smallest request id still awaited: pending ids
  are kept in a dict in ascending order, so it is the first key.

The client binds to the event loop it is first used in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from zkv.client.sdk import (
    ATTEMPT_TIMEOUT_S_MAX,
    KEY_BYTES_MAX,
    VALUE_BYTES_MAX,
    ClientClosed,
    _Limits,
    check_reply,
    check_version,
    give_up,
    parse_endpoints,
    retry_pause,
    status_dict,
)
from zkv.protocol import codec
from zkv.protocol.errors import (
    RETRYABLE_CODES,
    KVError,
    RemoteProtocolError,
    Timeout,
    error_for_code,
)
from zkv.protocol.messages import (
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

MAX_IN_FLIGHT = 1024

_TIMED_OUT = object()  # an attempt's timer fired
_RESEND = object()  # the socket was reset: resend now


class _Pending:
    __slots__ = ("future", "frames", "sent_at")

    def __init__(self, future: asyncio.Future[Any], frames: list[bytes]) -> None:
        self.future = future
        self.frames = frames
        self.sent_at = 0.0


class AsyncKVClient:
    """asyncio zkv client; same API as ``KVClient``, as coroutines."""

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        timeout_s: float = 5.0,
        *,
        retries: int | None = None,
        attempt_timeout_s: float | None = None,
        consistency: Consistency = Consistency.LINEARIZABLE,
        max_in_flight: int = MAX_IN_FLIGHT,
        key_bytes_max: int = KEY_BYTES_MAX,
        value_bytes_max: int = VALUE_BYTES_MAX,
        context: zmq.asyncio.Context | None = None,
        seed: int | None = None,
        keys: str | os.PathLike[str] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.endpoints = parse_endpoints(endpoints)
        self.timeout_s = timeout_s
        self.retries = retries
        self.attempt_timeout_s = attempt_timeout_s
        self.consistency = Consistency(consistency)
        self.max_in_flight = max_in_flight
        self.limits = _Limits(key_bytes_max, value_bytes_max)
        self.client_id = os.urandom(16)
        #: Curve identity (``keys``: a client or admin dir of ``zkv keys generate``)
        self._curve = None if keys is None else Curve.for_identity(Path(keys))
        self._ctx = context or zmq.asyncio.Context.instance()
        self._rng = random.Random(seed)
        self._next_request_id = 1
        self._endpoint_index = 0
        self._pending: dict[int, _Pending] = {}
        self._sem: asyncio.Semaphore | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._last_reply_at = 0.0
        self._socket_opened_at = 0.0
        self._closed = False
        self.resends = 0
        self.resets = 0

    # ------------------------------------------------------------------ public API

    async def get(
        self,
        key: str | bytes,
        *,
        consistency: Consistency | None = None,
        timeout: float | None = None,
    ) -> bytes | None:
        found = await self.get_versioned(key, consistency=consistency, timeout=timeout)
        return None if found is None else found[0]

    async def get_versioned(
        self,
        key: str | bytes,
        *,
        consistency: Consistency | None = None,
        timeout: float | None = None,
    ) -> tuple[bytes, int] | None:
        k = self.limits.key(key)
        level = self.consistency if consistency is None else Consistency(consistency)
        reply = await self._call(
            lambda rid, low: GetRequest(self.client_id, rid, k, level), GetReply, timeout
        )
        return (reply.value, reply.version) if reply.found else None

    async def put(
        self, key: str | bytes, value: str | bytes, *, timeout: float | None = None
    ) -> int:
        k, v = self.limits.key(key), self.limits.value(value)
        reply = await self._call(
            lambda rid, low: PutRequest(self.client_id, rid, k, low, v), PutReply, timeout
        )
        return int(reply.version)

    async def delete(self, key: str | bytes, *, timeout: float | None = None) -> bool:
        k = self.limits.key(key)
        reply = await self._call(
            lambda rid, low: DeleteRequest(self.client_id, rid, k, low), DeleteReply, timeout
        )
        return bool(reply.deleted)

    async def cas(
        self,
        key: str | bytes,
        expected_version: int,
        value: str | bytes,
        *,
        timeout: float | None = None,
    ) -> bool:
        return (await self.cas_versioned(key, expected_version, value, timeout=timeout))[0]

    async def cas_versioned(
        self,
        key: str | bytes,
        expected_version: int,
        value: str | bytes,
        *,
        timeout: float | None = None,
    ) -> tuple[bool, int]:
        k, v = self.limits.key(key), self.limits.value(value)
        expected = check_version(expected_version)
        reply = await self._call(
            lambda rid, low: CasRequest(self.client_id, rid, k, low, expected, v),
            CasReply,
            timeout,
        )
        return bool(reply.swapped), int(reply.version)

    async def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        reply = await self._call(
            lambda rid, low: StatusRequest(self.client_id, rid), StatusReply, timeout
        )
        return status_dict(reply)

    async def ping(self, *, timeout: float | None = None) -> str:
        reply = await self._call(
            lambda rid, low: PingRequest(self.client_id, rid), PongReply, timeout
        )
        return str(reply.broker_id)

    async def close(self) -> None:
        """Stop the reader, fail every pending request with ``ClientClosed``."""
        self._closed = True
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(ClientClosed("client closed"))
        await self._stop_reader()
        self._drop_socket()

    async def __aenter__(self) -> AsyncKVClient:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ machinery

    def _start(self) -> None:
        if self._closed:
            raise ClientClosed("client is closed")
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_in_flight)
        if self._socket is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                self._curve.broker_client(sock, self.endpoints[self._endpoint_index])
            sock.connect(self.endpoints[self._endpoint_index])
            self._socket = sock
            self._socket_opened_at = time.monotonic()
            self._reader = asyncio.get_running_loop().create_task(self._read(sock))

    async def _call(
        self, build: Callable[[int, int], Message], expected: type, timeout: float | None
    ) -> Any:
        self._start()
        assert self._sem is not None
        async with self._sem:
            if self._closed:
                raise ClientClosed("client is closed")
            rid = self._next_request_id
            self._next_request_id += 1
            loop = asyncio.get_running_loop()
            pending = _Pending(loop.create_future(), [])
            self._pending[rid] = pending
            try:
                pending.frames = codec.encode(build(rid, next(iter(self._pending))))
                reply = await self._exchange(rid, pending, timeout)
            finally:
                del self._pending[rid]
            return check_reply(reply, expected)

    async def _exchange(self, rid: int, pending: _Pending, timeout: float | None) -> Message:
        total_s = self.timeout_s if timeout is None else timeout
        if total_s <= 0:
            raise ValueError("timeout must be > 0")
        attempt_s = self.attempt_timeout_s or min(ATTEMPT_TIMEOUT_S_MAX, total_s)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + total_s
        last_error: KVError | None = None
        attempt = 0
        while True:
            if pending.future.done():
                pending.future = loop.create_future()
            await self._send(pending)
            wait_s = max(0.0, min(deadline, time.monotonic() + attempt_s) - time.monotonic())
            timer = loop.call_later(wait_s, _expire, pending.future)
            try:
                reply = await pending.future
            finally:
                timer.cancel()
            now = time.monotonic()
            if reply is _RESEND:
                continue  # the socket was reset under us: resend on the new one
            if reply is _TIMED_OUT:
                last_error = Timeout(f"no reply within {attempt_s:g}s")
                silent = self._last_reply_at < pending.sent_at
                if silent and pending.sent_at >= self._socket_opened_at:
                    self._reset_socket()
            elif isinstance(reply, ErrorReply) and reply.code in RETRYABLE_CODES:
                last_error = error_for_code(
                    reply.code, reply.message, reply.leader_hint, reply.epoch
                )
                pause = retry_pause(attempt, now, deadline, self._rng)
                if pause is None:
                    now = deadline
                else:
                    await asyncio.sleep(pause)
                    now = time.monotonic()
            else:
                return reply  # type: ignore[no-any-return]
            attempt += 1
            failure = give_up(rid, attempt, now, deadline, self.retries, total_s, last_error)
            if failure is not None:
                raise failure from last_error
            self.resends += 1

    async def _send(self, pending: _Pending) -> None:
        if self._closed or self._socket is None:
            raise ClientClosed("client is closed")
        pending.sent_at = time.monotonic()
        frames = pending.frames
        await self._socket.send_multipart(frames, copy=len(frames[-1]) < 65536)

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        """The one reader: resolve the future of the request each reply answers."""
        while True:
            try:
                frames = await sock.recv_multipart()
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            self._last_reply_at = time.monotonic()
            try:
                reply = codec.decode(frames)
            except RemoteProtocolError:
                continue
            p = self._pending.get(getattr(reply, "request_id", -1))
            if p is not None and not p.future.done():
                p.future.set_result(reply)

    def _reset_socket(self) -> None:
        """All in-flight work timed out: reconnect elsewhere and resend everything."""
        old_reader, old_sock = self._reader, self._socket
        if old_reader is not None:
            old_reader.cancel()
        if old_sock is not None:
            old_sock.close(linger=0)
        self._socket = None
        self._reader = None
        self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
        self.resets += 1
        self._start()
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_result(_RESEND)

    async def _stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None

    def _drop_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(_TIMED_OUT)
