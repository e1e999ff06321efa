"""TTL in the SDKs (sync and asyncio), the CLI and the gateway, against a fake broker
that answers TTL requests: what goes on the wire and what a caller gets back."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from tests.support.fake_transport import FakeClock, FakeNet, run_virtual
from zkv.client import AsyncKVClient, KVClient
from zkv.client.cli import build_parser
from zkv.client.ttl import ttl_ms
from zkv.gateway.kv import KVHandlers
from zkv.protocol.messages import (
    ExpireReply,
    ExpireRequest,
    PersistRequest,
    PutReply,
    PutTtlRequest,
    TtlReply,
    TtlRequest,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(15)]

EP = "fake://b0"


def _hook(_ident: bytes, msg: Any, _seen: int) -> Any:
    """A one-key store: "k" exists at version 7, expires in 1.5 s until persisted."""
    if isinstance(msg, PutTtlRequest):
        return PutReply(msg.request_id, 9)
    if isinstance(msg, (ExpireRequest, PersistRequest)):
        return ExpireReply(msg.request_id, msg.key == b"k", 7 if msg.key == b"k" else 0)
    if isinstance(msg, TtlRequest):
        if msg.key == b"k":
            return TtlReply(msg.request_id, True, 7, True, 1500)
        if msg.key == b"forever":
            return TtlReply(msg.request_id, True, 3, False, 0)
        return TtlReply(msg.request_id, False, 0, False, 0)
    return None


def test_ttl_seconds_become_whole_milliseconds_rounded_up() -> None:
    assert ttl_ms(1) == 1000 and ttl_ms(0.0001) == 1 and ttl_ms(1.0005) == 1001
    for bad in (0, -1, float("nan"), float("inf"), 10**12):
        with pytest.raises(ValueError):
            ttl_ms(bad)
    for wrong in ("1", None, True):
        with pytest.raises(TypeError):
            ttl_ms(wrong)


def test_sync_client() -> None:
    net = FakeNet(FakeClock())
    broker = net.add(EP, _hook, "b0")
    with KVClient([EP], seed=1, connect=net.connect, clock=net.clock, timeout_s=2) as kv:
        assert kv.put("k", "v", ttl=2.5) == 9
        assert kv.expire("k", 10) is True and kv.expire("nope", 10) is False
        assert kv.persist("k") is True and kv.persist("nope") is False
        assert kv.ttl("k") == 1.5 and kv.ttl("forever") == math.inf and kv.ttl("nope") is None
        kv.put("plain", "v")  # no ttl: the plain put, as before
    (put,) = broker.requests(PutTtlRequest)
    assert (put.key, put.ttl_ms, put.value) == (b"k", 2500, b"v")
    assert [r.ttl_ms for r in broker.requests(ExpireRequest)] == [10_000, 10_000]


def test_async_client() -> None:
    net = FakeNet()
    broker = net.add(EP, _hook, "b0")

    async def main() -> None:
        async with AsyncKVClient([EP], seed=1, connect=net.connect_async, timeout_s=2) as kv:
            got = await asyncio.gather(kv.put("k", "v", ttl=0.25), kv.expire("k", 1),
                                       kv.persist("nope"), kv.ttl("k"), kv.ttl("nope"))
            assert got == [9, True, False, 1.5, None]

    run_virtual(main())
    assert broker.requests(PutTtlRequest)[0].ttl_ms == 250


def test_cli_parses_ttl_commands() -> None:
    p = build_parser()
    a = p.parse_args(["put", "k", "v", "--ttl", "1.5"])
    assert a.ttl == 1.5
    assert p.parse_args(["put", "k", "v"]).ttl is None
    assert p.parse_args(["expire", "k", "30"]).seconds == 30
    assert p.parse_args(["persist", "k"]).key == "k"
    assert p.parse_args(["ttl", "k", "--consistency", "stale"]).consistency == "stale"
    with pytest.raises(SystemExit):
        p.parse_args(["expire", "k", "0"])


class _FakeAsync:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def put(self, key: str, value: bytes, ttl: float | None = None) -> int:
        self.calls.append(("put", ttl))
        return 5


def test_gateway_put_with_ttl() -> None:
    fake = _FakeAsync()
    h = KVHandlers(lambda: fake)  # type: ignore[arg-type,return-value]

    async def main() -> list[Any]:
        ok = await h.put("k", {"content-type": "text/plain"}, b"v", "2.5")
        bad = await h.put("k", {"content-type": "text/plain"}, b"v", "zero")
        cond = await h.put("k", {"content-type": "text/plain", "if-match": '"3"'}, b"v", "1")
        return [ok, bad, cond]

    ok, bad, cond = asyncio.run(main())
    assert ok.status == 200 and b'"ttl": 2.5' in ok.body and fake.calls == [("put", 2.5)]
    assert bad.status == 400 and cond.status == 400
