"""What nodes send the broker besides single replies: reply batches and redirects.

A mixin of ``BrokerServer``. ``[node, b"", ReplyBatch]`` is fanned out to its clients
as it arrives (hot path: one send per frame, nothing decoded but the batch).
``[node, b"", Redirect]``: a node hands back, whole, the requests it refused because its
ring gives the key to another shard (``WRONG_SHARD``). The table adopts the node's ring
if newer (only from a node we route to: a stray peer must not pin a bogus epoch), the
router decides each item again (``Router.reroute``: the new owner, or ``WRONG_SHARD`` to
the client if the ring still names the refusing shard), and the items are forwarded the
way the frontend forwards. Counts (``rerouted``, ``router.wrong_shard``) are logged at
most every ``REROUTE_LOG_INTERVAL_S``, never per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zmq

from zkv.broker.bad_input import WarningLimiter, discard_rest
from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import Redirect, ReplyBatch

if TYPE_CHECKING:
    from loguru import Logger

    from zkv.broker.node_table import NodeTable
    from zkv.broker.router import Router
    from zkv.broker.stats import BrokerStats

#: At most one INFO line of re-routing counts per this many seconds (a ring change can
#: redirect every request for a while; a line per request or per tick would flood).
REROUTE_LOG_INTERVAL_S = 10.0

_NOBLOCK = zmq.NOBLOCK
_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK


class NodeControl:
    """Control-message methods of ``BrokerServer`` (which provides the rest)."""

    if TYPE_CHECKING:
        log: Logger
        table: NodeTable
        router: Router
        stats: BrokerStats
        frontend: zmq.Socket[Any]
        backend: zmq.Socket[Any]
        secure: bool
        rerouted: int
        replies_dropped: int
        _warn_back: WarningLimiter
        _reroutes_reported: tuple[int, int]
        _reroutes_logged_at: float

        def _reply(self, client: zmq.Frame | bytes, frames: list[bytes]) -> None: ...
        def is_part_ident(self, ident: bytes) -> bool: ...
        def _on_part_reply(
            self, node: bytes, ident: bytes, frames: list[bytes], now: float
        ) -> None: ...
        def _forward_batch(
            self, node: bytes, items: list[tuple[bytes, ...]], now: float
        ) -> None: ...
        def _batch_or_send(
            self, node: bytes, item: tuple[bytes, ...],
            batches: dict[bytes, list[tuple[bytes, ...]]], now: float,
        ) -> None: ...

    def _on_node_control(self, node: zmq.Frame, part: zmq.Frame, now: float) -> None:
        """``[node, b"", ReplyBatch]``: fan the replies out to their clients;
        ``[node, b"", Redirect]``: route the refused requests again."""
        if part.more:
            discard_rest(self.backend)
            self._warn_back.warn(now, "backend: dropped an over-long control message")
            return
        try:
            batch = codec.decode([part.bytes])
        except RemoteProtocolError as exc:
            self._warn_back.warn(now, "backend: undecodable control message: {}", exc)
            return
        if type(batch) is not ReplyBatch:
            if type(batch) is Redirect:
                self._on_redirect(node, batch, now)
            else:
                self._warn_back.warn(now, "backend: ignored a {} from a node", type(batch).__name__)
            return
        stats = self.stats
        stats.timer.answered(node.bytes, len(batch.items), now)
        stats.relayed += len(batch.items)
        send = self.frontend.send
        secure = self.secure
        for item in batch.items:
            if len(item) < 2 or not item[0]:
                self._warn_back.warn(now, "backend: dropped a malformed batched reply")
                continue
            if self.is_part_ident(item[0]):  # a batch's or scan's part: fanout_shell.py
                self._on_part_reply(node.bytes, item[0], list(item[1:]), now)
                continue
            try:
                send(item[0][1:] if secure else item[0], _SNDMORE_NOBLOCK)
            except zmq.ZMQError:  # the client is gone: drop its reply
                self.replies_dropped += 1
                continue
            last = len(item) - 1
            for i in range(1, last):
                send(item[i], _SNDMORE_NOBLOCK)
            send(item[last], _NOBLOCK)

    def _on_redirect(self, node: zmq.Frame, redirect: Redirect, now: float) -> None:
        """Adopt the refusing node's ring if newer, then forward each refused request
        where the router now sends it, or answer its client. Batched per node like the
        frontend, with large values sent alone and each node's order kept."""
        # Only a node we route to (so have heard) may move the ring: a stray peer on the
        # backend must not pin a bogus epoch that no heartbeat could ever replace.
        if node.bytes.decode(errors="replace") in self.table.nodes:
            try:
                self.table.adopt_ring(redirect.ring)
            except Exception as exc:  # a table bug must not take the broker down
                self._warn_back.warn(now, "backend: cannot adopt a Redirect's ring: {!r}", exc)
        else:
            self._warn_back.warn(
                now, "backend: Redirect from unknown node {!r}: ring ignored", node.bytes[:64]
            )
        # handed back, not answered: retired unobserved (the re-forward is timed anew)
        self.stats.timer.answered(node.bytes, len(redirect.items), now, observe=False)
        reroute = self.router.reroute
        refused_by = redirect.shard_id
        batches: dict[bytes, list[tuple[bytes, ...]]] = {}
        try:
            for item in redirect.items:
                try:
                    dest = reroute(item, refused_by, now)
                except Exception as exc:  # a router bug must not take the broker down
                    self._warn_back.warn(now, "backend: cannot re-route a request: {!r}", exc)
                    continue
                if isinstance(dest, bytes):
                    self.rerouted += 1
                    self._batch_or_send(dest, item, batches, now)
                elif dest is not None:
                    self._reply(item[0], dest)
                # else: nobody to answer; the router counted it in ``rejected``
        finally:
            for dest, items in batches.items():
                self._forward_batch(dest, items, now)

    def _log_reroutes(self, now: float) -> None:
        counts = (self.rerouted, self.router.wrong_shard)
        if counts == self._reroutes_reported:
            return
        if now - self._reroutes_logged_at < REROUTE_LOG_INTERVAL_S:
            return
        (rerouted, wrong), (rerouted_0, wrong_0) = counts, self._reroutes_reported
        self.log.info(
            "re-routed {} requests refused by a node as another shard's, answered {} "
            "WRONG_SHARD (totals {} and {})",
            rerouted - rerouted_0, wrong - wrong_0, rerouted, wrong,
        )  # fmt: skip
        self._reroutes_reported = counts
        self._reroutes_logged_at = now
