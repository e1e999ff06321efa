"""``KVHttpProtocol`` over a fake transport: /kv requests are answered from the protocol
with one write each, byte for byte what uvicorn's own protocol writes for the ASGI fast
path; everything else falls through to ASGI; keep-alive, pipelining (responses in
request order), split bodies, disconnects, errors and the metrics tallies."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the gateway needs the http extra (zkv[http])")

import httpx  # noqa: E402
from uvicorn.config import Config  # noqa: E402
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from tests.unit.test_gateway_app import SCRIPT, FakeKV  # noqa: E402
from zkv.gateway.app import GatewayApp, create_app  # noqa: E402
from zkv.gateway.kv import BODY_BYTES_MAX, Reply  # noqa: E402
from zkv.gateway.protocol import (  # noqa: E402
    KVCycle,
    KVHttpProtocol,
    encode_response,
    fast_request,
)

pytestmark = pytest.mark.unit

DEFAULT_HEADERS = [(b"date", b"Tue, 01 Dec 2026 00:00:00 GMT"), (b"server", b"uvicorn")]


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.read_paused = False
        self.late_writes = 0

    def write(self, data: bytes) -> None:
        if self.closed:
            self.late_writes += 1  # a real transport drops these (and logs)
            return
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default)

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False


def raw(method: str, url: str, **kw: Any) -> bytes:
    """The bytes of one HTTP/1.1 request, built by httpx from the script's arguments."""
    req = httpx.Request(method, "http://t" + url, **kw)
    body = req.read()
    lines = [f"{method} {req.url.raw_path.decode()} HTTP/1.1".encode()]
    lines += [k + b": " + v for k, v in req.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def gateway(kv: Any | None = None, **kw: Any) -> GatewayApp:
    app = create_app("tcp://127.0.0.1:1", **kw)
    app.state.kv_state["kv"] = kv if kv is not None else FakeKV()
    return app


class Conn:
    """One connection to a protocol instance over ``FakeTransport``."""

    def __init__(self, app: Any, cls: type[HttpToolsProtocol] = KVHttpProtocol) -> None:
        self.state = ServerState()
        self.state.default_headers = list(DEFAULT_HEADERS)
        config = Config(app=app, log_config=None, http=cls)
        self.proto = cls(config, self.state, {}, asyncio.get_running_loop())
        self.transport = FakeTransport()
        self.proto.connection_made(self.transport)  # type: ignore[arg-type]
        self.kinds: list[str] = []  # which path each request took, in order

    def send(self, data: bytes) -> None:
        self.proto.data_received(data)

    async def responses(self, n: int, timeout_s: float = 5.0) -> None:
        """Wait until ``n`` responses were completed (or the connection closed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.state.total_requests < n and not self.transport.closed:
            assert loop.time() < deadline, f"{self.state.total_requests} of {n} responses"
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)

    @property
    def output(self) -> bytes:
        return b"".join(self.transport.writes)


def split_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        n = int(headers["content-length"])
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return out


# ------------------------------------------------------------------ pure parts


def test_fast_request_takes_plain_kv_requests_only() -> None:
    cl = [(b"content-length", b"5")]
    assert fast_request(b"GET", b"/kv/a%2Fb?consistency=stale", []) == (
        "GET", "a/b", b"consistency=stale", 0)
    assert fast_request(b"PUT", b"/kv/%C3%A9t%C3%A9", cl) == ("PUT", "\u00e9t\u00e9", b"", 5)
    assert fast_request(b"DELETE", b"/kv/x", [(b"content-length", b"0")]) is not None
    for method, url, headers in [
        (b"POST", b"/kv/x", cl),  # not a /kv method: FastAPI's 405
        (b"HEAD", b"/kv/x", []),
        (b"GET", b"/health", []),
        (b"GET", b"/kvx", []),
        (b"GET", b"http://t/kv/x", []),  # absolute form: uvicorn decides
        (b"PUT", b"/kv/x", [(b"transfer-encoding", b"chunked")]),
        (b"PUT", b"/kv/x", [*cl, (b"expect", b"100-continue")]),
        (b"GET", b"/kv/x", [(b"upgrade", b"websocket"), (b"connection", b"upgrade")]),
        (b"GET", b"/kv/x", cl),  # a body on a GET: unusual, ASGI's
        (b"PUT", b"/kv/x", [(b"content-length", str(BODY_BYTES_MAX + 1).encode())]),  # 413
        (b"PUT", b"/kv/x", [(b"content-length", b"+5")]),
    ]:
        assert fast_request(method, url, headers) is None, (method, url, headers)


def test_encode_response_is_one_buffer_with_uvicorns_header_order() -> None:
    reply = Reply(412, b'{"a":1}', "application/json", {"ETag": '"3"', "Retry-After": "1"})
    assert encode_response(reply, DEFAULT_HEADERS, keep_alive=False) == (
        b"HTTP/1.1 412 Precondition Failed\r\n"
        b"date: Tue, 01 Dec 2026 00:00:00 GMT\r\nserver: uvicorn\r\n"
        b"content-type: application/json\r\ncontent-length: 7\r\n"
        b'etag: "3"\r\nretry-after: 1\r\nconnection: close\r\n\r\n{"a":1}')


# ------------------------------------------------------------------ over a fake transport


def test_kv_answers_are_byte_identical_to_the_asgi_path_with_one_write_each() -> None:
    requests = [raw(method, url, **kw) for method, url, kw in SCRIPT]

    async def run(cls: type[HttpToolsProtocol]) -> tuple[bytes, int, GatewayApp]:
        app = gateway()
        conn = Conn(app, cls)
        for i, data in enumerate(requests):
            conn.send(data)
            await conn.responses(i + 1)
        return conn.output, len(conn.transport.writes), app

    fast, fast_writes, app = asyncio.run(run(KVHttpProtocol))
    asgi, asgi_writes, _ = asyncio.run(run(HttpToolsProtocol))
    assert fast == asgi
    assert fast_writes == len(SCRIPT) and asgi_writes == 2 * len(SCRIPT)
    assert [s for s, _, _ in split_responses(fast)] == [
        200, 200, 200, 200, 422, 412, 200, 200, 422, 200, 412, 412, 200, 200, 200, 404, 404,
        422]
    metrics = app.state.metrics.exposition()[0].decode()
    assert 'zkv_gateway_requests_total{code="412",op="put",route="kv"} 2.0' in metrics
    assert 'zkv_gateway_request_duration_seconds_count{op="get"} 7.0' in metrics


class SlowFirstGet(FakeKV):
    """The first get waits, so a later request would finish first if order were lost."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def get_versioned(self, key: Any, consistency: Any = None) -> tuple[bytes, int] | None:
        self.gets += 1
        if self.gets == 1:
            await asyncio.sleep(0.05)
        return await super().get_versioned(key, consistency)


@pytest.mark.parametrize("uvicorn_helper", [True, False])
def test_pipelined_requests_are_answered_in_order_across_both_paths(
        uvicorn_helper: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not uvicorn_helper:  # uvicorns without _start_asgi_task: tasks started inline
        monkeypatch.delattr(HttpToolsProtocol, "_start_asgi_task")

    async def main() -> list[tuple[int, dict[str, str], bytes]]:
        kv = SlowFirstGet()
        kv.data[b"a"] = (b"1", 1)
        conn = Conn(gateway(kv))
        conn.send(raw("GET", "/kv/a") + raw("GET", "/health") + raw("PUT", "/kv/b", content=b"2")
                  + raw("GET", "/kv/b") + raw("POST", "/kv/b", content=b"x")
                  + raw("DELETE", "/kv/a"))
        assert conn.transport.read_paused  # uvicorn pauses reading behind a pipeline
        await conn.responses(6)
        return split_responses(conn.output)

    out = asyncio.run(main())
    assert [s for s, _, _ in out] == [200, 200, 200, 200, 405, 200]
    assert json.loads(out[0][2])["value"] == "1"
    assert json.loads(out[1][2]) == {"status": "ok"}
    assert json.loads(out[3][2])["value"] == "2"
    assert json.loads(out[5][2]) == {"key": "a", "deleted": True}


def test_other_routes_and_unusual_requests_fall_through_to_asgi() -> None:
    async def main() -> None:
        app = gateway()
        conn = Conn(app)
        cases = [
            (raw("GET", "/metrics"), 200),
            (raw("GET", "/docs"), 200),
            (raw("GET", "/openapi.json"), 200),
            (raw("POST", "/kv/x", content=b"v"), 405),
            (b"PUT /kv/c HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
             b"2\r\nhi\r\n0\r\n\r\n", 200),
            (b"PUT /kv/e HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n"
             b"expect: 100-continue\r\n\r\nok", 200),
        ]
        for i, (data, status) in enumerate(cases):
            writes = len(conn.transport.writes)
            conn.send(data)
            assert not isinstance(conn.proto.cycle, KVCycle)
            await conn.responses(i + 1)
            assert len(conn.transport.writes) - writes >= 2  # uvicorn's path: two writes
            assert conn.output.split(b"\r\n", 1)[0].startswith(b"HTTP/1.1 ")
            assert split_responses(b"".join(conn.transport.writes[writes:])
                                   .replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")
                                   )[0][0] == status, data
        assert app.state.kv_state["kv"].data[b"c"][0] == b"hi"
        assert app.state.kv_state["kv"].data[b"e"][0] == b"ok"

    asyncio.run(main())


def test_keep_alive_and_connection_close() -> None:
    async def main() -> None:
        conn = Conn(gateway())
        for i in range(3):
            conn.send(raw("PUT", f"/kv/k{i}", content=b"v"))
            await conn.responses(i + 1)
        assert not conn.transport.closed
        assert b"connection: close" not in conn.output
        conn.send(raw("GET", "/kv/k1", headers={"Connection": "close"}))
        await conn.responses(4)
        assert conn.transport.closed
        last = split_responses(conn.transport.writes[-1])[0]
        assert last[0] == 200 and last[1]["connection"] == "close"

        old = Conn(gateway())  # HTTP/1.0: one request per connection
        old.send(b"GET /kv/nope HTTP/1.0\r\n\r\n")
        await old.responses(1)
        assert old.transport.closed and b"connection: close" in old.output

    asyncio.run(main())


def test_a_body_split_over_reads_and_a_client_gone_mid_body() -> None:
    async def main() -> None:
        app = gateway()
        conn = Conn(app)
        data = raw("PUT", "/kv/split", content=b"x" * 100_000)  # over uvicorn's read mark
        for i in range(0, len(data), 7_000):
            conn.send(data[i:i + 7_000])
            await asyncio.sleep(0)
        await conn.responses(1)
        assert split_responses(conn.output)[0][0] == 200
        assert app.state.kv_state["kv"].data[b"split"][0] == b"x" * 100_000

        gone = Conn(app)
        gone.send(raw("PUT", "/kv/cut", content=b"y" * 1000)[:-500])
        await asyncio.sleep(0.01)
        gone.proto.connection_lost(None)
        await asyncio.sleep(0.01)
        assert b"cut" not in app.state.kv_state["kv"].data  # a cut-off body is not stored
        assert gone.transport.writes == []

    asyncio.run(main())


def test_a_connection_lost_under_a_pipeline_gets_no_late_write() -> None:
    async def main() -> FakeTransport:
        kv = SlowFirstGet()
        conn = Conn(gateway(kv))
        conn.send(raw("GET", "/kv/a") + raw("GET", "/kv/b"))  # the first one is slow
        await asyncio.sleep(0.01)
        conn.proto.connection_lost(None)  # uvicorn marks only the newest cycle gone
        await asyncio.sleep(0.1)
        return conn.transport

    transport = asyncio.run(main())
    assert transport.closed and transport.writes == [] and transport.late_writes == 0


class Broken(FakeKV):
    async def get_versioned(self, key: Any, consistency: Any = None) -> tuple[bytes, int] | None:
        raise RuntimeError("boom")


def test_an_unexpected_error_is_a_500_that_closes_and_is_counted() -> None:
    async def main() -> tuple[bytes, bool, GatewayApp]:
        app = gateway(Broken())
        conn = Conn(app)
        conn.send(raw("GET", "/kv/x"))
        await conn.responses(1)
        return conn.output, conn.transport.closed, app

    out, closed, app = asyncio.run(main())
    status, headers, body = split_responses(out)[0]
    assert (status, body, headers["connection"], closed) == (
        500, b"Internal Server Error", "close", True)
    metrics = app.state.metrics.exposition()[0].decode()
    assert 'zkv_gateway_requests_total{code="500",op="get",route="kv"} 1.0' in metrics


def test_no_metrics_means_no_counting_and_no_fast_path_means_plain_uvicorn() -> None:
    async def main() -> None:
        quiet = gateway(metrics_enabled=False)
        conn = Conn(quiet)
        conn.send(raw("PUT", "/kv/q", content=b"v"))
        await conn.responses(1)
        assert len(conn.transport.writes) == 1
        assert "zkv_gateway_requests_total{" not in quiet.state.metrics.exposition()[0].decode()

        plain = gateway(fast_path=False)
        conn = Conn(plain)
        conn.send(raw("PUT", "/kv/q", content=b"v"))
        assert not isinstance(conn.proto.cycle, KVCycle)
        await conn.responses(1)
        assert split_responses(conn.output)[0][0] == 200 and len(conn.transport.writes) == 2

    asyncio.run(main())


def test_keep_alive_timeout_closes_an_idle_connection_only() -> None:
    """One timer per connection (not per response) still closes a connection idle for
    ``timeout_keep_alive`` and never one that keeps sending requests."""

    async def main() -> None:
        conn = Conn(gateway())
        conn.proto.timeout_keep_alive = 0.2
        loop = asyncio.get_running_loop()
        start = loop.time()
        last_response = start
        for i in range(6):  # a request every 0.06 s: busy for longer than the timeout
            conn.send(raw("PUT", f"/kv/t{i}", content=b"v"))
            await conn.responses(i + 1)
            last_response = loop.time()
            await asyncio.sleep(0.06)
        assert not conn.transport.closed and loop.time() - start > 0.3
        while not conn.transport.closed:
            await asyncio.sleep(0.01)
            assert loop.time() - last_response < 1.0
        # idle since the last response (measured from it: a loaded machine's sleeps
        # overshoot, so a clock read after them would make the check flaky)
        assert loop.time() - last_response >= 0.2 - 0.01
        conn.proto.connection_lost(None)
        assert conn.proto.timeout_keep_alive_task is None

        slow = SlowFirstGet()  # a request served for longer than the timeout stays open
        busy = Conn(gateway(slow))
        busy.proto.timeout_keep_alive = 0.02
        busy.send(raw("GET", "/kv/x"))
        await busy.responses(1)
        assert not busy.transport.closed
        await asyncio.sleep(0.1)
        assert busy.transport.closed

    asyncio.run(main())
