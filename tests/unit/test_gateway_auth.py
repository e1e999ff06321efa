"""Bearer tokens on both of the gateway's paths: the ASGI chain (``BearerAuth``, over
httpx's ASGI transport) and uvicorn's protocol answering /kv itself (``KVHttpProtocol``
over a fake transport) give the same statuses and bytes for the same requests; a denied
write stores nothing; open routes stay open; the OpenAPI schema declares the scheme."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the gateway needs the http extra (zkv[http])")

import httpx  # noqa: E402
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402

from tests.unit.test_gateway_app import FakeKV  # noqa: E402
from tests.unit.test_gateway_protocol import Conn, raw, split_responses  # noqa: E402
from tests.unit.test_gateway_tokens import ADMIN_T, CLIENT_T, METRICS_T, table  # noqa: E402
from zkv.gateway.app import GatewayApp, create_app  # noqa: E402
from zkv.gateway.auth import Authenticator  # noqa: E402
from zkv.gateway.protocol import KVCycle, KVHttpProtocol  # noqa: E402

pytestmark = pytest.mark.unit


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def secured(kv: FakeKV | None = None, **kw: Any) -> GatewayApp:
    app = create_app("tcp://127.0.0.1:1", auth=Authenticator(None, table()), **kw)
    app.state.kv_state["kv"] = kv if kv is not None else FakeKV()
    return app


#: (method, url, request kwargs, expected status): the /kv cases the protocol answers
KV_SCRIPT: list[tuple[str, str, dict[str, Any], int]] = [
    ("PUT", "/kv/a", {"content": b"nope"}, 401),
    ("GET", "/kv/a", {}, 401),
    ("DELETE", "/kv/a", {"headers": bearer("wrong-token-0123456789abc")}, 401),
    ("PUT", "/kv/a", {"content": b"x", "headers": {"Authorization": "Basic YTpi"}}, 401),
    ("PUT", "/kv/a", {"content": b"m", "headers": bearer(METRICS_T)}, 403),
    ("PUT", "/kv/a", {"content": b"v1", "headers": bearer(CLIENT_T)}, 200),
    ("GET", "/kv/a", {"headers": bearer(CLIENT_T)}, 200),
    ("GET", "/kv/a", {"headers": bearer(METRICS_T)}, 403),
    ("PUT", "/kv/b%2Fc", {"content": b"v2", "headers": bearer(ADMIN_T)}, 200),
    ("DELETE", "/kv/b%2Fc", {"headers": bearer(ADMIN_T)}, 200),
    ("DELETE", "/kv/a", {}, 401),
    ("GET", "/kv/a", {"headers": {"Authorization": f"bearer  {CLIENT_T} "}}, 200),
]


def test_kv_denials_are_identical_on_the_protocol_and_asgi_paths() -> None:
    requests = [raw(m, url, **kw) for m, url, kw, _ in KV_SCRIPT]

    async def run(cls: type[HttpToolsProtocol]) -> tuple[bytes, int, FakeKV, int]:
        kv = FakeKV()
        conn = Conn(secured(kv), cls)
        fast = 0
        for i, data in enumerate(requests):
            conn.send(data)
            fast += isinstance(conn.proto.cycle, KVCycle)
            await conn.responses(i + 1)
        return conn.output, len(conn.transport.writes), kv, fast

    out, writes, kv, fast = asyncio.run(run(KVHttpProtocol))
    asgi, asgi_writes, asgi_kv, _ = asyncio.run(run(HttpToolsProtocol))
    assert fast == len(KV_SCRIPT) and writes == len(KV_SCRIPT)  # all on the protocol path
    assert asgi_writes == 2 * len(KV_SCRIPT)  # ... and none of these on it
    assert out == asgi
    replies = split_responses(out)
    assert [s for s, _, _ in replies] == [s for _, _, _, s in KV_SCRIPT]
    assert kv.data == asgi_kv.data == {b"a": (b"v1", 1)}  # denied writes stored nothing
    first = replies[0]
    assert first[1]["www-authenticate"] == 'Bearer realm="zkv"'
    assert "bearer token is required" in json.loads(first[2])["detail"]
    assert replies[2][1]["www-authenticate"] == 'Bearer realm="zkv", error="invalid_token"'
    assert replies[4][1]["www-authenticate"] == 'Bearer realm="zkv", error="insufficient_scope"'
    assert json.loads(replies[4][2])["role"] == "metrics"


def test_a_denied_request_keeps_the_connection_in_step() -> None:
    async def main() -> list[int]:
        conn = Conn(secured())
        body = b"z" * 100_000  # read and dropped, not stored; the next request still parses
        conn.send(raw("PUT", "/kv/big", content=body) + raw("PUT", "/kv/ok", content=b"1",
                                                             headers=bearer(CLIENT_T))
                  + raw("GET", "/kv/ok", headers=bearer(CLIENT_T)))
        await conn.responses(3)
        assert not conn.transport.closed
        return [s for s, _, _ in split_responses(conn.output)]

    assert asyncio.run(main()) == [401, 200, 200]


def _asgi(app: GatewayApp, calls: list[tuple[str, str, dict[str, str]]]
          ) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            return [await c.request(m, url, headers=h) for m, url, h in calls]

    return asyncio.run(main())


@pytest.mark.parametrize("fast_path", [True, False])
def test_asgi_routes_follow_the_policy(fast_path: bool) -> None:
    app = secured(fast_path=fast_path)
    none: dict[str, str] = {}
    cases = [
        ("GET", "/health", none, 200),
        ("GET", "/docs", none, 200),
        ("GET", "/openapi.json", none, 200),
        ("GET", "/ui", none, 200),
        ("GET", "/ui/app.js", none, 200),
        ("GET", "/metrics", none, 401),
        ("GET", "/metrics", bearer(CLIENT_T), 403),
        ("GET", "/metrics", bearer(METRICS_T), 200),
        ("GET", "/metrics", bearer(ADMIN_T), 200),
        ("GET", "/ui/data", none, 401),
        ("GET", "/ui/data", bearer(CLIENT_T), 403),
        ("GET", "/ui/data", bearer(METRICS_T), 403),
        ("GET", "/ui/data", bearer(ADMIN_T), 200),
        ("GET", "/kv/a", none, 401),
        ("GET", "/kv/a", bearer(CLIENT_T), 404),
        ("POST", "/kv/a", bearer(METRICS_T), 403),
        ("POST", "/kv/a", bearer(CLIENT_T), 405),
        ("GET", "/kv?prefix=a", none, 401),  # the scan lists keys: a data role only
        ("GET", "/kv?prefix=a", bearer(METRICS_T), 403),
        ("GET", "/no-such-route", none, 401),  # deny by default: no route map for free
        ("GET", "/no-such-route", bearer(METRICS_T), 404),
    ]
    got = _asgi(app, [(m, u, h) for m, u, h, _ in cases])
    assert [(m, u, r.status_code) for (m, u, _, _), r in zip(cases, got, strict=True)] == \
        [(m, u, s) for m, u, _, s in cases]
    denied = got[6]
    assert denied.headers["www-authenticate"] == 'Bearer realm="zkv", error="insufficient_scope"'
    assert denied.json()["detail"].startswith("the token's role 'client' may not GET /metrics")
    metrics = app.state.metrics.exposition()[0].decode()
    assert 'zkv_gateway_requests_total{code="401",op="metrics",route="metrics"} 1.0' in metrics


def test_openapi_declares_the_bearer_scheme_only_with_tokens() -> None:
    spec = _asgi(secured(), [("GET", "/openapi.json", {})])[0].json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": "a token from the gateway's tokens file (--tokens)"}
    assert spec["paths"]["/kv/{key}"]["put"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/health"]["get"]
    plain = create_app("tcp://127.0.0.1:1")
    spec = _asgi(plain, [("GET", "/openapi.json", {})])[0].json()
    assert "securitySchemes" not in spec.get("components", {})


def test_without_tokens_nothing_is_checked() -> None:
    app = create_app("tcp://127.0.0.1:1")
    app.state.kv_state["kv"] = FakeKV()
    assert app.kv is not None and app.kv.auth is None
    got = _asgi(app, [("GET", "/metrics", {}), ("GET", "/ui/data", {}), ("GET", "/kv/x", {})])
    assert [r.status_code for r in got] == [200, 200, 404]


NODE_HARNESS = r"""
const fs = require("fs");
const elements = {};
const classes = () => { const s = new Set(["hidden"]); return {
  add: (c) => s.add(c), remove: (c) => s.delete(c), contains: (c) => s.has(c),
  toggle: (c, on) => (on ? s.add(c) : s.delete(c)) }; };
