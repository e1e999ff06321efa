"""A storage node hands a request for another shard's key back to its broker whole
(``Redirect``), so the broker can re-route it; its own keys it serves as usual. The
test plays the broker for one real ``zkv-node`` process whose ring has shards 0 and 1."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.process.test_bad_input import NODE_ID, LoneNode
from zkv.protocol import codec
from zkv.protocol.messages import GetRequest, PutReply, PutRequest, Redirect
from zkv.protocol.ring import Ring, RingConfig

CLIENT = b"c" * 16


@pytest.fixture
def node(tmp_path: Path) -> Iterator[LoneNode]:
    n = LoneNode(tmp_path)
    n.extra_args = ("--shards", "0,1", "--vnodes", "16")
    try:
        n.start()
        n.heartbeat(30)
        n.make_leader()
        yield n
    finally:
        n.close()


def _key_of(ring: Ring, shard: int) -> bytes:
    return next(k for i in range(1000) if ring.shard_for(k := f"key-{i}".encode()) == shard)


def test_a_request_for_another_shards_key_comes_back_whole(node: LoneNode) -> None:
    ring = Ring.of([0, 1], vnodes=16)
    mine, theirs = _key_of(ring, 0), _key_of(ring, 1)
    assert isinstance(node.call(PutRequest(CLIENT, 1, mine, 1, b"v")), PutReply)

    requests = [PutRequest(CLIENT, 2, theirs, 2, b"x" * 20_000),  # value in its own frame
                GetRequest(CLIENT, 3, theirs)]
    sent = [codec.encode(r) for r in requests]
    for frames in sent:
        node.router.send_multipart([NODE_ID.encode(), b"client-a", *frames])
    items: list[tuple[bytes, ...]] = []
    deadline = time.monotonic() + 10
    while len(items) < len(requests):
        assert time.monotonic() < deadline, f"no Redirect; got {items}"
        if not node.router.poll(200):
            continue
        frames = node.router.recv_multipart()
        assert frames[1] == b"", f"answered instead of handed back: {frames[1:3]!r}"
        msg = codec.decode(frames[2:])
        assert isinstance(msg, Redirect), msg
        assert (msg.shard_id, msg.ring) == (0, RingConfig(1, (0, 1), 16))
        items.extend(msg.items)
    assert items == [(b"client-a", *frames) for frames in sent]  # exactly as they came
    assert node.alive()
    with pytest.raises(zmq.Again):
        node.router.recv_multipart(zmq.NOBLOCK)  # and nothing else: no write happened
