"""The broker's liveness side: heartbeats in; campaigns, ``Heard`` and logs out.

A mixin of ``BrokerServer``. Heartbeats from the SUB socket go to the node table (with
keys, only a heartbeat whose key names its node counts, and the member keys it reports
are learned: ``learned_keys.py``). Once per heartbeat interval,
``housekeeping`` ticks the table (expiry, leader changes) and the failure detector,
sends the campaign requests it decides and ``Heard`` to every node heard lately (a
leader that no broker confirms steps down: ``failure_detector.py``), logs what changed
and publishes the stats. Sends never block: a full or unknown pipe misses one round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zmq

from zkv.broker.bad_input import WarningLimiter
from zkv.broker.node_table import HeartbeatRefused, LeaderChange, RingAdopted, TableEvent
from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import Heartbeat
from zkv.protocol.security import peer_node_id

if TYPE_CHECKING:
    from loguru import Logger

    from zkv.broker.config import BrokerConfig
    from zkv.broker.failure_detector import FailureDetector
    from zkv.broker.node_table import NodeTable
    from zkv.broker.router import Router
    from zkv.broker.stats import BrokerStats

_NOBLOCK = zmq.NOBLOCK
_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK


class BrokerLiveness:
    """Heartbeat and housekeeping methods of ``BrokerServer`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: BrokerConfig
        log: Logger
        table: NodeTable
        detector: FailureDetector
        router: Router
        stats: BrokerStats
        heartbeats: zmq.Socket[Any]
        backend: zmq.Socket[Any]
        secure: bool
        rerouted: int
        replies_dropped: int
        _rejected_reported: int
        _warn_back: WarningLimiter
        _warn_hb: WarningLimiter
        _warn_front: WarningLimiter

        def _log_reroutes(self, now: float) -> None: ...
        def _expire_fanouts(self, now: float) -> None: ...

        def _learn_keys(self, sender: str | None, hb: Heartbeat) -> None: ...

    def _drain_heartbeats(self, now: float) -> None:
        recv = self.heartbeats.recv_multipart
        observe = self.table.observe
        for _ in range(self.config.batch_max):
            sender = None
            try:
                if self.secure:
                    frames = recv(_NOBLOCK, copy=False)
                    sender = peer_node_id(frames[0])
                    msg = [f.bytes for f in frames]
                else:
                    msg = recv(_NOBLOCK)
            except zmq.Again:
                return
            try:
                hb = codec.decode(msg)
            except RemoteProtocolError as exc:
                self._warn_hb.warn(now, "heartbeats: undecodable message: {}", exc)
                continue
            if type(hb) is not Heartbeat:
                self._warn_hb.warn(now, "heartbeats: ignored a {}", type(hb).__name__)
                continue
            if self.secure and sender != hb.node_id:  # the key names the node, not the payload
                self._warn_hb.warn(now, "heartbeats: {!r} claims to be {!r}: ignored",
                                   sender, hb.node_id[:64])
                continue
            if self.secure:
                self._learn_keys(sender, hb)
            try:
                observe(hb, now)
            except Exception as exc:  # a table bug must not take the broker down
                self._warn_hb.warn(now, "heartbeats: cannot record {}: {!r}", hb.node_id[:64], exc)

    def housekeeping(self, now: float) -> None:
        """Expire liveness, log what changed, send the campaign requests decided now."""
        self._log_events(self.table.tick(now), now)
        for order in self.detector.tick(self.table, now):
            self.stats.campaigns += 1
            c = order.campaign
            self.log.info(
                "shard {} has no leader ({}): asking {} to campaign above term {}",
                c.shard_id, order.reason, order.node_id, c.term,
            )  # fmt: skip
            try:
                self.backend.send_multipart([order.ident, b"", *codec.encode(c)], _NOBLOCK)
            except zmq.ZMQError as exc:
                self._warn_back.warn(now, "cannot send campaign to {}: {}", order.node_id, exc)
        self._confirm(now)
        router = self.router
        if router.rejected != self._rejected_reported:
            self._warn_front.warn(
                now, "frontend: refused {} requests (last: {})",
                router.rejected - self._rejected_reported, router.last_rejection,
            )  # fmt: skip
            self._rejected_reported = router.rejected
        self._log_reroutes(now)
        for limiter in (self._warn_back, self._warn_hb, self._warn_front):
            limiter.flush(now)
        self.stats.timer.expire(now)
        self._expire_fanouts(now)  # batches and scans a node never answered (fanout.py)
        self.stats.publish(router, self.table, self.replies_dropped, self.rerouted)

    def _confirm(self, now: float) -> None:
        """``Heard`` to every node heard lately: a leader none confirms steps down
        (failure_detector.py). A node whose pipe is full or gone misses one round."""
        send = self.backend.send
        for order in self.detector.confirmations(self.table, now):
            try:
                send(order.ident, _SNDMORE_NOBLOCK)
            except zmq.ZMQError:
                continue  # unknown routing id (not connected) or pipe full
            send(b"", _SNDMORE_NOBLOCK)
            send(codec.encode(order.heard)[0], _NOBLOCK)

    def _log_events(self, events: list[TableEvent], now: float) -> None:
        for ev in events:
            if isinstance(ev, LeaderChange):
                if ev.leader_id:
                    self.stats.leader_changes += 1
                    self.log.info(
                        "shard {} leader is {} at term {}", ev.shard_id, ev.leader_id, ev.term
                    )
                else:
                    self.log.info("shard {} has no live leader (last term {})", ev.shard_id, ev.term)
            elif isinstance(ev, RingAdopted):
                cfg = ev.config
                self.log.info(
                    "adopted ring epoch {}: shards {} x {} vnodes",
                    cfg.epoch, list(cfg.shards), cfg.vnodes,
                )  # fmt: skip
            elif isinstance(ev, HeartbeatRefused):
                self._warn_hb.warn(now, "heartbeat from {!r} refused: {}", ev.node_id, ev.reason)
