"""``GET /kv?prefix=&limit=&cursor=`` over a fake store: pages, an opaque cursor, bytes
keys and values, bad parameters as 422, cluster errors mapped like the other routes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the gateway needs the http extra (zkv[http])")

import httpx  # noqa: E402

from zkv.client.batch import ScanPage  # noqa: E402
from zkv.gateway.app import create_app  # noqa: E402
from zkv.protocol.errors import NoLeader  # noqa: E402

pytestmark = pytest.mark.unit


class FakeScanKV:
    def __init__(self, data: dict[bytes, bytes]) -> None:
        self.data = data
        self.calls: list[dict[str, Any]] = []

    async def scan(self, prefix: str, *, limit: int, cursor: bytes | None, keys_only: bool,
                   consistency: Any) -> ScanPage:
        self.calls.append({"prefix": prefix, "limit": limit, "cursor": cursor})
        if prefix == "down":
            raise NoLeader("no leader for shard 1")
        keys = sorted(k for k in self.data if k.startswith(prefix.encode())
                      and (cursor is None or k > cursor))
        page = keys[:limit]
        return ScanPage(page, [] if keys_only else [self.data[k] for k in page],
                        [1] * len(page), page[-1] if len(keys) > limit else None)


def run(data: dict[bytes, bytes], *urls: str) -> list[tuple[int, Any]]:
    app = create_app("tcp://127.0.0.1:1")
    app.state.kv_state["kv"] = FakeScanKV(data)

    async def main() -> list[tuple[int, Any]]:
        out = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            for url in urls:
                r = await c.get(url)
                out.append((r.status_code, r.json()))
        return out

    return asyncio.run(main())


def test_pages_follow_the_cursor() -> None:
    data = {b"a/%d" % i: b"v%d" % i for i in range(5)} | {b"b": b"x"}
    (s1, p1), = run(data, "/kv?prefix=a/&limit=2")
    assert s1 == 200 and [i["key"] for i in p1["items"]] == ["a/0", "a/1"]
    assert p1["items"][0] == {"key": "a/0", "value": "v0", "version": 1}
    (s2, p2), = run(data, f"/kv?prefix=a/&limit=2&cursor={p1['cursor']}&keys_only=true")
    assert [i["key"] for i in p2["items"]] == ["a/2", "a/3"] and "value" not in p2["items"][0]
    (_, p3), = run(data, "/kv?prefix=a/&limit=10")
    assert p3["cursor"] is None and len(p3["items"]) == 5


def test_bytes_keys_and_values_and_errors() -> None:
    data = {b"k\xff": b"\xfe"}
    got = run(data, "/kv", "/kv?limit=0", "/kv?cursor=%%%", "/kv?consistency=bogus",
              "/kv?prefix=down")
    assert got[0][0] == 200
    assert got[0][1]["items"] == [{"key": None, "key_base64": "a/8=", "value": None,
                                   "value_base64": "/g==", "version": 1}]
    assert [s for s, _ in got[1:]] == [422, 422, 422, 503]
