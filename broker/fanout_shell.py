"""The broker's side of batches and scans that touches sockets (a mixin of ``BrokerServer``).

The decisions are ``fanout.py``'s; this only moves frames: a client's batch or scan
header is decoded (``BAD_REQUEST`` if it does not decode) and handed to the fan-out
table; its parts leave on the backend, one message per shard, at once; a part's reply
(single or inside a ``ReplyBatch``) is recognised by its ident (``is_part_ident``),
decoded, the ring it may carry adopted (only from a node we route to, as for a
``Redirect``), and handed back to the table; merged answers go to the client. A part
that cannot be sent (unknown node, full pipe) is answered to the table at once as
``NO_LEADER`` / ``UNAVAILABLE``, like a single request that cannot be forwarded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zmq

from zkv.broker.fanout import PART_IDENT_BYTES, FanOutput, FanOutTable
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode, RemoteProtocolError
from zkv.protocol.messages import ErrorReply
from zkv.protocol.multikey import FANOUT_MAGIC, FANOUT_REQUEST_CLASSES, MultiReply, ScanReply

if TYPE_CHECKING:
    from zkv.broker.bad_input import WarningLimiter
    from zkv.broker.node_table import NodeTable
    from zkv.broker.router import Router
    from zkv.broker.stats import BrokerStats

_NOBLOCK = zmq.NOBLOCK
_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK
_MAGIC_LEN = len(FANOUT_MAGIC)


class FanOutShell:
    """Batch and scan methods of ``BrokerServer`` (which provides the rest)."""

    if TYPE_CHECKING:
        table: NodeTable
        router: Router
        stats: BrokerStats
        backend: zmq.Socket[Any]
        secure: bool
        fanout: FanOutTable
        part_ident_len: int
        _warn_back: WarningLimiter

        def _reply(self, client: zmq.Frame | bytes, frames: list[bytes]) -> None: ...

    def is_part_ident(self, ident: bytes) -> bool:
        """Whether a reply's client ident names one of our fan-out parts."""
        off = 1 if self.secure else 0
        return len(ident) == PART_IDENT_BYTES + off and ident[off:off + _MAGIC_LEN] == FANOUT_MAGIC

    def _fan_out(self, client: zmq.Frame | bytes, header: bytes, now: float) -> None:
        cid = client if type(client) is bytes else client.bytes  # type: ignore[union-attr]
        try:
            req = codec.decode([header])
        except RemoteProtocolError as exc:
            self._reply(cid, self.router.error(codec.request_id_of(header),
                                               ErrorCode.BAD_REQUEST, str(exc)))
            return
        if not isinstance(req, FANOUT_REQUEST_CLASSES):  # the router checked the type
            return
        table = self.table
        stamp = cid[:1] if self.secure else b""
        out = self.fanout.start(cid, stamp, req, now, table.ring, table.leaders,  # type: ignore[arg-type]
                                table.replicas)
        self._emit(out, now)

    def _on_part_reply(self, node: bytes, ident: bytes, frames: list[bytes], now: float) -> None:
        try:
            reply = codec.decode(frames)
        except RemoteProtocolError as exc:
            self._warn_back.warn(now, "backend: undecodable batch part reply: {}", exc)
            return
        ring = getattr(reply, "ring", None) if isinstance(reply, (MultiReply, ScanReply)) else None
        if ring is not None and node.decode(errors="replace") in self.table.nodes:
            try:
                self.table.adopt_ring(ring)
            except Exception as exc:  # a table bug must not take the broker down
                self._warn_back.warn(now, "backend: cannot adopt a part reply's ring: {!r}", exc)
        part = ident[1:] if self.secure else ident
        out = self.fanout.on_reply(part, reply, now, self.table.ring, self.table.leaders)
        self._emit(out, now)

    def _expire_fanouts(self, now: float) -> None:
        if len(self.fanout):
            self._emit(self.fanout.expire(now), now)

    def _emit(self, out: FanOutput, now: float) -> None:
        # a part that cannot leave is answered at once, which may finish the fan-out and
        # add replies; so drain until nothing is left to do
        while out.sends or out.replies:
            replies, out.replies = out.replies, []
            for client, frames in replies:
                self._reply(client, frames)
            sends, out.sends = out.sends, []
            for node, ident, frames in sends:
                failed = self._send_part(node, ident, frames, now)
                if failed is not None:
                    more = self.fanout.on_reply(ident[1:] if self.secure else ident,
                                                failed, now, self.table.ring, self.table.leaders)
                    out.sends.extend(more.sends)
                    out.replies.extend(more.replies)

    def _send_part(self, node: bytes, ident: bytes, frames: list[bytes],
                   now: float) -> ErrorReply | None:
        send = self.backend.send
        try:
            send(node, _SNDMORE_NOBLOCK)
        except zmq.ZMQError as exc:
            code = ErrorCode.NO_LEADER if exc.errno == zmq.EHOSTUNREACH else ErrorCode.UNAVAILABLE
            return ErrorReply(0, code, f"cannot forward to {node.decode(errors='replace')}")
        send(ident, _SNDMORE_NOBLOCK)
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            send(frame, _NOBLOCK if i == last else _SNDMORE_NOBLOCK)
        self.stats.timer.sent(node, 1, now)
        return None
