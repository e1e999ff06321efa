"""The SDK's real zmq edges (``ZmqConnection``, ``ZmqAsyncConnection``) end to end, over
TCP on 127.0.0.1 against a fake broker thread (``tests/support/fake_broker.py``). The
retry rules themselves are unit-tested in memory (tests/unit/test_client_*.py); these
tests keep what only real sockets show: Lazy Pirate resets give a new ROUTER identity,
silence moves to the next broker, stale and garbage frames are dropped, one asyncio
socket carries a thousand requests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import zmq

from tests.support.fake_broker import DROP, FakeBroker, broker  # noqa: F401
from zkv.client import AsyncKVClient, KVClient
from zkv.client.cli import main
from zkv.protocol import codec
from zkv.protocol.messages import PingRequest, PongReply, PutReply, PutRequest

pytestmark = [pytest.mark.process, pytest.mark.timeout(30)]


def test_fake_broker_answers_raw_zmq(broker: FakeBroker) -> None:  # noqa: F811
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 2000)
    s.connect(broker.endpoint)
    try:
        s.send_multipart(codec.encode(PingRequest(b"c" * 16, 7)))
        reply = codec.decode(s.recv_multipart())
        assert reply == PongReply(7, "fake-b0")
    finally:
        s.close()


def test_sync_round_trips_and_stale_frames_over_zmq(broker: FakeBroker) -> None:  # noqa: F811
    with KVClient(broker.endpoint, timeout_s=5) as kv:
        v = kv.put("k", b"\x00" * 100_000)  # a large value takes the zero-copy path
        assert kv.get_versioned("k") == (b"\x00" * 100_000, v)
        assert kv.cas("k", v, "w") is True and kv.delete("k") is True
        assert kv.ping() == "fake-b0" and kv.status()["broker_id"] == "fake-b0"

    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        return [PongReply(msg.request_id + 1000, "stale"), PutReply(msg.request_id - 1, 9),
                [b"not msgpack at all"], PongReply(msg.request_id, "real")]

    with FakeBroker(hook) as b, KVClient(b.endpoint, timeout_s=5) as kv:
        assert kv.ping() == "real" and kv.ping() == "real"


def test_lazy_pirate_reset_opens_a_new_socket() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        return DROP if seen == 1 else None

    with FakeBroker(hook) as b, KVClient(b.endpoint, timeout_s=5, attempt_timeout_s=0.2) as kv:
        kv.put("k", "v")
        assert kv.get("k") == b"v"
        puts = b.requests(PutRequest)
        assert len(puts) == 2 and puts[0] == puts[1] and b.apply_count == 1
        assert kv.resets == 2
        assert len(b.idents) == 3  # each retry on a fresh socket: a new ROUTER identity


def test_silence_moves_to_the_next_broker() -> None:
    with FakeBroker(lambda i, m, s: DROP) as dead, FakeBroker(broker_id="live") as live:
        with KVClient([dead.endpoint, live.endpoint], timeout_s=3,
                      attempt_timeout_s=0.2) as kv:
            assert kv.ping() == "live"
            assert kv.endpoint == live.endpoint
        assert len(dead.received) == 1 and len(live.received) == 1


def test_bad_endpoint_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--endpoint", "nonsense", "get", "k"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zkv: error: cannot connect to 'nonsense'") and err.count("\n") == 1


def test_async_thousand_requests_on_one_socket(broker: FakeBroker) -> None:  # noqa: F811
    async def main() -> None:
        async with AsyncKVClient(broker.endpoint, timeout_s=10) as kv:
            versions = await asyncio.gather(*(kv.put(f"k{i}", f"v{i}") for i in range(1000)))
            values = await asyncio.gather(*(kv.get(f"k{i}") for i in range(1000)))
            assert sorted(versions) == list(range(1, 1001))
            assert values == [f"v{i}".encode() for i in range(1000)]
            assert kv.resends == 0 and kv.in_flight == 0

    asyncio.run(asyncio.wait_for(main(), 20))
    assert len(broker.idents) == 1


def test_async_reset_when_everything_timed_out() -> None:
    async def main() -> None:
        endpoints = [dead.endpoint, live.endpoint]
        async with AsyncKVClient(endpoints, timeout_s=3, attempt_timeout_s=0.2) as kv:
            results = await asyncio.gather(*(kv.ping() for _ in range(10)))
            assert results == ["live"] * 10
            assert kv.resets == 1

    with FakeBroker(lambda i, m, s: DROP) as dead, FakeBroker(broker_id="live") as live:
        asyncio.run(asyncio.wait_for(main(), 20))
        assert len(dead.received) == 10 and len(live.received) == 10


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_async_connection_batches_sends_and_drains_replies(loop_kind: str) -> None:
    """``ZmqAsyncConnection`` against a raw ROUTER: the sends of one loop iteration
    leave together, one wake-up takes every waiting reply, and replies that arrive while
    requests are being flushed (libzmq may take the fd's signal during a send) are never
    left unread: the reader does not stall."""
    from zkv.client.aio_connection import ConnectionClosed, ZmqAsyncConnection

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    n = 2000

    async def main() -> list[int]:
        conn = ZmqAsyncConnection(ctx, f"tcp://127.0.0.1:{port}")
        batches: list[int] = []
        try:
            for i in range(n):  # one loop iteration: flushed as one burst
                await conn.send([b"%d" % i])
            await asyncio.sleep(0)
            echoed = 0
            while echoed < n:  # the peer echoes in bursts while we keep sending
                while router.poll(0):
                    ident, body = router.recv_multipart()
                    router.send_multipart([ident, body])
                    echoed += 1
                await asyncio.sleep(0)
            got = 0
            while got < n:
                batch = await asyncio.wait_for(conn.recv_many(), 5)
                batches.append(len(batch))
                got += len(batch)
                if got < n // 2:
                    await conn.send([b"more"])  # a flush between wake-ups
            assert got == n
        finally:
            conn.close()
        with pytest.raises(ConnectionClosed):
            await conn.recv_many()
        return batches

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        batches = uvloop.run(asyncio.wait_for(main(), 20))
    else:
        batches = asyncio.run(asyncio.wait_for(main(), 20))
    router.close(linger=0)
    assert sum(batches) == n and len(batches) < n // 10, batches  # many replies per wake-up
