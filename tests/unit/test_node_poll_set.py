"""The node loop's poll set holds only the sockets that carry its work.

libzmq's ``zmq_poll`` checks every zmq socket's mailbox (``getpid`` + ``poll``) before
and after it waits, so each socket in the set costs every turn of the loop. The DEALERs
a node dials its peers with only ever receive a ``WrongNode`` refusal: they are drained
once a heartbeat instead (one put at a time on 1 x 3: 110-114 -> 92-95 syscalls per put
on the leader, 51 -> 42 on a follower)."""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from zkv.protocol import codec
from zkv.protocol.messages import WrongNode
from zkv.protocol.ring import RingConfig
from zkv.storage_node.fsync_policy import FsyncPolicy
from zkv.storage_node.node import NodeConfig, StorageNode

WAIT_S = 5.0


def _node(data_dir: Path, peers: dict[str, str]) -> StorageNode:
    cfg = NodeConfig("a", 0, data_dir, "tcp://127.0.0.1:0", "tcp://127.0.0.1:1", peers,
                     (), (), RingConfig(1, (0,), 16), FsyncPolicy.parse("never"),
                     background_snapshots=False)
    return StorageNode(cfg)


def test_peer_dealers_are_not_in_the_poll_set(tmp_path: Path) -> None:
    node = _node(tmp_path, {"b": "tcp://127.0.0.1:1", "c": "tcp://127.0.0.1:2"})
    node._open_sockets()
    try:
        polled = {sock for sock, _ in node.poller.sockets}
        assert set(node.peer_socks) == {"b", "c"}
        assert not polled & set(node.peer_socks.values())
        assert node.peer_router in polled
        assert all(s in polled for s in node.broker_socks)
    finally:
        node.close()


def test_a_wrong_node_refusal_is_drained_once_a_heartbeat_and_redials(tmp_path: Path) -> None:
    """The refusal still works: what the stranger at b's address answers is read by the
    heartbeat's drain, and the node redials b (a new socket)."""
    ctx = zmq.Context.instance()
    stranger = ctx.socket(zmq.ROUTER)
    stranger.setsockopt(zmq.ROUTER_MANDATORY, 1)
    stranger.setsockopt(zmq.LINGER, 0)
    port = stranger.bind_to_random_port("tcp://127.0.0.1")
    node = _node(tmp_path, {"b": f"tcp://127.0.0.1:{port}"})
    node._open_sockets()
    try:
        first = node.peer_socks["b"]
        refusal = codec.encode(WrongNode("x", 7, "zkv", "this address is x's now"))
        deadline = time.monotonic() + WAIT_S
        while True:  # the DEALER's handshake must be done before a ROUTER can answer it
            try:
                stranger.send_multipart([b"a", *refusal])
                break
            except zmq.ZMQError:
                assert time.monotonic() < deadline, "the node never connected"
                time.sleep(0.01)
        while node.peer_socks["b"] is first:
            assert time.monotonic() < deadline, "the refusal was never read"
            node._drain_peer_dealers(time.monotonic())
            time.sleep(0.01)
        assert any("reached x" in note and "redialing b" in note for note in node.node.notes)
    finally:
        node.close()
        stranger.close(linger=0)
