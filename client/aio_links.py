"""The asyncio client's connections: one per broker, its reader, and requests moved
between them. A mixin of ``AsyncKVClient`` (``aio.py``: the calls and the retry loop).

- A link is opened on first use of a broker and read by one task, which resolves the
  future of the request each reply answers (a stale error from a broker a request has
  left is dropped; an answer is taken from anywhere).
- ``_switch`` moves a request (and new ones) to another broker; with ``reset`` it
  closes the link and wakes every request waiting on it to be resent at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from zkv.client.aio_connection import AsyncConnection
from zkv.client.calls import ClientClosed
from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import ErrorReply

_TIMED_OUT = object()  # an attempt's timer fired
_RESEND = object()  # the connection was reset: resend now


class _Link:
    """A connection to broker ``endpoint``, its reader, and when it last heard anything."""

    __slots__ = ("endpoint", "conn", "reader", "last_reply_at", "closed")

    def __init__(self, endpoint: int, conn: AsyncConnection) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.reader: asyncio.Task[None] | None = None
        self.last_reply_at = -1.0
        self.closed = False


class _Pending:
    __slots__ = ("future", "frames", "sent_at", "endpoint", "link")

    def __init__(self, future: asyncio.Future[Any], endpoint: int) -> None:
        self.future = future
        self.frames: list[bytes] = []
        self.sent_at = 0.0
        self.endpoint = endpoint
        self.link: _Link | None = None



class AsyncLinks:
    """Link methods of ``AsyncKVClient`` (which provides the rest)."""

    if TYPE_CHECKING:
        endpoints: Sequence[str]
        switches: int
        resets: int
        _closed: bool
        _endpoint_index: int
        _links: dict[int, _Link]
        _pending: dict[int, _Pending]
        _connect: Callable[[str], AsyncConnection]

    def _switch(self, pending: _Pending, link: _Link, endpoint: int, reset: bool) -> None:
        """Move ``pending`` (and new requests) to broker ``endpoint``; with ``reset``,
        close ``link`` and move every request waiting on it too, to be resent at once."""
        self.switches += endpoint != pending.endpoint
        pending.endpoint = endpoint
        self._endpoint_index = endpoint
        if not reset or link.closed:
            return
        self.resets += 1
        self._drop_link(link)
        for p in self._pending.values():
            if p.link is link:
                p.endpoint = endpoint
                if not p.future.done():
                    p.future.set_result(_RESEND)

    async def _send(self, pending: _Pending) -> None:
        if self._closed:
            raise ClientClosed("client is closed")
        link = self._links.get(pending.endpoint)
        if link is None:
            link = self._open_link(pending.endpoint)
        pending.link = link
        pending.sent_at = asyncio.get_running_loop().time()
        await link.conn.send(pending.frames)

    def _open_link(self, endpoint: int) -> _Link:
        loop = asyncio.get_running_loop()
        link = _Link(endpoint, self._connect(self.endpoints[endpoint]))
        link.reader = loop.create_task(self._read(link))
        self._links[endpoint] = link
        return link

    async def _read(self, link: _Link) -> None:
        """A connection's reader: resolve the future of the request each reply answers."""
        loop = asyncio.get_running_loop()
        pending, decode = self._pending, codec.decode
        while True:
            try:
                batch = await link.conn.recv_many()
            except (asyncio.CancelledError, Exception):
                return  # closed under us
            link.last_reply_at = loop.time()
            for frames in batch:
                try:
                    reply = decode(frames)
                except RemoteProtocolError:
                    continue
                p = pending.get(getattr(reply, "request_id", -1))
                if p is None or p.future.done():
                    continue
                # An error from a broker the request has left is stale; an answer is not.
                if p.link is link or not isinstance(reply, ErrorReply):
                    p.future.set_result(reply)

    def _drop_link(self, link: _Link) -> None:
        link.closed = True
        if self._links.get(link.endpoint) is link:
            del self._links[link.endpoint]
        if link.reader is not None:
            link.reader.cancel()
        link.conn.close()

    async def _close_link(self, link: _Link) -> None:
        reader = link.reader
        self._drop_link(link)
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(_TIMED_OUT)
