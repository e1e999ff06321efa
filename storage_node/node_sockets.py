"""The storage node's sockets: opening them, following the membership, closing them.

A mixin of ``StorageNode``. One DEALER per broker (requests in, replies out), a PUB for
heartbeats, a ROUTER for peers' messages, a DEALER per peer for ours (``_send_peer``)
and a DEALER per migration target. Rules: with a keys dir, Curve is set on every socket
and the ZAP handler starts before any bind; peer sockets follow the configuration in
force (``_sync_peers``), addresses on the command line first; sends never block: a full
or absent peer loses the message (Raft resends) rather than stalling the loop.
Node keys (``protocol/node_keys.py``): peers are trusted, and dialed, by their published
certificates plus the member keys of the shard's *committed* configuration
(``_follow_committed_config``); a member with neither is not dialed until it has one.
A dial whose handshake was refused (our key not trusted there yet) is reopened later,
since libzmq does not retry it (``refusals.py``, ``_follow_refusals``).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import zmq

from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.liveness import keep_alive
from zkv.protocol.messages import MigrateBatch, PeerMessage, WrongNode
from zkv.protocol.node_keys import (
    HEARTBEAT_FIELD,
    config_keys,
    dial_key,
    heartbeat_field,
    newest_keys,
)
from zkv.protocol.security import Curve, KeyFileError, TrustStore, ZapHandler, file_node_key
from zkv.storage_node import durable_state, peer_link
from zkv.storage_node import membership as mship
from zkv.storage_node.refusals import RefusalMonitors, RefusedDials

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
        _keys_conf: mship.Membership | None
        identity: Identity

    def _start_security(self) -> None:
        """With keys: our pair, the allow-lists, and the ZAP handler (before any bind)."""
        keys = self.config.keys_dir
        self.curve: Curve | None = None
        self.zap: ZapHandler | None = None
        #: the member keys (node id -> z85) of the committed configuration we trust
        self._conf_keys: dict[str, str] = {}
        self._monitors = RefusalMonitors()
        self._refused = RefusedDials(self.config.election_timeout_ms / 1000)
        self._saved_keys: tuple[int, dict[str, str]] | None = None
        self._no_migrate_key: set[str] = set()
        if keys is None:
            return
        try:
            self._saved_keys = durable_state.load_member_keys(self.config.data_dir)
        except durable_state.CorruptStateError as exc:
            self.log.warning("ignoring the saved member keys: {}", exc)
        self.trust = TrustStore(keys)
        self.curve = Curve.for_identity(keys / "nodes" / self.config.node_id,
                                        self.trust.public_dir)
        self.zap = ZapHandler(self._ctx, self.trust, self.log)
        self.node.secure = True
        self._follow_committed_config()  # before dialing: the keys we know at start

    def _open_sockets(self) -> None:
        cfg, ctx = self.config, self._ctx
        alive_ms = cfg.election_timeout_ms
        self._start_security()
        curve = self.curve
        self.poller = zmq.Poller()
        self.broker_socks = [self._broker_socket(i) for i in range(len(cfg.brokers))]
        self.pub = self._pub_socket()
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
            self._peer_addrs[peer] = endpoint
            s = self._peer_socket(peer, endpoint)
            if s is not None:
                self.peer_socks[peer] = s
        #: DEALERs to other shards' nodes, for migration streams (node id -> socket)
        self.migrate_socks: dict[str, zmq.Socket] = {}  # type: ignore[type-arg]
        self._migrate_addrs: dict[str, str] = {}
        for s in self.broker_socks:
            self.poller.register(s, zmq.POLLIN)
        self.poller.register(self.peer_router, zmq.POLLIN)

    def _broker_socket(self, i: int) -> zmq.Socket:  # type: ignore[type-arg]
        """Our DEALER to broker ``i`` (requests in, replies out)."""
        endpoint = self.config.brokers[i]
        s: zmq.Socket = self._ctx.socket(zmq.DEALER)  # type: ignore[type-arg]
        s.setsockopt(zmq.IDENTITY, self.config.node_id.encode())
        s.setsockopt(zmq.LINGER, 0)
        keep_alive(s, self.config.election_timeout_ms)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        if self.curve is not None:
            self.curve.broker_client(s, endpoint)
            self._monitors.watch(f"broker:{i}", s)
        s.connect(endpoint)
        return s

    def _pub_socket(self) -> zmq.Socket:  # type: ignore[type-arg]
        """Our heartbeat PUB, connected to every broker."""
        pub: zmq.Socket = self._ctx.socket(zmq.PUB)  # type: ignore[type-arg]
        pub.setsockopt(zmq.LINGER, 0)
        keep_alive(pub, self.config.election_timeout_ms)
        if self.curve is not None:
            self._monitors.watch("pub", pub)
        for endpoint in self.config.heartbeat_endpoints:
            if self.curve is not None:  # taken at connect: one server key per broker
                self.curve.broker_client(pub, endpoint)
            pub.connect(endpoint)
        return pub

    def _follow_refusals(self, now: float) -> None:
        """Once per heartbeat, with Curve: reopen, a while after, the connections whose
        server refused our key (``refusals.py``): it may trust it by now."""
        if self.curve is None:
            return
        for name in self._monitors.refused():
            self._refused.refused(name, now)
        for name in self._refused.due(now):
            kind, _, which = name.partition(":")
            self.log.info("redialing {} (it refused our key before)", name)
            if kind == "peer" and which in self.peer_socks:
                self._redial(which)
            elif kind == "broker":
                i = int(which)
                old = self.broker_socks[i]
                self._monitors.forget(name)
                self.poller.unregister(old)
                old.close(linger=0)
                self.broker_socks[i] = self._broker_socket(i)
                self.poller.register(self.broker_socks[i], zmq.POLLIN)
            elif kind == "pub":
                self._monitors.forget(name)
                self.pub.close(linger=0)
                self.pub = self._pub_socket()

    def _announce(self, s: zmq.Socket, to: str) -> None:  # type: ignore[type-arg]
        """Say in the handshake who dials and whom we mean to reach (``peer_link``)."""
        cfg = self.config
        s.setsockopt(zmq.METADATA, peer_link.Announcement(
            cfg.node_id, to, cfg.shard_id, cfg.cluster_id, self.identity.incarnation,
        ).option())

    def _peer_socket(self, peer: str, endpoint: str) -> zmq.Socket | None:  # type: ignore[type-arg]
        """A DEALER to ``peer``; with Curve, None while we know no key of it."""
        key = self._peer_key(peer) if self.curve is not None else None
        if self.curve is not None and key is None:
            self.log.warning("no key for {}: not in public/nodes nor in the committed "
                             "configuration; not dialing it yet", peer)
            return None
        s: zmq.Socket = self._ctx.socket(zmq.DEALER)  # type: ignore[type-arg]
        s.setsockopt(zmq.IDENTITY, self.config.node_id.encode())
        s.setsockopt(zmq.LINGER, 0)
        self._announce(s, peer)
        s.setsockopt(zmq.IMMEDIATE, 1)  # drop, don't queue, while the peer is away
        keep_alive(s, self.config.election_timeout_ms)
        s.setsockopt(zmq.SNDHWM, 10_000)
        if self.curve is not None and key is not None:  # the peer must present that key
            self.curve.client(s, key)
            self._peer_keys[peer] = (self._key_stamp(peer), key)
            self._monitors.watch(f"peer:{peer}", s)
        s.connect(endpoint)
        # Not polled: only a WrongNode ever comes back on it (``_drain_peer_dealers``,
        # once a heartbeat). Each zmq socket in the poll set costs two mailbox checks
        # (getpid + poll) per turn, before and after the wait.
        return s

    def _key_stamp(self, peer: str) -> int:
        assert self.curve is not None
        try:
            return os.stat(self.curve.node_key_file(peer)).st_mtime_ns
        except OSError:
            return -1

    def _peer_key(self, peer: str) -> bytes | None:
        """The key ``peer`` must present: its certificate's, else its configured one."""
        assert self.curve is not None
        try:
            published = file_node_key(self.curve.public_dir, peer)
        except KeyFileError as exc:
            self.log.warning("cannot read {}'s certificate: {}", peer, exc)
            published = None
        return dial_key(published, self._conf_keys.get(peer, ""))

    def _follow_peer_keys(self) -> None:
        """Once per heartbeat, with Curve: a peer whose published certificate changed
        (``zkv keys rotate``), or whose configured key did, is redialed with its new
        server key, so a node key can be replaced by restarting only its holder
        (README, "Key rotation")."""
        if self.curve is None:
            return
        for peer in list(self.peer_socks):
            stamp, key = self._peer_keys.get(peer, (-1, b""))
            now_stamp = self._key_stamp(peer)
            if now_stamp == stamp and (stamp != -1 or key == self._conf_keys.get(peer, "").encode()):
                continue
            new = self._peer_key(peer)
            if new is None or new == key:  # none to be had: keep the one we have
                self._peer_keys[peer] = (now_stamp, key)
                continue
            self.log.info("{}'s key changed: redialing it with the new one", peer)
            self._redial(peer)

    def _redial(self, peer: str) -> None:
        addr = self._peer_addrs[peer]
        self._close_peer(peer)
        s = self._peer_socket(peer, addr)  # resolves the name again
        if s is not None:
            self.peer_socks[peer] = s

    def _follow_committed_config(self) -> None:
        """When the committed configuration changes, with Curve: trust exactly its member
        keys besides the files (a removed member's key is dropped), dial the members we
        could not dial before, and say the keys in our heartbeat for the brokers."""
        index, conf = self.core.committed_membership()
        if conf is self._keys_conf:
            return
        self._keys_conf = conf
        if self.curve is None:
            return
        saved = self._saved_keys
        index, keys = newest_keys((index, dict(conf.keys)), saved)
        self.node.keys_extra = {HEARTBEAT_FIELD: heartbeat_field(index, keys.items())}
        if keys == self._conf_keys:
            return
        self.log.info("trusting the member keys of the configuration committed at index "
                      "{}: {}", index, sorted(keys) or "none")
        self._conf_keys = keys
        self.trust.learn(config_keys(keys.items()))
        if saved is None or index > saved[0]:
            self._saved_keys = (index, keys)
            try:
                durable_state.save_member_keys(self.config.data_dir, index, keys)
            except OSError as exc:  # trusted in memory all the same; tried again next time
                self.log.warning("cannot save the member keys: {}", exc)
        if hasattr(self, "peer_socks"):  # sockets open: dial whom we now can
            self._sync_peers()

    def _close_peer(self, peer: str) -> None:
        self._monitors.forget(f"peer:{peer}")
        self._refused.forget(f"peer:{peer}")
        s = self.peer_socks.pop(peer)
        s.close(linger=0)

    def _drain_peer_dealers(self, now: float) -> None:
        """Our DEALERs to peers receive only ``WrongNode`` refusals: redial on those.

        Called once a heartbeat interval, not polled: a refusal waits at most that long
        (redials are rate-limited to far less often anyway), and the loop's every turn
        is spared two mailbox checks per peer."""
        redial = []
        for peer, sock in self.peer_socks.items():
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
            self._redial(peer)

    def close(self) -> None:
        child = getattr(self, "_snapshot_child", None)
        if child is not None:  # a snapshot half written is of no use to the next start
            child.kill()
        self._monitors.close()
        syncer = getattr(self, "_syncer", None)
        if syncer is not None:
            syncer.close()  # the sync in flight finishes; wal.close() syncs the rest
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
        for peer in [p for p in self._peer_addrs if p not in wanted]:
            if peer in self.peer_socks:
                self._close_peer(peer)
            self._peer_addrs.pop(peer, None)
        for peer, addr in wanted.items():
            # a member we could not dial (no key yet) is tried again at each call
            if addr and (self._peer_addrs.get(peer) != addr or peer not in self.peer_socks):
                if peer in self.peer_socks:
                    self._close_peer(peer)
                self._peer_addrs[peer] = addr
                s = self._peer_socket(peer, addr)
                if s is not None:
                    self.peer_socks[peer] = s

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

    def _migrate_key(self, node: str) -> bytes | None:
        """Another shard's node is dialed with its published certificate only (its
        shard's configuration is not ours); None, said once per node, if it has none."""
        assert self.curve is not None
        try:
            key = file_node_key(self.curve.public_dir, node)
        except KeyFileError as exc:
            key, why = None, str(exc)
        else:
            why = "no certificate in public/nodes"
        if key is None and node not in self._no_migrate_key:
            self._no_migrate_key.add(node)
            self.log.warning("cannot stream to {}: {}; waiting for one", node, why)
        return key

    def _send_batches(self, batches: list[tuple[str, str, MigrateBatch]]) -> None:
        """Send the core's stream batches, each on a DEALER to its target node."""
        for node, addr, batch in batches:
            sock = self.migrate_socks.get(node)
            if sock is None or self._migrate_addrs.get(node) != addr:
                key = self._migrate_key(node) if self.curve is not None else None
                if self.curve is not None and key is None:
                    continue  # the stream waits (its ack timeout resends) for a certificate
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
                if self.curve is not None and key is not None:
                    self.curve.client(sock, key)
                sock.connect(addr)
                self.poller.register(sock, zmq.POLLIN)
            with contextlib.suppress(zmq.Again):  # a slow peer: the ack timeout resends
                sock.send_multipart(codec.encode(batch), zmq.NOBLOCK)
