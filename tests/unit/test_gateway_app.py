"""The gateway app in-process over a fake store: the /kv fast path (``KVFastPath``) and
the FastAPI routes declared for the schema give the same answers, and the metrics
middleware counts fast-path requests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the gateway needs the http extra (zkv[http])")

import httpx  # noqa: E402

from zkv.client.calls import Limits  # noqa: E402
from zkv.gateway.app import create_app  # noqa: E402
from zkv.protocol.limits import KEY_BYTES_MAX, VALUE_BYTES_MAX  # noqa: E402

pytestmark = pytest.mark.unit


class FakeKV:
    """The AsyncKVClient calls the gateway makes, over a dict."""

    def __init__(self) -> None:
        self.data: dict[bytes, tuple[bytes, int]] = {}
        self.version = 0
        self.limits = Limits(KEY_BYTES_MAX, VALUE_BYTES_MAX)

    def _k(self, key: str | bytes) -> bytes:
        return key.encode() if isinstance(key, str) else key

    async def get_versioned(self, key: Any, consistency: Any = None) -> tuple[bytes, int] | None:
        return self.data.get(self._k(key))

    async def mget_versioned(self, keys: Any, consistency: Any = None
                             ) -> dict[Any, tuple[bytes, int] | None]:
        return {k: self.data.get(self._k(k)) for k in keys}

    async def put(self, key: Any, value: bytes) -> int:
        self.version += 1
        self.data[self._k(key)] = (value, self.version)
        return self.version

    async def cas_versioned(self, key: Any, expected: int, value: bytes) -> tuple[bool, int]:
        cur = self.data.get(self._k(key))
        if (cur[1] if cur else 0) != expected:
            return False, cur[1] if cur else 0
        return True, await self.put(key, value)

    async def delete_versioned(self, key: Any, expected_version: int | None = None
                               ) -> tuple[bool, int]:
        cur = self.data.get(self._k(key))
        if cur is None:
            return False, 0
        if expected_version is not None and cur[1] != expected_version:
            return False, cur[1]
        del self.data[self._k(key)]
        self.version += 1
        return True, self.version


SCRIPT: list[tuple[str, str, dict[str, Any]]] = [
    ("PUT", "/kv/a/b", {"json": {"key": "a/b", "value": "x"}}),
    ("GET", "/kv/a/b", {}),
    ("GET", "/kv/a/b", {"headers": {"Accept": "application/octet-stream"}}),
    ("GET", "/kv/a/b", {"params": {"consistency": "stale"}}),
    ("GET", "/kv/a/b", {"params": {"consistency": "bogus"}}),
    ("PUT", "/kv/a/b", {"content": b"\xff", "headers": {"If-Match": '"9"'}}),
    ("PUT", "/kv/a/b", {"content": b"\xff", "headers": {"If-Match": '"1"'}}),
    ("GET", "/kv/a/b", {}),
    ("PUT", "/kv/a/b", {"json": {"key": "nope", "value": "x"}}),
    ("PUT", "/kv/new", {"content": b"n", "headers": {"If-None-Match": "*"}}),
    ("PUT", "/kv/new", {"content": b"n", "headers": {"If-None-Match": "*"}}),
    ("DELETE", "/kv/new", {"headers": {"If-Match": '"1"'}}),  # it is at version 3
    ("DELETE", "/kv/new", {"headers": {"If-Match": '"3"'}}),
    ("PUT", "/kv/new", {"content": b"n"}),
    ("DELETE", "/kv/new", {}),
    ("DELETE", "/kv/new", {}),
    ("GET", "/kv/new", {}),
    ("GET", "/kv/", {}),
]


def _run(asgi: Any, app: Any) -> list[tuple[int, str, str | None]]:
    app.state.kv_state["kv"] = FakeKV()

    async def main() -> list[tuple[int, str, str | None]]:
        out = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi),
                                     base_url="http://t") as c:
            for method, url, kw in SCRIPT:
                r = await c.request(method, url, **kw)
                out.append((r.status_code, r.text if r.content[:1] != b"\xff" else "raw",
                            r.headers.get("etag")))
        return out

    return asyncio.run(main())


def test_fast_path_and_fastapi_routes_answer_alike() -> None:
    app = create_app("tcp://127.0.0.1:1")
    fast = _run(app, app)
    slow = create_app("tcp://127.0.0.1:1", fast_path=False)
    routed = _run(slow, slow)
    assert fast == routed
    assert [s for s, _, _ in fast] == [200, 200, 200, 200, 422, 412, 200, 200, 422, 200, 412,
                                      412, 200, 200, 200, 404, 404, 422]
    assert "version is 3" in fast[11][1]
    metrics = app.state.metrics.exposition()[0].decode()
    assert 'zkv_gateway_requests_total{code="412",op="put",route="kv"} 2.0' in metrics
