"""The secure broker in-process, against hand-driven node and client sockets.

What the broker learns from a key (``broker/server.py``): a heartbeat counts only for
the node its key names, whatever the payload claims; a backend message only under the
node id its key names; and every request reaches the node under a client ident stamped
with the role of the key it came from (``A`` admin, ``C`` client), the reply finding
its way back without the stamp.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from zkv.broker.server import BrokerConfig, BrokerServer
from zkv.ops.keys import generate
from zkv.protocol import codec
from zkv.protocol.messages import (
    Heartbeat,
    PutReply,
    PutRequest,
    Role,
    StatusReply,
    StatusRequest,
)
from zkv.protocol.ring import RingConfig
from zkv.protocol.security import Curve

pytestmark = [pytest.mark.process, pytest.mark.timeout(60)]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[BrokerServer, Path, zmq.Context[Any]]]:
    keys = generate(tmp_path / "keys", ["s0r0", "s0r1"], ["b0"])
    ctx: zmq.Context[Any] = zmq.Context()
    any_port = "tcp://127.0.0.1:*"
    server = BrokerServer(BrokerConfig("b0", any_port, any_port, any_port, heartbeat_ms=50,
                                       election_timeout_ms=500, keys_dir=keys), ctx)
    server.bind()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server, keys, ctx
    finally:
        server.stop()
        thread.join(timeout=5)
        server.close()
        ctx.destroy(linger=0)  # the test's sockets too, even when it failed


def _sock(ctx: zmq.Context[Any], kind: int, keys: Path, who: str, endpoint: str,
          ident: str = "") -> zmq.Socket[Any]:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if ident:
        s.setsockopt(zmq.IDENTITY, ident.encode())
    Curve.for_identity(keys / who).broker_client(s, endpoint)
    s.connect(endpoint)
    return s


def _next_request(node: zmq.Socket[Any]) -> tuple[bytes, list[bytes]]:
    """The next client request the broker forwards to ``node``, skipping its control
    messages (``[b"", Heard]`` every heartbeat: the broker confirms it hears the node)."""
    deadline = time.monotonic() + 3
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        assert left_ms > 0 and node.poll(left_ms), "the request never reached the node"
        ident, *frames = node.recv_multipart()
        if ident:
            return ident, frames


def _heartbeat(node: str, role: Role = Role.LEADER) -> list[bytes]:
    hb = Heartbeat(node, 0, role, 3, node if role is Role.LEADER else "", 3, 10, 10, 10, 0,
                   os.getpid(), "tcp://127.0.0.1:1", ("s0r0", "s0r1"), RingConfig(1, (0,), 16), 50)
    return codec.encode(hb)  # type: ignore[arg-type]


def _status_nodes(client: zmq.Socket[Any]) -> set[str]:
    client.send_multipart(codec.encode(StatusRequest(os.urandom(16), 1)))  # type: ignore[arg-type]
    assert client.poll(3000), "no status reply"
    reply = codec.decode(client.recv_multipart())
    assert isinstance(reply, StatusReply)
    return {row["node_id"] for row in reply.nodes}


def test_node_ids_come_from_keys_and_requests_carry_roles(
        broker: tuple[BrokerServer, Path, zmq.Context[Any]]) -> None:
    server, keys, ctx = broker
    ep = server.endpoints
    impostor = _sock(ctx, zmq.PUB, keys, "nodes/s0r1", ep["heartbeats"])
    client = _sock(ctx, zmq.DEALER, keys, "client", ep["frontend"])
    admin = _sock(ctx, zmq.DEALER, keys, "admin", ep["frontend"])
    time.sleep(0.3)
    for _ in range(5):  # s0r1's key claiming to be s0r0: never recorded
        impostor.send_multipart(_heartbeat("s0r0"))
        time.sleep(0.05)
    assert "s0r0" not in _status_nodes(client)
    for _ in range(5):  # the same key as itself: recorded
        impostor.send_multipart(_heartbeat("s0r1"))
        time.sleep(0.05)
    assert _status_nodes(client) == {"s0r1"}
    # s0r1 leads shard 0: requests reach its backend connection, stamped with the role
    node = _sock(ctx, zmq.DEALER, keys, "nodes/s0r1", ep["backend"], ident="s0r1")
    time.sleep(0.3)
    for sock, stamp in ((client, b"C"), (admin, b"A")):
        impostor.send_multipart(_heartbeat("s0r1"))  # fresh: the leader is live
        time.sleep(0.05)
        put = PutRequest(os.urandom(16), 7, b"k", 0, b"v")
        sock.send_multipart(codec.encode(put))  # type: ignore[arg-type]
        ident, frames = _next_request(node)
        assert ident[:1] == stamp
        assert isinstance(codec.decode(frames), PutRequest)
        node.send_multipart([ident, *codec.encode(PutReply(7, 1))])  # type: ignore[arg-type]
        assert sock.poll(3000), "the reply never came back"
        assert codec.decode(sock.recv_multipart()) == PutReply(7, 1)
    # a backend connection whose key is not the node it routes as: its replies are dropped
    liar = _sock(ctx, zmq.DEALER, keys, "nodes/s0r0", ep["backend"], ident="s0r9")
    time.sleep(0.3)
    impostor.send_multipart(_heartbeat("s0r1"))
    time.sleep(0.05)
    client.send_multipart(codec.encode(PutRequest(os.urandom(16), 8, b"k", 0, b"v")))  # type: ignore[arg-type]
    ident, _ = _next_request(node)
    liar.send_multipart([ident, *codec.encode(PutReply(8, 666))])  # type: ignore[arg-type]
    assert not client.poll(500), "a reply from a mislabelled node got through"
    for s in (impostor, client, admin, node, liar):
        s.close(0)
