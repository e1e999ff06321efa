"""The storage node's sockets: opening them, following the membership, closing them.

A mixin of ``StorageNode``. One DEALER per broker (requests in, replies out), a PUB for
heartbeats, a ROUTER for peers' messages, a DEALER per peer for ours (``_send_peer``)
and a DEALER per migration target. Rules: with a keys dir, Curve is set on every socket
and the ZAP handler starts before any bind; peer sockets follow the configuration in
force (``_sync_peers``), addresses on the command line first; sends never block: a full
or absent peer loses the message (Raft resends) rather than stalling the loop.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import zmq

from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.liveness import keep_alive
from zkv.protocol.messages import MigrateBatch, PeerMessage, WrongNode
from zkv.protocol.security import Curve, KeyFileError, TrustStore, ZapHandler, load_public
from zkv.storage_node import membership as mship
from zkv.storage_node import peer_link

if TYPE_CHECKING:
    from loguru import Logger

    from zkv.storage_node.identity import Identity
    from zkv.storage_node.node import NodeConfig
    from zkv.storage_node.node_core import NodeCore
    from zkv.storage_node.replica import Replica
    from zkv.storage_node.wal import WriteAheadLog

_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK


class NodeSockets:
    """Socket methods of ``StorageNode`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: NodeConfig
        log: Logger
        core: Replica
        node: NodeCore
        wal: WriteAheadLog
        _ctx: zmq.Context  # type: ignore[type-arg]
        _peer_conf: mship.Membership | None
        identity: Identity

    def _start_security(self) -> None:
        """With keys: our pair, the allow-lists, and the ZAP handler (before any bind)."""
        keys = self.config.keys_dir
        self.curve: Curve | None = None
        self.zap: ZapHandler | None = None
        if keys is None:
            return
        trust = TrustStore(keys)
        self.curve = Curve.for_identity(keys / "nodes" / self.config.node_id, trust.public_dir)
        self.zap = ZapHandler(self._ctx, trust, self.log)
        self.node.secure = True

    def _open_sockets(self) -> None:
        cfg, ctx = self.config, self._ctx
        ident = cfg.node_id.encode()
        alive_ms = cfg.election_timeout_ms
        self._start_security()
        curve = self.curve
        self.poller = zmq.Poller()
        self.broker_socks = []
        for endpoint in cfg.brokers:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, ident)
            s.setsockopt(zmq.LINGER, 0)
            keep_alive(s, alive_ms)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.setsockopt(zmq.RCVHWM, 100_000)
            if curve is not None:
                curve.broker_client(s, endpoint)
            s.connect(endpoint)
            self.broker_socks.append(s)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        keep_alive(self.pub, alive_ms)
        for endpoint in cfg.heartbeat_endpoints:
            if curve is not None:  # taken at connect: one server key per broker
                curve.broker_client(self.pub, endpoint)
            self.pub.connect(endpoint)
        self.peer_router = ctx.socket(zmq.ROUTER)
        self.peer_router.setsockopt(zmq.LINGER, 0)
        self.peer_router.setsockopt(zmq.RCVHWM, 100_000)
        # A restarted (or resumed) peer reconnecting under its id takes over the old
        # pipe; without this the ROUTER ignores the new connection while a stale one
        # for the same id lingers.
        self.peer_router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        keep_alive(self.peer_router, alive_ms)
        if curve is not None:
            curve.server(self.peer_router, "peer")
        self.peer_router.bind(cfg.listen)
        self.peer_socks: dict[str, zmq.Socket] = {}  # type: ignore[type-arg]
        self._peer_addrs: dict[str, str] = {}
        #: with Curve: the certificate's mtime and the key each peer socket expects
        self._peer_keys: dict[str, tuple[int, bytes]] = {}
        for peer, endpoint in cfg.peers.items():
            self.peer_socks[peer] = self._peer_socket(peer, endpoint)
            self._peer_addrs[peer] = endpoint
        #: DEALERs to other shards' nodes, for migration streams (node id -> socket)
        self.migrate_socks: dict[str, zmq.Socket] = {}  # type: ignore[type-arg]
        self._migrate_addrs: dict[str, str] = {}
        for s in self.broker_socks:
            self.poller.register(s, zmq.POLLIN)
        self.poller.register(self.peer_router, zmq.POLLIN)

    def _announce(self, s: zmq.Socket, to: str) -> None:  # type: ignore[type-arg]
        """Say in the handshake who dials and whom we mean to reach (``peer_link``)."""
        cfg = self.config
        s.setsockopt(zmq.METADATA, peer_link.Announcement(
            cfg.node_id, to, cfg.shard_id, cfg.cluster_id, self.identity.incarnation,
        ).option())

    def _peer_socket(self, peer: str, endpoint: str) -> zmq.Socket:  # type: ignore[type-arg]
        s: zmq.Socket = self._ctx.socket(zmq.DEALER)  # type: ignore[type-arg]
        s.setsockopt(zmq.IDENTITY, self.config.node_id.encode())
        s.setsockopt(zmq.LINGER, 0)
        self._announce(s, peer)
        s.setsockopt(zmq.IMMEDIATE, 1)  # drop, don't queue, while the peer is away
        keep_alive(s, self.config.election_timeout_ms)
        s.setsockopt(zmq.SNDHWM, 10_000)
        if self.curve is not None:  # the peer must present that node's key
            self._peer_keys[peer] = (self._key_stamp(peer), self.curve.node_client(s, peer))
        s.connect(endpoint)
        self.poller.register(s, zmq.POLLIN)  # only a WrongNode ever comes back on it
        return s

    def _key_stamp(self, peer: str) -> int:
        assert self.curve is not None
        try:
            return os.stat(self.curve.node_key_file(peer)).st_mtime_ns
        except OSError:
            return -1

    def _follow_peer_keys(self) -> None:
        """Once per heartbeat, with Curve: a peer whose published certificate changed
        (``zkv keys rotate``) is redialed with its new server key, so a node key can be
        replaced by restarting only its holder (README, "Key rotation")."""
        if self.curve is None:
            return
        for peer in list(self.peer_socks):
            stamp, key = self._peer_keys.get(peer, (-1, b""))
            if self._key_stamp(peer) == stamp:
                continue
            try:
                new = load_public(self.curve.node_key_file(peer))
            except KeyFileError as exc:
                self.log.warning("cannot read {}'s key ({}); keeping the old one", peer, exc)
                self._peer_keys[peer] = (self._key_stamp(peer), key)
                continue
            if new == key:
                self._peer_keys[peer] = (self._key_stamp(peer), key)
                continue
            self.log.info("{}'s key changed: redialing it with the new one", peer)
            addr = self._peer_addrs[peer]
            self._close_peer(peer)
            self.peer_socks[peer] = self._peer_socket(peer, addr)

    def _close_peer(self, peer: str) -> None:
        s = self.peer_socks.pop(peer)
        self.poller.unregister(s)
        s.close(linger=0)

    def _drain_peer_dealers(self, events: dict[Any, int], now: float) -> None:
        """Our DEALERs to peers receive only ``WrongNode`` refusals: redial on those."""
        redial = []
        for peer, sock in self.peer_socks.items():
            if sock not in events:
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                with contextlib.suppress(RemoteProtocolError):
                    msg = codec.decode(frames)
                    if type(msg) is WrongNode and self.node.on_wrong_node(peer, msg, now):
                        redial.append(peer)
        for peer in redial:
            addr = self._peer_addrs[peer]
            self._close_peer(peer)
            self.peer_socks[peer] = self._peer_socket(peer, addr)  # resolves the name again

    def close(self) -> None:
        child = getattr(self, "_snapshot_child", None)
        if child is not None:  # a snapshot half written is of no use to the next start
            child.kill()
        for s in [*self.broker_socks, self.pub, self.peer_router, *self.peer_socks.values(),
                  *self.migrate_socks.values()]:
            s.close(linger=0)
        if getattr(self, "zap", None) is not None:
            self.zap.close()  # type: ignore[union-attr]
        self.wal.close()

    def _sync_peers(self) -> None:
        """Open a socket to every member the configuration names; close removed ones."""
        conf = self.core.membership
        self._peer_conf = conf
        # the command line first: `zkv cluster up` picks new ports at each start
        wanted = {m: self.config.peers.get(m) or conf.addr_of(m)
                  for m in conf.members if m != self.config.node_id}
        for peer in [p for p in self.peer_socks if p not in wanted]:
            self._close_peer(peer)
            self._peer_addrs.pop(peer, None)
        for peer, addr in wanted.items():
            if addr and self._peer_addrs.get(peer) != addr:
                if peer in self.peer_socks:
                    self._close_peer(peer)
                self.peer_socks[peer] = self._peer_socket(peer, addr)
                self._peer_addrs[peer] = addr

    def _send_peer(self, to: str, msg: PeerMessage) -> None:
        sock = self.peer_socks.get(to)
        if sock is None:
            return
        frames = codec.encode(msg)
        try:
            if len(frames) == 1:
                sock.send(frames[0], zmq.NOBLOCK)
            else:  # part by part: cheaper than send_multipart
                sock.send(frames[0], _SNDMORE_NOBLOCK)
                sock.send(frames[1], zmq.NOBLOCK)
        except zmq.Again:
            pass  # peer away or slow: Raft tolerates loss, the leader resends

    def _send_batches(self, batches: list[tuple[str, str, MigrateBatch]]) -> None:
        """Send the core's stream batches, each on a DEALER to its target node."""
        for node, addr, batch in batches:
            sock = self.migrate_socks.get(node)
            if sock is None or self._migrate_addrs.get(node) != addr:
                if sock is not None:
                    self.poller.unregister(sock)
                    sock.close(linger=0)
                self._migrate_addrs[node] = addr
                sock = self.migrate_socks[node] = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.IDENTITY, self.config.node_id.encode())
                sock.setsockopt(zmq.LINGER, 0)
                self._announce(sock, node)
                sock.setsockopt(zmq.SNDHWM, 100)
                keep_alive(sock, self.config.election_timeout_ms)
                if self.curve is not None:
                    self.curve.node_client(sock, node)
                sock.connect(addr)
                self.poller.register(sock, zmq.POLLIN)
            with contextlib.suppress(zmq.Again):  # a slow peer: the ack timeout resends
                sock.send_multipart(codec.encode(batch), zmq.NOBLOCK)