global.document = { getElementById: (id) => (elements[id] ??= {
  id, value: "", textContent: "", classList: classes(), listeners: {},
  addEventListener(kind, f) { this.listeners[kind] = f; } }) };
global.sessionStorage = { m: {}, getItem(k) { return this.m[k] ?? null; },
                          setItem(k, v) { this.m[k] = v; } };
const seen = [];
global.fetch = async (url, opts) => {
  seen.push((opts.headers || {}).Authorization || null);
  return { status: 401, json: async () => ({ detail: "a bearer token is required" }) };
};
const timers = [];
global.setTimeout = (f) => timers.push(f);
eval(fs.readFileSync(process.argv[2], "utf8"));
(async () => {
  await new Promise((r) => setImmediate(r));
  const shown = !elements.auth.classList.contains("hidden");
  const error = elements.error.textContent;
  document.getElementById("token").value = " the-admin-token ";
  elements.auth.listeners.submit({ preventDefault() {} });
  const hidden = elements.auth.classList.contains("hidden");
  await timers.shift()();
  console.log(JSON.stringify({ seen, shown, error, hidden }));
})();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_live_page_asks_for_a_token_on_401_and_sends_it(tmp_path: Path) -> None:
    """ui.js under node with a stub DOM: a 401 shows the token form; the token entered
    is sent as a Bearer header on the next poll (Chromium's test needs no token)."""
    harness = tmp_path / "harness.js"
    harness.write_text(NODE_HARNESS)
    script = Path(__file__).resolve().parents[2] / "gateway" / "static" / "ui.js"
    done = subprocess.run(["node", str(harness), str(script)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {"seen": [None, "Bearer the-admin-token"], "shown": True,
                   "error": "a bearer token is required", "hidden": True}
