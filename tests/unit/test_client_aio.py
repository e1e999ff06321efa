"""AsyncKVClient over in-memory brokers on a virtual-time loop: pipelining, retries,
broker moves, connection resets. No socket, no wall-clock wait (the real zmq edges are
covered by tests/process/test_client_zmq.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.fake_transport import (
    DROP,
    FakeAsyncConnection,
    FakeBrokerCore,
    FakeNet,
    Hook,
    run_virtual,
)
from zkv.client import AsyncKVClient, BadRequest, ClientClosed, NoLeader, Timeout, TooLarge
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply, GetRequest, PongReply, PutReply, PutRequest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(15)]

B0, B1 = "fake://b0", "fake://b1"


class Setup:
    def __init__(self, *hooks: Hook | None, broker_ids: tuple[str, ...] = ()) -> None:
        self.net = FakeNet()
        self.endpoints = [f"fake://b{i}" for i in range(max(1, len(hooks)))]
        ids = broker_ids or tuple(f"fake-b{i}" for i in range(len(self.endpoints)))
        self.brokers = [self.net.add(e, h, bid)
                        for e, h, bid in zip(self.endpoints, hooks or (None,), ids, strict=True)]

    @property
    def b(self) -> FakeBrokerCore:
        return self.brokers[0]

    def client(self, **kw: Any) -> AsyncKVClient:
        kw.setdefault("timeout_s", 2.0)
        return AsyncKVClient(self.endpoints, seed=1, connect=self.net.connect_async, **kw)


def now() -> float:
    return asyncio.get_running_loop().time()


def test_round_trip_of_every_op() -> None:
    env = Setup(None)

    async def main() -> None:
        async with env.client() as kv:
            assert await kv.get("k") is None
            v = await kv.put("k", "v")
            assert await kv.get_versioned(b"k") == (b"v", v)
            assert await kv.cas("k", v, "w") is True
            assert await kv.cas("k", v, "x") is False
            assert await kv.delete("k") is True
            assert await kv.delete("k") is False
            v2 = await kv.put("k", "v2")
            assert await kv.delete_versioned("k", expected_version=v2 + 1) == (False, v2)
            assert await kv.delete("k", expected_version=v2) is True
            assert await kv.delete_versioned("k", expected_version=v2) == (False, 0)
            with pytest.raises(ValueError):
                await kv.delete("k", expected_version=0)
            assert await kv.ping() == "fake-b0"
            assert (await kv.status())["broker_id"] == "fake-b0"
            with pytest.raises(TooLarge):
                await kv.put("k", b"x" * (1 << 20 + 1))
            with pytest.raises(TypeError):
                await kv.put(3, "v")  # type: ignore[arg-type]

    run_virtual(main())
    assert env.net.open_connections == 0


def test_thousand_concurrent_requests_on_one_connection() -> None:
    env = Setup(None)

    async def main() -> None:
        async with env.client(timeout_s=5, max_in_flight=1024) as kv:
            start = now()
            versions = await asyncio.gather(*(kv.put(f"k{i}", f"v{i}") for i in range(1000)))
            values = await asyncio.gather(*(kv.get(f"k{i}") for i in range(1000)))
            assert now() == start  # no timer ever fired
            assert sorted(versions) == list(range(1, 1001))
            assert values == [f"v{i}".encode() for i in range(1000)]
            assert kv.resends == 0 and kv.in_flight == 0

    run_virtual(main())
    assert len(env.b.idents) == 1  # one connection
    assert len({m.request_id for _, m in env.b.received}) == 2000


def test_in_flight_is_bounded_and_writes_carry_lowest_pending() -> None:
    outstanding: list[tuple[bytes, int]] = []
    peak = 0

    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        nonlocal peak
        outstanding.append((ident, msg.request_id))
        peak = max(peak, len(outstanding))
        return DROP  # answered later, by the loop below

    env = Setup(hook)

    async def main() -> None:
        async with env.client(timeout_s=5, max_in_flight=8) as kv:
            tasks = [asyncio.ensure_future(kv.put(f"k{i}", "v")) for i in range(50)]
            while not all(t.done() for t in tasks):
                await asyncio.sleep(0.01)
                for ident, rid in outstanding[:3]:  # answer the oldest few
                    conn = env.net.connection(ident)
                    assert isinstance(conn, FakeAsyncConnection)
                    conn.deliver(codec.encode(PutReply(rid, rid)))
                del outstanding[:3]
            assert sorted(t.result() for t in tasks) == list(range(1, 51))
            assert kv.resends == 0

    run_virtual(main())
    assert peak == 8
    puts = env.b.requests(PutRequest)
    assert all(p.lowest_pending <= p.request_id for p in puts)
    assert any(p.lowest_pending < p.request_id for p in puts)


def test_lost_replies_are_resent_with_same_ids_on_the_same_connection() -> None:
    # Drop the first copy of every odd request: its retry must carry the same id.
    env = Setup(lambda ident, msg, seen: DROP if msg.request_id % 2 and seen == 1 else None)

    async def main() -> None:
        async with env.client(timeout_s=3, attempt_timeout_s=0.2) as kv:
            start = now()
            versions = await asyncio.gather(*(kv.put(f"k{i}", "v") for i in range(20)))
            assert now() - start == pytest.approx(0.2)
            assert len(set(versions)) == 20
            # Even requests kept answering, so the connection was not declared dead.
            assert kv.resets == 0 and kv.resends == 10 and kv.switches == 0

    run_virtual(main())
    puts = env.b.requests(PutRequest)
    assert len(puts) == 30
    assert len(set(puts)) == 20  # the 10 retries are identical to their originals
    assert env.b.apply_count == 20
    assert len(env.b.idents) == 1


def test_connection_reset_when_everything_timed_out() -> None:
    env = Setup(lambda i, m, s: DROP, None, broker_ids=("dead", "live"))
    dead, live = env.brokers

    async def main() -> None:
        async with env.client(timeout_s=3, attempt_timeout_s=0.2) as kv:
            results = await asyncio.gather(*(kv.ping() for _ in range(10)))
            assert results == ["live"] * 10
            assert kv.resets == 1 and kv.endpoint == B1
            assert await kv.ping() == "live"

    run_virtual(main())
    assert len(dead.received) == 10 and len(live.received) == 11
    assert env.net.open_connections == 0


def test_a_deadline_of_one_attempt_still_leaves_a_silent_broker_for_the_next_call() -> None:
    """As for the sync client: a call that gives up where it would have switched sends
    the next call to the next broker."""
    env = Setup(lambda i, m, s: DROP, None, broker_ids=("dead", "live"))

    async def main() -> None:
        async with env.client(timeout_s=0.8) as kv:
            with pytest.raises(Timeout):
                await kv.ping()
            assert kv.endpoint == B1
            assert await kv.ping() == "live"

    run_virtual(main())


@pytest.mark.parametrize("code", [ErrorCode.NO_LEADER, ErrorCode.UNAVAILABLE])
def test_broker_refusal_moves_requests_to_the_next_broker_at_once(code: ErrorCode) -> None:
    """Issue 10, item 2: b0 cannot reach the nodes, b1 can."""
    env = Setup(lambda i, m, s: ErrorReply(m.request_id, code), None)
    b0, b1 = env.brokers

    async def main() -> None:
        async with env.client(timeout_s=5) as kv:
            start = now()
            versions = await asyncio.gather(*(kv.put(f"k{i}", "v") for i in range(20)))
            assert now() == start  # no pause, no wait
            assert sorted(versions) == list(range(1, 21))
            assert kv.switches == 20 and kv.resets == 0 and kv.endpoint == B1
            assert await kv.get("k3") == b"v"

    run_virtual(main())
    assert len(b0.received) == 20  # the later get went straight to b1
    assert {m for _, m in b0.received} < {m for _, m in b1.received}  # same requests
    assert b1.apply_count == 20


def test_every_broker_refusing_backs_off_then_times_out() -> None:
    refuse: Hook = lambda i, m, s: ErrorReply(m.request_id, ErrorCode.NO_LEADER)  # noqa: E731
    env = Setup(refuse, refuse)

    async def main() -> None:
        async with env.client(timeout_s=1.0) as kv:
            start = now()
            with pytest.raises(Timeout) as info:
                await kv.put("k", "v")
            assert 0.5 < now() - start <= 1.0
            assert isinstance(info.value.__cause__, NoLeader)

    run_virtual(main())
    n0, n1 = (len(b.received) for b in env.brokers)
    assert 0 <= n0 - n1 <= 1 and 8 <= n0 + n1 <= 40


def test_not_leader_retried_then_success_and_timeout() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, GetRequest) and msg.key == b"never":
            return ErrorReply(msg.request_id, ErrorCode.NO_LEADER)
        if seen <= 2:
            return ErrorReply(msg.request_id, ErrorCode.NOT_LEADER, "", "s0r2")
        return None

    env = Setup(hook)

    async def main() -> None:
        async with env.client() as kv:
            start = now()
            assert await kv.put("k", "v") == 1
            assert 0.015 <= now() - start <= 0.030  # backoff: 5-10 ms, then 10-20 ms
            start = now()
            with pytest.raises(Timeout):
                await kv.get("never", timeout=0.3)
            assert 0.1 < now() - start <= 0.3
            assert kv.resets == 0 and kv.switches == 0

    run_virtual(main())
    assert len(env.b.requests(PutRequest)) == 3


def test_timeout_and_typed_errors() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, PutRequest):
            return ErrorReply(msg.request_id, ErrorCode.BAD_REQUEST, "nope")
        return DROP

    env = Setup(hook)

    async def main() -> None:
        async with env.client(timeout_s=0.4) as kv:
            with pytest.raises(BadRequest):
                await kv.put("k", "v")
            start = now()
            with pytest.raises(Timeout):
                await kv.get("k")
            assert now() - start == pytest.approx(0.4)
        with pytest.raises(ClientClosed):
            await kv.ping()

    run_virtual(main())


def test_retries_bound_the_resends() -> None:
    env = Setup(lambda i, m, s: DROP)

    async def main() -> None:
        async with env.client(retries=2, attempt_timeout_s=0.05) as kv:
            with pytest.raises(Timeout, match="retries exhausted"):
                await kv.ping()

    run_virtual(main())
    assert len(env.b.received) == 3


def test_stale_replies_are_discarded() -> None:
    env = Setup(lambda i, m, s: [PongReply(m.request_id + 500, "stale"), [b"\xc1garbage"],
                                 PongReply(m.request_id, "real")])

    async def main() -> None:
        async with env.client() as kv:
            assert await kv.ping() == "real"

    run_virtual(main())


def test_a_late_refusal_from_a_broker_left_behind_is_ignored() -> None:
    """The request moved to b1 on b0's refusal; another error from b0 arriving while b1
    works on it must not move it again (an answer from b0 would still count)."""
    at_b0: list[bytes] = []
    at_b1: list[tuple[bytes, int]] = []

    def refuse(ident: bytes, msg: Any, seen: int) -> Any:
        at_b0.append(ident)
        return ErrorReply(msg.request_id, ErrorCode.NO_LEADER)

    def hold(ident: bytes, msg: Any, seen: int) -> Any:
        at_b1.append((ident, msg.request_id))
        return DROP

    env = Setup(refuse, hold)

    async def main() -> None:
        async with env.client(timeout_s=5) as kv:
            task = asyncio.ensure_future(kv.ping())
            await asyncio.sleep(0.01)
            ident, rid = at_b1[0]
            env.net.connection(at_b0[0]).deliver(
                codec.encode(ErrorReply(rid, ErrorCode.UNAVAILABLE)))
            await asyncio.sleep(0.01)
            assert not task.done()
            env.net.connection(ident).deliver(codec.encode(PongReply(rid, "fake-b1")))
            assert await task == "fake-b1"
            assert kv.switches == 1 and kv.resends == 1

    run_virtual(main())
    assert len(env.brokers[0].received) == 1


def test_close_fails_pending_requests() -> None:
    env = Setup(lambda i, m, s: DROP)

    async def main() -> None:
        kv = env.client(timeout_s=5)
        task = asyncio.ensure_future(kv.ping())
        await asyncio.sleep(0.1)
        await kv.close()
        with pytest.raises(ClientClosed):
            await task
        with pytest.raises(ClientClosed):
            await kv.ping()

    run_virtual(main())
    assert env.net.open_connections == 0
