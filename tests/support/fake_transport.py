"""In-memory brokers, connections and clocks for the SDK's unit tests: no socket, no wait.

- ``FakeBrokerCore`` answers requests from a dict, like a broker in front of one shard.
  ``hook(ident, msg, seen)`` may override an answer: return ``DROP`` to send nothing, a
  message (or a list of messages / raw frame lists) to send instead, or ``None`` for the
  default answer. ``seen`` counts how many times this (client_id, request_id) arrived,
  retries included. Writes are deduplicated like a node does: a retried write gets the
  reply remembered for its (client_id, request_id). ``tests/support/fake_broker.py`` runs
  the same core behind a real ROUTER socket.
- ``FakeNet`` maps endpoints to cores and hands out connections: ``net.connect`` for
  ``KVClient(connect=...)`` and ``net.connect_async`` for ``AsyncKVClient(connect=...)``.
  Each connection has its own identity (a ROUTER would give each socket one). Frames
  sent to an endpoint without a broker vanish.
- ``FakeClock`` is the sync client's clock: it moves only when the client sleeps or waits
  for a reply that is not there (then it jumps to the end of the wait).
- ``VirtualClockLoop`` is an asyncio loop whose time jumps to the next timer whenever it
  would block, so timeouts and backoffs of the asyncio client cost no wall-clock time;
  ``run_virtual(coro)`` runs a coroutine on one.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import selectors
from collections.abc import Callable, Coroutine
from typing import Any

from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    CasReply,
    CasRequest,
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
from zkv.protocol.ring import RingConfig

DROP = object()
Hook = Callable[[bytes, Any, int], Any]


class FakeBrokerCore:
    def __init__(self, hook: Hook | None = None, broker_id: str = "fake-b0") -> None:
        self.hook = hook
        self.broker_id = broker_id
        self.data: dict[bytes, tuple[bytes, int]] = {}
        self.version = 0
        self.received: list[tuple[bytes, Any]] = []
        self.seen: dict[tuple[bytes, int], int] = {}
        self.applied: dict[tuple[bytes, int], Message] = {}
        self.apply_count = 0
        self.status_nodes: tuple[dict[str, Any], ...] = ()
        self.ring: RingConfig | None = RingConfig(1, (0,), 256)

    def handle(self, ident: bytes, frames: list[bytes]) -> list[list[bytes]]:
        """The reply frames to send back for one request (none for a drop)."""
        msg = codec.decode(frames)
        self.received.append((ident, msg))
        key = (getattr(msg, "client_id", b""), getattr(msg, "request_id", -1))
        self.seen[key] = seen = self.seen.get(key, 0) + 1
        out = self.hook(ident, msg, seen) if self.hook else None
        if out is DROP:
            return []
        if out is None:
            out = [self.answer(msg)]
        elif not isinstance(out, list):
            out = [out]
        return [item if isinstance(item, list) else codec.encode(item) for item in out]

    def answer(self, msg: Any) -> Message:
        if isinstance(msg, (PutRequest, DeleteRequest, CasRequest)):
            key = (msg.client_id, msg.request_id)
            if key not in self.applied:
                self.applied[key] = self._apply(msg)
            return self.applied[key]
        return self._read(msg)

    def _apply(self, msg: Any) -> Message:
        self.apply_count += 1
        self.version += 1
        if isinstance(msg, PutRequest):
            self.data[msg.key] = (msg.value, self.version)
            return PutReply(msg.request_id, self.version)
        if isinstance(msg, DeleteRequest):
            found = self.data.get(msg.key)
            if found is None:
                return DeleteReply(msg.request_id, False, 0)
            if msg.expected_version and found[1] != msg.expected_version:
                return DeleteReply(msg.request_id, False, found[1])
            del self.data[msg.key]
            return DeleteReply(msg.request_id, True, self.version)
        current = self.data.get(msg.key, (b"", 0))[1]
        if current != msg.expected_version:
            return CasReply(msg.request_id, False, current)
        self.data[msg.key] = (msg.value, self.version)
        return CasReply(msg.request_id, True, self.version)

    def _read(self, msg: Any) -> Message:
        if isinstance(msg, GetRequest):
            found = self.data.get(msg.key)
            if found is None:
                return GetReply(msg.request_id, False, 0, b"")
            return GetReply(msg.request_id, True, found[1], found[0])
        if isinstance(msg, StatusRequest):
            return StatusReply(msg.request_id, self.broker_id, self.status_nodes, self.ring)
        if isinstance(msg, PingRequest):
            return PongReply(msg.request_id, self.broker_id)
        return ErrorReply(msg.request_id, ErrorCode.BAD_REQUEST, "unexpected")

    def requests(self, kind: type) -> list[Any]:
        return [m for _, m in self.received if isinstance(m, kind)]

    @property
    def idents(self) -> set[bytes]:
        return {ident for ident, _ in self.received}


class FakeClock:
    """The sync client's clock (``now``/``sleep``); moves only when told."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s
        self.slept: list[float] = []

    def now(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now_s += seconds

    def advance_to(self, when: float) -> None:
        self.now_s = max(self.now_s, when)


class FakeNet:
    """Endpoints -> broker cores, and the connections clients open to them."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.brokers: dict[str, FakeBrokerCore] = {}
        self.connections: list[FakeConnection | FakeAsyncConnection] = []
        self._idents = itertools.count(1)

    def add(self, endpoint: str, hook: Hook | None = None,
            broker_id: str = "fake-b0") -> FakeBrokerCore:
        core = self.brokers[endpoint] = FakeBrokerCore(hook, broker_id)
        return core

    def connect(self, endpoint: str) -> FakeConnection:
        conn = FakeConnection(self, endpoint, self._ident())
        self.connections.append(conn)
        return conn

    def connect_async(self, endpoint: str) -> FakeAsyncConnection:
        conn = FakeAsyncConnection(self, endpoint, self._ident())
        self.connections.append(conn)
        return conn

    def exchange(self, endpoint: str, ident: bytes, frames: list[bytes]) -> list[list[bytes]]:
        broker = self.brokers.get(endpoint)
        return [] if broker is None else broker.handle(ident, list(frames))

    def connection(self, ident: bytes) -> FakeConnection | FakeAsyncConnection:
        return next(c for c in self.connections if c.ident == ident)

    @property
    def open_connections(self) -> int:
        return sum(not c.closed for c in self.connections)

    def _ident(self) -> bytes:
        return b"conn-%d" % next(self._idents)


class FakeConnection:
    """``client.sdk.Connection`` in memory: replies wait in an inbox until received."""

    def __init__(self, net: FakeNet, endpoint: str, ident: bytes) -> None:
        self.net, self.endpoint, self.ident = net, endpoint, ident
        self.inbox: collections.deque[list[bytes]] = collections.deque()
        self.closed = False

    def send(self, frames: list[bytes]) -> None:
        assert not self.closed, "send on a closed connection"
        self.inbox.extend(self.net.exchange(self.endpoint, self.ident, frames))

    def recv(self, until: float) -> list[bytes] | None:
        assert not self.closed, "recv on a closed connection"
        if self.inbox:
            return self.inbox.popleft()
        self.net.clock.advance_to(until)  # nothing will come: the wait runs out
        return None

    def deliver(self, frames: list[bytes]) -> None:
        self.inbox.append(frames)

    def close(self) -> None:
        self.closed = True


class ConnectionClosed(Exception):
    pass


class FakeAsyncConnection:
    """``client.aio.AsyncConnection`` in memory, on the running loop."""

    def __init__(self, net: FakeNet, endpoint: str, ident: bytes) -> None:
        self.net, self.endpoint, self.ident = net, endpoint, ident
        self.inbox: asyncio.Queue[list[bytes] | None] = asyncio.Queue()
        self.closed = False

    async def send(self, frames: list[bytes]) -> None:
        assert not self.closed, "send on a closed connection"
        for reply in self.net.exchange(self.endpoint, self.ident, frames):
            self.inbox.put_nowait(reply)

    async def recv_many(self) -> list[list[bytes]]:
        """Every reply waiting, at least one (what ``ZmqAsyncConnection`` does)."""
        frames = None if self.closed else await self.inbox.get()
        out = []
        while frames is not None:
            out.append(frames)
            frames = self.inbox.get_nowait() if not self.inbox.empty() else None
        if not out or self.closed:
            raise ConnectionClosed(self.endpoint)
        return out

    def deliver(self, frames: list[bytes]) -> None:
        self.inbox.put_nowait(frames)

    def close(self) -> None:
        self.closed = True
        self.inbox.put_nowait(None)  # wake the reader


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """Whenever the loop would wait for its next timer, time jumps there instead."""

    def __init__(self) -> None:
        super().__init__(selectors.SelectSelector())
        self.now_s = 0.0
        real_select = self._selector.select  # type: ignore[attr-defined]

        def select(timeout: float | None = None) -> Any:
            if timeout is not None and timeout > 0:
                self.now_s += timeout
                return real_select(0)
            return real_select(timeout)

        self._selector.select = select  # type: ignore[attr-defined]

    def time(self) -> float:
        return self.now_s


def run_virtual(coro: Coroutine[Any, Any, Any], timeout_s: float = 60.0) -> Any:
    """Run ``coro`` on a ``VirtualClockLoop``; ``timeout_s`` is virtual time."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(asyncio.wait_for(coro, timeout_s))
