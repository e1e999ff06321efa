"""The broker's backend drain: node replies relayed to their clients, part by part.

A mixin of ``BrokerServer`` (which provides the sockets, the security checks, the
node-control and fan-out handlers). Replies are never decoded: ``[node, client,
reply...]`` streams through frame by frame to the frontend (the client's routing id
unstamped under Curve); an empty client frame is node control (``node_control.py``), a
part id is a batch's or scan's part (``fanout_shell.py``); a client that is gone loses
its reply. Each node's replies are timed once per drain (``stats.timer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zmq

from zkv.broker.bad_input import discard_rest
from zkv.broker.server_security import unstamp
from zkv.protocol.drain import more_waiting

if TYPE_CHECKING:
    from zkv.broker.bad_input import WarningLimiter
    from zkv.broker.config import BrokerConfig
    from zkv.broker.stats import BrokerStats

_NOBLOCK = zmq.NOBLOCK
_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK


class BackendRelay:
    """Backend methods of ``BrokerServer`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: BrokerConfig
        backend: zmq.Socket[Any]
        frontend: zmq.Socket[Any]
        stats: BrokerStats
        secure: bool
        replies_dropped: int
        part_ident_len: int
        _warn_back: WarningLimiter

        def _from_node(self, node: zmq.Frame, client: zmq.Frame, now: float) -> bool: ...
        def _on_node_control(self, node: zmq.Frame, frame: zmq.Frame, now: float) -> None: ...
        def is_part_ident(self, ident: bytes) -> bool: ...
        def _on_part_reply(self, node: bytes, ident: bytes, frames: list[bytes],
                           now: float) -> None: ...

    def _drain_backend(self, now: float) -> None:
        # Replies stream through part by part, never decoded: [node, client, reply...].
        answered: dict[bytes, int] = {}  # single replies per node, timed once per drain
        try:
            self._drain_backend_into(now, answered)
        finally:
            stats = self.stats
            for node, n in answered.items():
                stats.timer.answered(node, n, now)
                stats.relayed += n

    def _drain_backend_into(self, now: float, answered: dict[bytes, int]) -> None:
        sock = self.backend
        recv = sock.recv
        send = self.frontend.send
        for i in range(self.config.batch_max):
            if i == 1 and not more_waiting(sock):
                return  # a lone reply: no empty receive's exception (protocol/drain.py)
            try:
                node = recv(_NOBLOCK, False)
            except zmq.Again:
                return
            if not node.more:
                self._warn_back.warn(now, "backend: dropped a bare routing id {!r}", node.bytes[:64])
                continue
            client = recv(_NOBLOCK, False)
            if self.secure and not self._from_node(node, client, now):
                continue
            if client.more and not len(client):
                self._on_node_control(node, recv(_NOBLOCK, False), now)
                continue
            if not client.more or not len(client):
                parts = 2 + discard_rest(sock) if client.more else 2
                self._warn_back.warn(
                    now, "backend: dropped a {}-frame message from {!r} without a client",
                    parts, node.bytes[:64],
                )  # fmt: skip
                continue
            part = recv(_NOBLOCK, False)
            ident = node.bytes
            answered[ident] = answered.get(ident, 0) + 1
            if len(client) == self.part_ident_len and self.is_part_ident(client.bytes):
                # a batch's or scan's part: merged here (fanout_shell.py)
                frames = [part.bytes]
                while part.more:
                    part = recv(_NOBLOCK, False)
                    frames.append(part.bytes)
                self._on_part_reply(ident, client.bytes, frames, now)
                continue
            try:
                send(unstamp(client) if self.secure else client, _SNDMORE_NOBLOCK)
            except zmq.ZMQError:  # the client is gone: drop its reply
                self.replies_dropped += 1
                if part.more:
                    discard_rest(sock)
                continue
            while part.more:
                send(part, _SNDMORE_NOBLOCK)
                part = recv(_NOBLOCK, False)
            send(part, _NOBLOCK)

