"""AsyncKVClient against a fake broker thread: pipelining, retries, socket resets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support.fake_broker import DROP, FakeBroker, broker  # noqa: F401
from zkv.client import AsyncKVClient, BadRequest, ClientClosed, Timeout, TooLarge
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply, GetRequest, PongReply, PutRequest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(15)]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_round_trip_of_every_op(broker: FakeBroker) -> None:  # noqa: F811
    async def main() -> None:
        async with AsyncKVClient(broker.endpoint, timeout_s=2) as kv:
            assert await kv.get("k") is None
            v = await kv.put("k", "v")
            assert await kv.get_versioned(b"k") == (b"v", v)
            assert await kv.cas("k", v, "w") is True
            assert await kv.cas("k", v, "x") is False
            assert await kv.delete("k") is True
            assert await kv.ping() == "fake-b0"
            assert (await kv.status())["broker_id"] == "fake-b0"
            with pytest.raises(TooLarge):
                await kv.put("k", b"x" * (1 << 20 + 1))
            with pytest.raises(TypeError):
                await kv.put(3, "v")  # type: ignore[arg-type]

    run(main())


def test_thousand_concurrent_requests_on_one_socket(broker: FakeBroker) -> None:  # noqa: F811
    async def main() -> None:
        async with AsyncKVClient(broker.endpoint, timeout_s=5, max_in_flight=1024) as kv:
            start = time.monotonic()
            versions = await asyncio.gather(*(kv.put(f"k{i}", f"v{i}") for i in range(1000)))
            values = await asyncio.gather(*(kv.get(f"k{i}") for i in range(1000)))
            assert time.monotonic() - start < 5
            assert sorted(versions) == list(range(1, 1001))
            assert values == [f"v{i}".encode() for i in range(1000)]
            assert kv.resends == 0 and kv.in_flight == 0

    run(main())
    assert len({ident for ident, _ in broker.received}) == 1  # one socket
    rids = [m.request_id for _, m in broker.received]
    assert len(set(rids)) == 2000


def test_in_flight_is_bounded() -> None:
    peak = 0
    outstanding: set[int] = set()

    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        nonlocal peak
        outstanding.add(msg.request_id)
        peak = max(peak, len(outstanding))
        return DROP  # answered later, by the test loop below

    async def main() -> None:
        async with AsyncKVClient(b.endpoint, timeout_s=5, max_in_flight=8) as kv:
            tasks = [asyncio.ensure_future(kv.ping()) for _ in range(50)]
            while not all(t.done() for t in tasks):
                await asyncio.sleep(0.01)
                for rid in list(outstanding):
                    outstanding.discard(rid)
                    ident = b.received[-1][0]
                    b.sock.send_multipart([ident, *_pong(rid)])
            assert all(t.result() == "fake-b0" for t in tasks)

    with FakeBroker(hook) as b:
        run(main())
    assert peak <= 8


def _pong(rid: int) -> list[bytes]:
    from zkv.protocol import codec

    return codec.encode(PongReply(rid, "fake-b0"))


def test_lost_replies_are_resent_with_same_ids() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        # Drop the first copy of every odd request: its retry must carry the same id.
        return DROP if msg.request_id % 2 and seen == 1 else None

    async def main() -> None:
        async with AsyncKVClient(b.endpoint, timeout_s=3, attempt_timeout_s=0.2) as kv:
            versions = await asyncio.gather(*(kv.put(f"k{i}", "v") for i in range(20)))
            assert len(set(versions)) == 20
            # Even requests kept answering, so the socket was not declared dead.
            assert kv.resets == 0 and kv.resends == 10

    with FakeBroker(hook) as b:
        run(main())
        puts = b.requests(PutRequest)
        assert len(puts) == 30
        assert len(set(puts)) == 20  # the 10 retries are identical to their originals
        assert b.apply_count == 20


def test_socket_reset_when_everything_timed_out() -> None:
    async def main() -> None:
        endpoints = [dead.endpoint, live.endpoint]
        async with AsyncKVClient(endpoints, timeout_s=3, attempt_timeout_s=0.2) as kv:
            results = await asyncio.gather(*(kv.ping() for _ in range(10)))
            assert results == ["live"] * 10
            assert kv.resets == 1

    with FakeBroker(lambda i, m, s: DROP) as dead, FakeBroker(broker_id="live") as live:
        run(main())
        assert len(dead.received) == 10 and len(live.received) == 10


def test_not_leader_retried_then_success_and_timeout() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, GetRequest) and msg.key == b"never":
            return ErrorReply(msg.request_id, ErrorCode.NO_LEADER)
        if seen <= 2:
            return ErrorReply(msg.request_id, ErrorCode.NOT_LEADER, "", "s0r2")
        return None

    async def main() -> None:
        async with AsyncKVClient(b.endpoint, timeout_s=2) as kv:
            assert await kv.put("k", "v") == 1
            start = time.monotonic()
            with pytest.raises(Timeout):
                await kv.get("never", timeout=0.3)
            assert time.monotonic() - start < 1.0

    with FakeBroker(hook) as b:
        run(main())
        assert len(b.requests(PutRequest)) == 3


def test_timeout_and_typed_errors() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, PutRequest):
            return ErrorReply(msg.request_id, ErrorCode.BAD_REQUEST, "nope")
        return DROP

    async def main() -> None:
        async with AsyncKVClient(b.endpoint, timeout_s=0.4) as kv:
            with pytest.raises(BadRequest):
                await kv.put("k", "v")
            start = time.monotonic()
            with pytest.raises(Timeout):
                await kv.get("k")
            assert 0.35 < time.monotonic() - start < 1.0
        with pytest.raises(ClientClosed):
            await kv.ping()

    with FakeBroker(hook) as b:
        run(main())


def test_stale_replies_are_discarded() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        return [PongReply(msg.request_id + 500, "stale"), [b"\xc1garbage"],
                PongReply(msg.request_id, "real")]

    async def main() -> None:
        async with AsyncKVClient(b.endpoint, timeout_s=2) as kv:
            assert await kv.ping() == "real"

    with FakeBroker(hook) as b:
        run(main())


def test_close_fails_pending_requests() -> None:
    async def main() -> None:
        kv = AsyncKVClient(b.endpoint, timeout_s=5)
        task = asyncio.ensure_future(kv.ping())
        await asyncio.sleep(0.1)
        await kv.close()
        with pytest.raises(ClientClosed):
            await task

    with FakeBroker(lambda i, m, s: DROP) as b:
        run(main())
