"""The asyncio zkv client: many requests in flight, one connection per broker.

Theory of operation:

- One reader task per connection takes every reply waiting at each wake-up
  (``recv_many``) and resolves the future of the pending request with the same
  ``request_id``; sends are queued and leave together once per loop iteration (see
  ``ZmqAsyncConnection``: batching on both sides is most of what keeps the gateway's
  and the broker's cost per request down). A reply for an id no longer pending (an
  answer to an attempt given up on, or to a request already answered) is dropped, and so
  is an error reply from a broker the request has since left.
- Each request keeps its own deadline and follows the pure retry policy of
  ``client/retry.py``, shared with ``KVClient``: after each attempt it returns, raises,
  resends to the same broker (after a backoff for a retryable error code), or moves to
  the next broker (round robin). Every resend carries *the same frames* (client id,
  request id), so the storage node deduplicates a retried write.
- ``NO_LEADER`` and ``UNAVAILABLE`` move that request to the next broker, and new
  requests follow it there (the broker that refused cannot reach the shard).
- Silence: an attempt that gets no reply within ``attempt_timeout_s`` (default
  ``min(1 s, timeout)``) is resent on the same connection while other replies keep
  arriving on it (one slow or lost request says nothing about the connection). Only when
  *no reply at all* arrived on the connection since the attempt was sent is the
  connection presumed dead: it is closed (linger 0), and every request pending on it
  moves to the next broker and is resent at once (their copies died with it).
- At most ``max_in_flight`` requests (default 1024) are outstanding; further calls wait
  on a semaphore, so memory and the broker's queues stay bounded.
- ``lowest_pending`` of a write is the smallest request id still awaited: pending ids
  are kept in a dict in ascending order, so it is the first key.
- Time is the event loop's (``loop.time()``, ``call_at``, ``asyncio.sleep``) and
  connections come from ``connect(endpoint)`` (default: zmq DEALER sockets), so a test
  runs the client on a virtual-time loop over in-memory connections.

The client binds to the event loop it is first used in. Conditional deletes
(``delete(key, expected_version=N)``) are decided by the shard like a CAS, atomically.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq

from zkv.client.aio_connection import (
    AsyncConnection,
    ZmqAsyncConnection,
)
from zkv.client.aio_links import _RESEND, _TIMED_OUT, AsyncLinks, _expire, _Link, _Pending
from zkv.client.aio_multikey import AsyncMultiKeyCalls
from zkv.client.calls import (
    ClientClosed,
    Limits,
    check_delete_version,
    check_reply,
    check_version,
    parse_endpoints,
    status_dict,
)
from zkv.client.retry import Action, CallState, Silence, attempt_until, decide
from zkv.client.ttl import ttl_ms, ttl_seconds
from zkv.client.watch_aio import AsyncWatchCalls
from zkv.protocol import codec
from zkv.protocol.limits import KEY_BYTES_MAX, VALUE_BYTES_MAX
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
from zkv.protocol.ttl_messages import (
    ExpireReply,
    ExpireRequest,
    PersistRequest,
    PutTtlRequest,
    TtlReply,
    TtlRequest,
)

MAX_IN_FLIGHT = 1024



class AsyncKVClient(AsyncMultiKeyCalls, AsyncLinks, AsyncWatchCalls):
    """asyncio zkv client; same API as ``KVClient``, as coroutines (batches and scans:
    ``aio_multikey.py``)."""

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
        context: zmq.Context[Any] | None = None,
        seed: int | None = None,
        connect: Callable[[str], AsyncConnection] | None = None,
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
        self.limits = Limits(key_bytes_max, value_bytes_max)
        self.client_id = os.urandom(16)
        #: Curve identity (``keys``: a client or admin dir of ``zkv keys generate``)
        curve = None if keys is None else Curve.for_identity(Path(keys))
        if connect is None:
            ctx = context or zmq.Context.instance()
            connect = lambda endpoint: ZmqAsyncConnection(ctx, endpoint, curve)  # noqa: E731
        self._connect = connect
        self._rng = random.Random(seed)
        self._next_request_id = 1
        self._endpoint_index = 0  # where new requests go
        self._pending: dict[int, _Pending] = {}
        self._links: dict[int, _Link] = {}
        self._sem: asyncio.Semaphore | None = None
        self._closed = False
        #: Counters a caller (or a test) may read: attempts resent, connections reset
        #: (presumed dead), requests moved to another broker.
        self.resends = 0
        self.resets = 0
        self.switches = 0

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
        self, key: str | bytes, value: str | bytes, *, ttl: float | None = None,
        timeout: float | None = None,
    ) -> int:
        """Store ``value``; with ``ttl`` (seconds) it expires (``KVClient.put``)."""
        k, v = self.limits.key(key), self.limits.value(value)
        if ttl is not None:
            ms = ttl_ms(ttl)
            reply = await self._call(
                lambda rid, low: PutTtlRequest(self.client_id, rid, k, low, ms, v), PutReply,
                timeout,
            )
            return int(reply.version)
        reply = await self._call(
            lambda rid, low: PutRequest(self.client_id, rid, k, low, v), PutReply, timeout
        )
        return int(reply.version)

    # ------------------------------------------------------------------ TTL

    async def expire(self, key: str | bytes, seconds: float, *,
                     timeout: float | None = None) -> bool:
        """``KVClient.expire``: False if the key does not exist."""
        k, ms = self.limits.key(key), ttl_ms(seconds)
        reply = await self._call(
            lambda rid, low: ExpireRequest(self.client_id, rid, k, low, ms), ExpireReply,
            timeout,
        )
        return bool(reply.found)

    async def persist(self, key: str | bytes, *, timeout: float | None = None) -> bool:
        """``KVClient.persist``: False if the key does not exist."""
        k = self.limits.key(key)
        reply = await self._call(
            lambda rid, low: PersistRequest(self.client_id, rid, k, low), ExpireReply, timeout
        )
        return bool(reply.found)

    async def ttl(self, key: str | bytes, *, consistency: Consistency | None = None,
                  timeout: float | None = None) -> float | None:
        """``KVClient.ttl``: seconds left, ``math.inf`` if none, None if missing."""
        k = self.limits.key(key)
        level = self.consistency if consistency is None else Consistency(consistency)
        reply = await self._call(
            lambda rid, low: TtlRequest(self.client_id, rid, k, level), TtlReply, timeout
        )
        return ttl_seconds(reply)

    async def delete(self, key: str | bytes, *, expected_version: int | None = None,
                     timeout: float | None = None) -> bool:
        return (await self.delete_versioned(key, expected_version=expected_version,
                                            timeout=timeout))[0]

    async def delete_versioned(self, key: str | bytes, *, expected_version: int | None = None,
                               timeout: float | None = None) -> tuple[bool, int]:
        k = self.limits.key(key)
        expected = check_delete_version(expected_version)
        reply = await self._call(
            lambda rid, low: DeleteRequest(self.client_id, rid, k, low, expected), DeleteReply,
            timeout,
        )
        return bool(reply.deleted), int(reply.version)

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
        """Stop the readers, fail every pending request with ``ClientClosed``."""
        self._closed = True
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(ClientClosed("client closed"))
        for link in list(self._links.values()):
            await self._close_link(link)

    async def __aenter__(self) -> AsyncKVClient:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def new_request_id(self) -> int:
        rid = self._next_request_id
        self._next_request_id += 1
        return rid

    @property
    def endpoint(self) -> str:
        """The endpoint new requests go to."""
        return self.endpoints[self._endpoint_index]

    # ------------------------------------------------------------------ machinery

    def _start(self) -> None:
        if self._closed:
            raise ClientClosed("client is closed")
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_in_flight)

    async def _call(
        self, build: Callable[[int, int], Message], expected: type, timeout: float | None,
        rid: int | None = None,
    ) -> Any:
        """One request until the retry policy says stop. ``rid``: reuse that request id
        (a batch write's next round, ``aio_multikey.py``) instead of the next one."""
        self._start()
        assert self._sem is not None
        async with self._sem:
            if self._closed:
                raise ClientClosed("client is closed")
            if rid is None or rid in self._pending:
                rid = self.new_request_id()
            loop = asyncio.get_running_loop()
            pending = _Pending(loop.create_future(), self._endpoint_index)
            self._pending[rid] = pending
            # a reused id sits last in the dict: the lowest pending id is then not first
            lowest = min(rid, next(iter(self._pending)))
            try:
                pending.frames = codec.encode(build(rid, lowest))
                reply = await self._exchange(rid, pending, timeout)
            finally:
                del self._pending[rid]
            return check_reply(reply, expected)

    async def _exchange(self, rid: int, pending: _Pending, timeout: float | None) -> Message:
        """Send until the retry policy says stop: its reply, or raise its error."""
        loop = asyncio.get_running_loop()
        total_s = self.timeout_s if timeout is None else timeout
        state = CallState.start(rid, loop.time(), total_s, len(self.endpoints),
                                pending.endpoint, self.retries)
        while True:
            if pending.future.done():
                pending.future = loop.create_future()
            await self._send(pending)
            until = attempt_until(state, loop.time(), self.attempt_timeout_s)
            timer = loop.call_at(until, _expire, pending.future)
            try:
                outcome = await pending.future
            finally:
                timer.cancel()
            if outcome is not _TIMED_OUT and outcome is not _RESEND and \
                    not isinstance(outcome, ErrorReply):
                answer: Message = outcome  # what ``decide`` says (DONE), without the call
                return answer
            link = pending.link
            assert link is not None
            if outcome is _RESEND or (outcome is _TIMED_OUT and link.closed):
                # The connection was reset under us and the request moved: resend.
                state = replace(state, endpoint=pending.endpoint)
                continue
            if outcome is _TIMED_OUT:
                silent = link.last_reply_at < pending.sent_at
                outcome = Silence.CONNECTION if silent else Silence.REQUEST
            decision = decide(state, outcome, loop.time(), self._rng)
            if decision.action is Action.DONE:
                assert decision.reply is not None
                return decision.reply
            if decision.action is Action.FAIL:
                assert decision.error is not None
                if decision.endpoint != pending.endpoint:  # the next call moves on
                    self._switch(pending, link, decision.endpoint, decision.reset)
                raise decision.error
            if decision.action is Action.SWITCH:
                self._switch(pending, link, decision.endpoint, decision.reset)
            if decision.pause_s > 0:
                await asyncio.sleep(decision.pause_s)
            state = decision.state
            self.resends += 1
