"""The broker's Curve side: its keys, role stamps on client idents, node ids bound to keys.

With a keys dir (``BrokerConfig.keys_dir``) every socket is Curve and the ZAP handler
admits only known keys (``protocol/security.py``). Rules: the ZAP handler starts before
any bind; a request goes to a node under its client ident prefixed with one role byte
taken from the key that sent it (``stamp``), re-read per message because a client may
choose its ident; a reply loses that byte on the way back (``unstamp``); a backend
message counts only if its connection authenticated as the node it routes under.
Besides the files, node keys are learned from the committed configurations that
trusted nodes report in their heartbeats (``learned_keys.py``, ``_learn_keys``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from zkv.broker.bad_input import WarningLimiter, discard_rest
from zkv.broker.learned_keys import LearnedKeys
from zkv.protocol.messages import Heartbeat
from zkv.protocol.security import Curve, TrustStore, ZapHandler, peer_node_id, user_id

if TYPE_CHECKING:
    from loguru import Logger

    from zkv.broker.config import BrokerConfig


class BrokerSecurity:
    """Key handling methods of ``BrokerServer`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: BrokerConfig
        log: Logger
        zap: ZapHandler | None
        backend: zmq.Socket[Any]
        _ctx: zmq.Context[zmq.Socket[Any]]
        _warn_back: WarningLimiter

    def _start_security(self) -> Curve:
        """Load our pair and the allow-lists; start the ZAP handler before any bind."""
        keys = Path(self.config.keys_dir or "")
        self.trust = TrustStore(keys)
        self.learned = LearnedKeys()
        curve = Curve.for_identity(keys / "brokers" / self.config.broker_id,
                                   self.trust.public_dir)
        self.zap = ZapHandler(self._ctx, self.trust, self.log)
        return curve

    def _learn_keys(self, sender: str | None, hb: Heartbeat) -> None:
        """A trusted node's heartbeat may name member keys of its shard's committed
        configuration: trust them (as those members) for backend and heartbeats."""
        if self.learned.report(sender, hb.node_id, hb.shard_id, hb.extra):
            keys = self.learned.keys
            self.trust.learn(keys)
            self.log.info("node keys from committed configurations (reported by {}): {}",
                          hb.node_id, sorted(keys.values()) or "none")

    def _from_node(self, node: zmq.Frame, first: zmq.Frame, now: float) -> bool:
        """Secure: a backend message counts only if its connection authenticated as the
        node whose id it routes under (ZAP admits only node keys; this binds the id)."""
        if peer_node_id(first) == node.bytes.decode(errors="replace"):
            return True
        if first.more:
            discard_rest(self.backend)
        self._warn_back.warn(now, "backend: dropped a message from {!r} authenticated as {!r}",
                             node.bytes[:64], user_id(first))
        return False


def stamp(head: zmq.Frame, client: zmq.Frame) -> bytes:
    """The client ident a secure broker forwards: one role byte (``A`` admin, ``C``
    client, from the key ZAP authenticated) + the routing id. Nodes read the role from
    it (``storage_node.node.ADMIN_STAMP``); replies come back under it and lose it in
    ``unstamp``. Per message, never cached per ident: a client may choose its ident."""
    try:
        uid = head.get("User-Id")  # inline, not user_id(): this runs per request
    except zmq.ZMQError:
        uid = None
    return (b"A" if type(uid) is str and uid.startswith("admin:") else b"C") + client.bytes


def unstamp(client: zmq.Frame | bytes) -> bytes:
    return (client if type(client) is bytes else client.bytes)[1:]  # type: ignore[union-attr]
