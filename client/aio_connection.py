"""The asyncio client's connection to one broker: what ``AsyncKVClient`` needs of it
(``AsyncConnection``) and the zmq one it uses by default (``ZmqAsyncConnection``).

Theory of operation: batching on both sides. A reader wake-up takes every reply
waiting (``recv_many``, up to ``RECV_BATCH_MAX``), and the sends of one loop iteration
are queued and flushed together, so a burst of requests reaches the broker as one
burst (one I/O-thread wake-up and one TCP write here, one read and one routing batch
there). Tests substitute in-memory connections (``tests/support/fake_transport.py``).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Protocol

import zmq

from zkv.client.connection import open_dealer
from zkv.protocol.security import Curve


class AsyncConnection(Protocol):
    """One connection to one broker, as the asyncio client needs it."""

    async def send(self, frames: list[bytes]) -> None: ...

    async def recv_many(self) -> list[list[bytes]]:
        """Every message waiting (at least one, waiting for it if need be); raises once
        the connection is closed."""

    def close(self) -> None: ...


class ConnectionClosed(Exception):
    """``recv_many`` on a connection closed under it."""


#: Replies taken per wake-up (a bound, so one busy connection cannot starve the loop),
#: and requests queued for sending while the broker's socket is full (beyond it the
#: oldest is dropped: to its request that is a lost message, which the retry policy
#: already covers).
RECV_BATCH_MAX = 1024
OUTBOX_MAX = 65536
# plain ints: pyzmq's constants are enums, and enum arithmetic costs on every message
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


class ZmqAsyncConnection:
    """A DEALER connected to one broker, closed with linger 0.

    Why not ``zmq.asyncio``: it costs a future, a callback and a task step per message.
    Here the socket is a plain one watched with ``loop.add_reader`` on its ``ZMQ_FD``:
    the reader takes *every* waiting reply per wake-up (``recv_many``), and sends are
    queued and flushed together once per loop iteration, so the requests of one
    iteration leave in one burst (the I/O thread writes them in one go and the broker
    reads them as one batch, which is what keeps its per-request cost down).

    ``ZMQ_FD`` is edge-like: any call that lets libzmq process its commands (a send,
    ``EVENTS``) may consume the signal that a message arrived. So after every flush,
    and on every wake-up, ``EVENTS`` is asked whether a message is waiting, and the
    reader is woken if so; it never waits while a message sits unread.
    """

    def __init__(self, ctx: zmq.Context[Any], endpoint: str,
                 curve: Curve | None = None) -> None:
        self._sock: zmq.Socket[Any] = open_dealer(ctx, endpoint, curve)
        self._loop = asyncio.get_running_loop()
        self._fd: int = self._sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._loop.add_reader(self._fd, self._on_readable)
        self._waiter: asyncio.Future[None] | None = None
        self._outbox: collections.deque[list[bytes]] = collections.deque()
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self.closed = False

    async def send(self, frames: list[bytes]) -> None:
        if self.closed:
            raise ConnectionClosed("send on a closed connection")
        if len(self._outbox) >= OUTBOX_MAX:
            self._outbox.popleft()
        self._outbox.append(frames)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        sock, outbox = self._sock, self._outbox
        try:
            while outbox:
                frames = outbox[0]
                sock.send_multipart(frames, _NOBLOCK, copy=len(frames[-1]) < 65536)
                outbox.popleft()
        except zmq.Again:  # the socket is full (the broker is slow or gone): retry soon
            self._flush_handle = self._loop.call_later(0.005, self._flush)
        except zmq.ZMQError:
            outbox.clear()  # closed under us: the requests' timers take over
            return
        self._wake_if_readable()

    def _on_readable(self) -> None:
        self._wake_if_readable()

    def _wake_if_readable(self) -> None:
        if self.closed:
            return
        try:
            readable = self._readable()
        except zmq.ZMQError:
            readable = True  # let the reader find out
        waiter = self._waiter
        if readable and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _readable(self) -> bool:
        """A message waits (asking lets libzmq process its commands: see above)."""
        events: Any = self._sock.getsockopt(_EVENTS)
        return bool(events & _POLLIN)

    async def recv_many(self) -> list[list[bytes]]:
        sock = self._sock
        while True:
            if self.closed:
                raise ConnectionClosed("connection closed")
            out: list[list[bytes]] = []
            while len(out) < RECV_BATCH_MAX and self._readable():
                out.append(sock.recv_multipart(_NOBLOCK))
            if out:
                return out
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._outbox.clear()
        self._loop.remove_reader(self._fd)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)  # the reader sees ``closed`` and stops
        self._sock.close(linger=0)
