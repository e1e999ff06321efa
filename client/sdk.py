"""The synchronous zkv client: one request at a time on one connection to a broker.

Theory of operation (the ZeroMQ Guide's Lazy Pirate, made idempotent):

- Every client draws a 16-byte random ``client_id``; every call gets the next
  ``request_id``. A retry resends *the same* frames (same client id and request id), so a
  storage node that already applied a write answers from its session table instead of
  applying it twice, whichever broker the retry went through.
- A call has an overall deadline (``timeout``). Each attempt waits at most
  ``attempt_timeout_s`` (default ``min(1 s, timeout)``). After each attempt the pure
  policy in ``client/retry.py`` (shared with the asyncio client) decides: return, raise,
  resend to the same broker after a backoff, or switch to the next broker (round robin).
  Silence closes the connection with linger 0 (dropping whatever it still queued) and
  resends on a new one to the next broker; ``NO_LEADER`` and ``UNAVAILABLE`` (this
  broker cannot reach a leader) also move to the next broker; ``NOT_LEADER``,
  ``WRONG_SHARD`` and a server ``TIMEOUT`` back off and resend to the same broker.
- A reply whose request id is not the current one is a stale answer to an attempt we
  gave up on: it is dropped. So are frames that do not decode.
- No usable reply by the deadline raises ``Timeout`` (for a write: outcome unknown); its
  ``__cause__`` is the last retryable error, if any. Other error codes raise the
  exception that ``error_for_code`` maps them to.
- The shell is thin so tests can replace its edges: ``connect(endpoint)`` returns a
  ``Connection`` (default: a zmq DEALER) and ``clock`` gives the time and sleeps
  (default: ``time.monotonic``/``time.sleep``); a fake of both runs the client with no
  socket and no wall-clock wait.

Sizes are checked before sending (``TooLarge``), types too (``TypeError``). A client is
not meant to be shared between threads; a lock serializes calls if it is.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from zkv.client.calls import DEFAULT_ENDPOINT as DEFAULT_ENDPOINT  # re-exported
from zkv.client.calls import ClientClosed as ClientClosed
from zkv.client.calls import Limits
from zkv.client.calls import check_delete_version as check_delete_version
from zkv.client.calls import check_reply as check_reply
from zkv.client.calls import check_version as check_version
from zkv.client.calls import parse_endpoints as parse_endpoints
from zkv.client.calls import status_dict as status_dict
from zkv.client.calls import to_bytes as to_bytes
from zkv.client.connection import Clock as Clock  # re-exported: the client's edges
from zkv.client.connection import Connection as Connection
from zkv.client.connection import MonotonicClock as MonotonicClock
from zkv.client.connection import ZmqConnection as ZmqConnection
from zkv.client.retry import Action, CallState, Silence, attempt_until, decide
from zkv.client.sdk_multikey import MultiKeyCalls
from zkv.client.ttl import ttl_ms, ttl_seconds
from zkv.client.watch_sync import WatchCalls
from zkv.protocol import codec
from zkv.protocol.errors import (
    RemoteProtocolError,
)
from zkv.protocol.limits import KEY_BYTES_MAX as KEY_BYTES_MAX  # re-exported (client.aio)
from zkv.protocol.limits import VALUE_BYTES_MAX as VALUE_BYTES_MAX
from zkv.protocol.messages import (
    ADMIN_REPLY_CLASSES,
    AdminReply,
    AdminRequest,
    CasReply,
    CasRequest,
    Consistency,
    DeleteReply,
    DeleteRequest,
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


class KVClient(MultiKeyCalls, WatchCalls):
    """Synchronous zkv client. See the module docstring for the retry rules; batches,
    scans and the pipeline: ``sdk_multikey.py``."""

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
        connect: Callable[[str], Connection] | None = None,
        clock: Clock | None = None,
        keys: str | os.PathLike[str] | None = None,
    ) -> None:
        """``retries``: resends allowed per call (None: as many as the deadline allows).
        ``attempt_timeout_s``: wait per attempt before a connection reset (default
        ``min(1 s, timeout)``). ``connect``/``clock``: the edges a test may replace
        (default: zmq DEALER sockets on ``context``, and the monotonic clock)."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.endpoints = parse_endpoints(endpoints)
        self.timeout_s = timeout_s
        self.retries = retries
        self.attempt_timeout_s = attempt_timeout_s
        self.consistency = Consistency(consistency)
        self.limits = Limits(key_bytes_max, value_bytes_max)
        self.client_id = os.urandom(16)
        #: Curve identity (``keys``: a client or admin dir of ``zkv keys generate``)
        curve = None if keys is None else Curve.for_identity(Path(keys))
        if connect is None:
            ctx = context or zmq.Context.instance()
            connect = lambda endpoint: ZmqConnection(ctx, endpoint, curve)  # noqa: E731
        self._connect = connect
        self._clock = clock or MonotonicClock()
        self._rng = random.Random(seed)
        self._next_request_id = 1
        self._endpoint_index = 0
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._closed = False
        #: Counters a caller (or a test) may read: attempts resent, connections reset
        #: (presumed dead), moves to another broker.
        self.resends = 0
        self.resets = 0
        self.switches = 0

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

    def put(self, key: str | bytes, value: str | bytes, *, ttl: float | None = None,
            timeout: float | None = None) -> int:
        """Store ``value``; return the key's new version. With ``ttl`` (seconds) the key
        expires that long after the shard leader received the put; without, it never
        expires (a put replaces an earlier TTL, as Redis SET does)."""
        k, v = self.limits.key(key), self.limits.value(value)
        if ttl is not None:
            ms = ttl_ms(ttl)
            reply = self._call(
                lambda rid: PutTtlRequest(self.client_id, rid, k, rid, ms, v), PutReply, timeout
            )
            return int(reply.version)
        reply = self._call(
            lambda rid: PutRequest(self.client_id, rid, k, rid, v), PutReply, timeout
        )
        return int(reply.version)

    # ------------------------------------------------------------------ TTL

    def expire(self, key: str | bytes, seconds: float, *, timeout: float | None = None) -> bool:
        """Make ``key`` expire ``seconds`` from now; False if it does not exist. The
        key's version does not change (``client/ttl.py``)."""
        k, ms = self.limits.key(key), ttl_ms(seconds)
        reply = self._call(
            lambda rid: ExpireRequest(self.client_id, rid, k, rid, ms), ExpireReply, timeout
        )
        return bool(reply.found)

    def persist(self, key: str | bytes, *, timeout: float | None = None) -> bool:
        """Remove ``key``'s expiry; False if it does not exist. Its version stays."""
        k = self.limits.key(key)
        reply = self._call(
            lambda rid: PersistRequest(self.client_id, rid, k, rid), ExpireReply, timeout
        )
        return bool(reply.found)

    def ttl(self, key: str | bytes, *, consistency: Consistency | None = None,
            timeout: float | None = None) -> float | None:
        """Seconds ``key`` has left; ``math.inf`` if it never expires; None if missing."""
        k = self.limits.key(key)
        level = self.consistency if consistency is None else Consistency(consistency)
        reply = self._call(
            lambda rid: TtlRequest(self.client_id, rid, k, level), TtlReply, timeout
        )
        return ttl_seconds(reply)

    def delete(self, key: str | bytes, *, expected_version: int | None = None,
               timeout: float | None = None) -> bool:
        """Remove ``key``; True if it was removed. With ``expected_version``, only if that
        is the key's version, decided atomically where the delete is applied."""
        return self.delete_versioned(key, expected_version=expected_version,
                                     timeout=timeout)[0]

    def delete_versioned(self, key: str | bytes, *, expected_version: int | None = None,
                         timeout: float | None = None) -> tuple[bool, int]:
        """Like ``delete`` but also return a version: the delete's own when removed,
        else the key's current one (0: it did not exist; > 0: ``expected_version``
        did not match)."""
        k = self.limits.key(key)
        expected = check_delete_version(expected_version)
        reply = self._call(
            lambda rid: DeleteRequest(self.client_id, rid, k, rid, expected), DeleteReply,
            timeout,
        )
        return bool(reply.deleted), int(reply.version)

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

    def admin(self, request: AdminRequest, *, timeout: float | None = None) -> AdminReply:
        """A ring-change admin request (``protocol.admin``) at the leader of its
        ``shard_id`` (``ops/rebalance.py``); its ``client_id`` and ``request_id`` are
        filled in here. Retried like any request: every admin request is idempotent."""
        reply = self._call(
            lambda rid: dataclasses.replace(request, client_id=self.client_id, request_id=rid),
            object, timeout,
        )
        if not isinstance(reply, ADMIN_REPLY_CLASSES):
            raise RemoteProtocolError(f"expected an admin reply, got {type(reply).__name__}")
        return reply  # type: ignore[return-value]

    def ping(self, *, timeout: float | None = None) -> str:
        """Round trip to a broker; returns its broker id."""
        reply = self._call(lambda rid: PingRequest(self.client_id, rid), PongReply, timeout)
        return str(reply.broker_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_connection()

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: never leave a socket behind
        try:
            if not self._closed:
                self._drop_connection()
        except Exception:
            pass

    @property
    def endpoint(self) -> str:
        """The endpoint the current (or next) connection goes to."""
        return self.endpoints[self._endpoint_index]

    def new_request_id(self) -> int:
        rid = self._next_request_id
        self._next_request_id += 1
        return rid

    # ------------------------------------------------------------------ machinery

    def _call(self, build: Any, expected: type, timeout: float | None,
              rid: int | None = None) -> Any:
        """One request until the retry policy says stop. ``rid``: reuse that request id
        (a batch write's next round, ``sdk_multikey.py``) instead of the next one."""
        with self._lock:
            if self._closed:
                raise ClientClosed("client is closed")
            if rid is None:
                rid = self.new_request_id()
            frames = codec.encode(build(rid))
            return check_reply(self._exchange(rid, frames, timeout), expected)

    def _exchange(self, rid: int, frames: list[bytes], timeout: float | None) -> Message:
        """Send until the retry policy says stop: its reply, or raise its error."""
        total_s = self.timeout_s if timeout is None else timeout
        state = CallState.start(rid, self._clock.now(), total_s, len(self.endpoints),
                                self._endpoint_index, self.retries)
        while True:
            conn = self._ensure_connection()
            conn.send(frames)
            until = attempt_until(state, self._clock.now(), self.attempt_timeout_s)
            reply = self._await_reply(conn, rid, until)
            outcome = Silence.CONNECTION if reply is None else reply
            decision = decide(state, outcome, self._clock.now(), self._rng)
            if decision.action is Action.DONE:
                assert decision.reply is not None
                return decision.reply
            if decision.action is Action.FAIL:
                assert decision.error is not None
                if decision.endpoint != self._endpoint_index:  # the next call moves on
                    self._drop_connection()
                    self.switches += 1
                    self._endpoint_index = decision.endpoint
                raise decision.error
            if decision.action is Action.SWITCH:
                # One connection at a time: leaving a broker closes it (linger 0).
                self._drop_connection()
                self.resets += decision.reset
                self.switches += decision.endpoint != self._endpoint_index
                self._endpoint_index = decision.endpoint
            if decision.pause_s > 0:
                self._clock.sleep(decision.pause_s)
            state = decision.state
            self.resends += 1

    def _await_reply(self, conn: Connection, rid: int, until: float) -> Message | None:
        """The reply to ``rid``, or None if none came before ``until``."""
        while True:
            frames = conn.recv(until)
            if frames is None:
                return None
            try:
                reply = codec.decode(frames)
            except RemoteProtocolError:
                continue  # garbage from the wire: drop it, keep waiting
            if getattr(reply, "request_id", None) == rid:
                return reply
            # A stale reply to an attempt we already gave up on: drop it.

    def _ensure_connection(self) -> Connection:
        if self._conn is None:
            self._conn = self._connect(self.endpoints[self._endpoint_index])
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
