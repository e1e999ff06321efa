"""SimBroker: the production broker cores in a tiny shell on the simulated network.

``NodeTable`` (heartbeats, liveness, leaders, the ring), ``FailureDetector`` (whom to
ask to campaign) and ``Router`` (where a client's frames go) are the broker's own code;
this shell does what ``broker/server.py`` does with its sockets:

- a node's ``Heartbeat`` -> ``table.observe``; every ``heartbeat_ms``: ``table.tick``,
  then ``detector.tick`` and a ``Campaign`` frame to each node it names, then a
  ``Heard`` frame to each node ``detector.confirmations`` names;
- a client's ``[header(, blob)]`` -> ``router.route([client, ...])``: forwarded to the
  node it names as ``[client, header(, blob)]``, or its reply frames back to the client;
- a node's ``[client, reply...]`` -> the client; ``[b"", ReplyBatch]`` -> each item to
  its client; ``[b"", Redirect]`` -> adopt the node's ring if newer (only from a node the
  table knows), then ``router.reroute`` each item.

Requests go one by one rather than in ``RequestBatch``es: the simulated network has no
per-message cost to save, and the node core handles both forms alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zkv.broker.failure_detector import FailureDetector
from zkv.broker.node_table import NodeTable
from zkv.broker.router import Router
from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import Heartbeat, Redirect, ReplyBatch

if TYPE_CHECKING:
    from tests.sim.cluster import World


class OwnReply(list[bytes]):
    """Frames the broker answered itself (it forwarded nothing): how the simulator's
    clients tell the broker's own ``NO_LEADER`` (the request reached no node) from a
    node's, which the broker relays like any reply (a node answers ``NO_LEADER`` for a
    write it proposed and then lost on stepping down: it may still commit)."""


class SimBroker:
    def __init__(self, world: World, addr: str = "broker") -> None:
        self.world = world
        self.addr = addr
        cfg = world.cfg
        self.table = NodeTable(cfg.election_timeout_ms / 1000)
        self.detector = FailureDetector(addr, cfg.heartbeat_ms, cfg.election_timeout_ms)
        self.router = Router(self.table, addr)
        self.campaigns = 0
        #: False: behave like a broker older than the availability rule (no ``Heard``)
        self.confirms = True
        self.rerouted = 0
        self._hb_s = cfg.heartbeat_ms / 1000
        world.at(self._hb_s, self._check)

    def leader(self, shard_id: int = 0) -> str:
        return self.table.leader_of(shard_id) or ""

    def deliver(self, src: str, msg: Any) -> None:
        w = self.world
        if type(msg) is Heartbeat:
            self.table.observe(msg, w.now)
        elif src in w.nodes or src in w.retired:  # a stopped node's last frames too
            self._from_node(src, msg)
        else:
            self._route(src.encode(), msg)

    def _route(self, client: bytes, frames: list[bytes]) -> None:
        w = self.world
        item = [client, *frames]
        dest = self.router.route(item, w.now)
        if isinstance(dest, bytes):
            w.net.send(self.addr, dest.decode(), item, w.now)
        elif dest is not None:
            w.net.send(self.addr, client.decode(), OwnReply(dest), w.now)

    def _from_node(self, node: str, frames: list[bytes]) -> None:
        w = self.world
        if frames[0] != b"":
            w.net.send(self.addr, frames[0].decode(), frames[1:], w.now)
            return
        try:
            msg = codec.decode(frames[1:])
        except RemoteProtocolError:
            w.violation(f"{node} sent the broker undecodable control frames")
            return
        if type(msg) is ReplyBatch:
            for item in msg.items:
                w.net.send(self.addr, item[0].decode(), list(item[1:]), w.now)
        elif type(msg) is Redirect:
            self._on_redirect(node, msg)

    def _on_redirect(self, node: str, redirect: Redirect) -> None:
        w = self.world
        if node in self.table.nodes:
            self.table.adopt_ring(redirect.ring)
        for item in redirect.items:
            dest = self.router.reroute(item, redirect.shard_id, w.now)
            if isinstance(dest, bytes):
                self.rerouted += 1
                w.net.send(self.addr, dest.decode(), list(item), w.now)
            elif dest is not None:
                w.net.send(self.addr, item[0].decode(), OwnReply(dest), w.now)

    def _check(self) -> None:
        w = self.world
        w.at(w.now + self._hb_s, self._check)
        self.table.tick(w.now)
        for order in self.detector.tick(self.table, w.now):
            self.campaigns += 1
            w.net.send(self.addr, order.node_id, [b"", *codec.encode(order.campaign)], w.now)
        if self.confirms:
            for heard in self.detector.confirmations(self.table, w.now):
                w.net.send(self.addr, heard.node_id, [b"", *codec.encode(heard.heard)], w.now)
