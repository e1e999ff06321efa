"""The HTTP gateway (``zkv gateway``) over httpx against a real local cluster: every
route, every error mapping, keys with ``/`` and non-ASCII, binary values, CAS races
between two clients, and a gateway restart with nothing lost.

One cluster (2 shards x 3 replicas) serves the whole module; the fault tests come last
and put the cluster back as they found it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.support.gateway import key_on_shard, running_gateway
from zkv.client import KVClient
from zkv.gateway.process import GatewayProcess
from zkv.ops.cluster import LocalCluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-logs")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    data = tmp_path_factory.mktemp("gateway-cluster")
    with LocalCluster(data, shards=2, replicas=3, port=0, fsync="always", heartbeat_ms=50,
                      election_timeout_ms=500) as c:
        c.wait_ready(30)
        yield c


@pytest.fixture(scope="module")
def gateway(cluster: LocalCluster, logs: Path) -> Iterator[GatewayProcess]:
    with running_gateway(cluster, logs) as gw:
        yield gw


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=15) as c:
        yield c


def kv_url(key: str) -> str:
    return "/kv/" + quote(key, safe="/")


# --------------------------------------------------------------------------- routes


def test_health_ready_and_offline_docs(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and set(ready.json()["leaders"]) == {"0", "1"}
    spec = http.get("/openapi.json").json()
    assert {"/kv/{key}", "/health", "/ready", "/metrics"} <= set(spec["paths"])
    for page in ("/docs", "/redoc"):
        html = http.get(page).text
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs, html
        for ref in refs:  # every script and style comes from this gateway
            assert ref.startswith("/"), f"{page} loads {ref} from elsewhere"
            assert http.get(ref).status_code == 200, ref
        assert "cdn" not in html.lower() and "fonts.googleapis" not in html


def test_put_get_delete_json(http: httpx.Client) -> None:
    r = http.put("/kv/foo", json={"key": "foo", "value": "bar"})
    assert r.status_code == 200
    version = r.json()["version"]
    assert r.json() == {"key": "foo", "version": version} and r.headers["etag"] == f'"{version}"'
    r = http.get("/kv/foo")
    assert r.json() == {"key": "foo", "value": "bar", "version": version}
    assert r.headers["etag"] == f'"{version}"'
    assert http.delete("/kv/foo").status_code == 200
    assert http.get("/kv/foo").status_code == 404
    r = http.delete("/kv/foo")
    assert r.status_code == 404 and r.json()["detail"] == "key not found"


def test_binary_values_raw_and_base64(http: httpx.Client) -> None:
    blob = bytes(range(256)) * 4
    r = http.put("/kv/bin", content=blob, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200
    doc = http.get("/kv/bin").json()
    assert doc["value"] is None and base64.b64decode(doc["value_base64"]) == blob
    raw = http.get("/kv/bin", headers={"Accept": "application/octet-stream"})
    assert raw.content == blob and raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["etag"] == f'"{doc["version"]}"'
    r = http.put("/kv/bin2", json={"key": "bin2", "value_base64": base64.b64encode(b"\xff\x00").decode()})
    assert r.status_code == 200
    assert http.get("/kv/bin2", headers={"Accept": "application/octet-stream"}).content == b"\xff\x00"


def test_keys_with_slashes_and_any_utf8(http: httpx.Client, cluster: LocalCluster) -> None:
    keys = ["a/b/c", "/leading", "trailing/", "ключ/значение", "été ☃ 🙂", "q?x=1#frag", "100%"]
    for i, key in enumerate(keys):
        r = http.put(kv_url(key), json={"key": key, "value": f"v{i}"})
        assert r.status_code == 200, (key, r.text)
    with KVClient(cluster.endpoints, timeout_s=10) as kv:
        for i, key in enumerate(keys):
            assert http.get(kv_url(key)).json()["value"] == f"v{i}"
            assert kv.get(key.encode()) == f"v{i}".encode()  # the exact UTF-8 key
    assert http.get(kv_url("a/b")).status_code == 404


def test_consistency_levels(http: httpx.Client) -> None:
    version = http.put("/kv/c", content=b"x").json()["version"]
    for level in ("linearizable", "leader", "stale", "LEADER"):
        deadline = time.monotonic() + 5
        while True:  # a stale read may trail the write by a heartbeat
            r = http.get("/kv/c", params={"consistency": level})
            if r.status_code == 200 and r.json()["version"] == version:
                break
            assert level == "stale" and time.monotonic() < deadline, r.text
            time.sleep(0.05)
    assert http.get("/kv/c", params={"consistency": "eventual"}).status_code == 422


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body,what", [
    (b'{"key": "other", "value": "x"}', "does not match"),
    (b'{"value": "x"}', '"key"'),
    (b'{"key": "k422"}', '"value"'),
    (b'{"key": "k422", "value": 3}', '"value"'),
    (b'{"key": "k422", "value_base64": "***"}', "base64"),
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "object"),
])
def test_bad_json_bodies_are_422(http: httpx.Client, body: bytes, what: str) -> None:
    r = http.put("/kv/k422", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and what in r.json()["detail"], r.text
    assert http.get("/kv/k422").status_code == 404


def test_bad_keys_headers_and_sizes(http: httpx.Client) -> None:
    assert http.put("/kv/", content=b"x").status_code == 422
    assert http.get("/kv/").status_code == 422
    r = http.put("/kv/big", content=b"x" * (1024 * 1024 + 1))
    assert r.status_code == 413, r.text
    assert http.put("/kv/big", content=b"x" * (1024 * 1024)).status_code == 200
    r = http.put("/kv/huge", content=b"x" * (3 * 1024 * 1024))  # refused before it is read
    assert r.status_code == 413 and "body is over" in r.json()["detail"]
    assert http.put(kv_url("k" * (16 * 1024 + 1)), content=b"x").status_code == 413
    for headers in ({"If-Match": "W/\"3\""}, {"If-Match": "abc"}, {"If-Match": '"0"'},
                    {"If-None-Match": '"4"'}, {"If-Match": '"1"', "If-None-Match": "*"}):
        assert http.put("/kv/h", content=b"x", headers=headers).status_code == 422, headers


def test_cas_with_if_match_and_if_none_match(http: httpx.Client) -> None:
    r = http.put("/kv/cas", content=b"1", headers={"If-None-Match": "*"})
    assert r.status_code == 200
    v1 = r.json()["version"]
    r = http.put("/kv/cas", content=b"again", headers={"If-None-Match": "*"})
    assert r.status_code == 412 and r.json()["version"] == v1
    r = http.put("/kv/cas", content=b"2", headers={"If-Match": f'"{v1}"'})
    assert r.status_code == 200
    v2 = r.json()["version"]
    r = http.put("/kv/cas", content=b"3", headers={"If-Match": f'"{v1}"'})
    assert r.status_code == 412 and r.json()["version"] == v2
    assert http.get("/kv/cas").json()["value"] == "2"
    assert http.delete("/kv/cas", headers={"If-Match": f'"{v1}"'}).status_code == 412
    assert http.delete("/kv/cas", headers={"If-Match": f'"{v2}"'}).status_code == 200
    r = http.put("/kv/cas", content=b"4", headers={"If-Match": f'"{v2}"'})
    assert r.status_code == 412 and r.json()["version"] == 0  # gone: no version matches


def test_cas_races_between_two_clients(gateway: GatewayProcess) -> None:
    """Two clients race If-Match writes on one version: exactly one wins each round; then
    both increment a counter with read/CAS/retry and no increment is lost."""

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as a, \
                httpx.AsyncClient(base_url=gateway.url, timeout=15) as b:
            version = (await a.put("/kv/race", content=b"start")).json()["version"]
            for round_ in range(20):
                ra, rb = await asyncio.gather(
                    *(c.put("/kv/race", content=f"{name}{round_}".encode(),
                            headers={"If-Match": f'"{version}"'})
                      for name, c in (("a", a), ("b", b))))
                codes = sorted([ra.status_code, rb.status_code])
                assert codes == [200, 412], (ra.text, rb.text)
                winner = ra if ra.status_code == 200 else rb
                version = winner.json()["version"]
                loser = rb if winner is ra else ra
                assert loser.json()["version"] == version  # told the version that won

            await a.put("/kv/counter", content=b"0")

            async def increment(c: httpx.AsyncClient, times: int) -> int:
                conflicts = 0
                for _ in range(times):
                    while True:
                        cur = await c.get("/kv/counter")
                        n = int(cur.json()["value"])
                        r = await c.put("/kv/counter", content=str(n + 1).encode(),
                                        headers={"If-Match": cur.headers["etag"]})
                        if r.status_code == 200:
                            break
                        assert r.status_code == 412, r.text
                        conflicts += 1
                return conflicts

            await asyncio.gather(increment(a, 25), increment(b, 25))
            assert (await a.get("/kv/counter")).json()["value"] == "50"

    asyncio.run(asyncio.wait_for(main(), 60))


def test_concurrent_gets_each_get_their_own_answer(gateway: GatewayProcess) -> None:
    """Many GETs in flight at once (the gateway sends each loop turn's GETs as one batch):
    every request gets its own key's value and ETag, or its own 404 / 422 / 413, with
    duplicates, both shards, two consistency levels and a too-long key in the mix."""
    keys = [f"conc/{i}" for i in range(40)]

    async def main() -> None:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30, limits=limits) as c:
            versions = {}
            for k in keys:
                versions[k] = (await c.put(kv_url(k), content=f"v-{k}".encode())).json()["version"]
            for round_ in range(5):
                asks: list[tuple[str, dict[str, str]]] = []
                for i in range(120):
                    k = keys[(i * 7 + round_) % len(keys)] if i % 5 else f"conc/missing-{i}"
                    params = {"consistency": "stale"} if i % 3 == 0 else {}
                    asks.append((k, params))
                asks += [("conc/0", {"consistency": "bogus"}), ("x" * 20000, {})]
                replies = await asyncio.gather(*(c.get(kv_url(k), params=p) for k, p in asks))
                for (k, p), r in zip(asks, replies, strict=True):
                    if p.get("consistency") == "bogus":
                        assert r.status_code == 422, r.text
                    elif len(k) > 16384:
                        assert r.status_code in (413, 414, 431), r.status_code
                    elif k in versions:
                        assert r.status_code == 200, r.text
                        assert r.json()["value"] == f"v-{k}" and r.json()["key"] == k
                        assert r.headers["etag"] == f'"{versions[k]}"'
                    else:
                        assert r.status_code == 404 and r.json()["key"] == k, r.text

    asyncio.run(asyncio.wait_for(main(), 90))


def test_conditional_delete_races_a_write_atomically(gateway: GatewayProcess) -> None:
    """DELETE with If-Match races a write from another client on the same version.
    Atomic: the write is never lost. Either the delete went first (200) and the write
    stands after it, or the write went first and the delete is 412 with its version.
    Against a CAS write, exactly one of the two wins. (A read-then-delete gateway loses
    the write whenever it lands between its read and its delete.)"""

    async def main() -> dict[str, int]:
        outcomes = {"delete first": 0, "write first": 0}
        async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as a, \
                httpx.AsyncClient(base_url=gateway.url, timeout=15) as b:
            for round_ in range(40):
                key = f"/kv/del-race/{round_ % 4}"
                version = (await a.put(key, content=b"old")).json()["version"]
                new = f"b{round_}".encode()
                cas = round_ % 2 == 1  # every other round the writer uses If-Match too
                headers = {"If-Match": f'"{version}"'} if cas else {}
                deleted, wrote = await asyncio.gather(
                    a.delete(key, headers={"If-Match": f'"{version}"'}),
                    b.put(key, content=new, headers=headers))
                after = await a.get(key)
                if cas:
                    codes = sorted([deleted.status_code, wrote.status_code])
                    assert codes == [200, 412], (deleted.text, wrote.text)
                    if wrote.status_code == 200:
                        assert deleted.json()["version"] == wrote.json()["version"]
                        assert after.json()["value"] == new.decode()
                    else:
                        assert wrote.json()["version"] == 0 and after.status_code == 404
                    continue
                assert wrote.status_code == 200, wrote.text
                assert deleted.status_code in (200, 412), deleted.text
                assert after.status_code == 200, f"round {round_}: the write was deleted"
                assert after.json()["value"] == new.decode()
                assert after.json()["version"] == wrote.json()["version"]
                if deleted.status_code == 412:
                    assert deleted.json()["version"] == wrote.json()["version"]
                outcomes["delete first" if deleted.status_code == 200 else "write first"] += 1
        return outcomes

    print(asyncio.run(asyncio.wait_for(main(), 90)))


# --------------------------------------------------------------------------- metrics, ui


def test_metrics_count_requests_latency_and_in_flight(http: httpx.Client) -> None:
    http.put("/kv/m", content=b"1")
    http.get("/kv/m")
    http.get("/kv/missing-m")
    text = http.get("/metrics").text
    assert re.search(r'zkv_gateway_requests_total\{code="200",op="put",route="kv"\} [1-9]', text)
    assert re.search(r'zkv_gateway_requests_total\{code="404",op="get",route="kv"\} [1-9]', text)
    assert re.search(r'zkv_gateway_request_duration_seconds_count\{op="get"\} [1-9]', text)
    assert "zkv_gateway_requests_in_flight 1.0" in text  # this very request


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split the raw bytes of consecutive HTTP/1.1 responses (each with a
    content-length; interim 100 Continue responses skipped)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        n = 0 if status == 100 else int(headers["content-length"])
        if status != 100:
            out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


def _request(method: str, path: str, body: bytes = b"", *, close: bool = False) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\n"
    if body or method == "PUT":
        head += f"Content-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_kv_keep_alive_pipelining_and_fall_through_over_raw_http(
        gateway: GatewayProcess) -> None:
    """The protocol answering /kv itself (gateway/protocol.py) keeps HTTP/1.1 right: one
    connection serves many requests; pipelined requests, /kv and ASGI routes mixed, are
    answered in order; chunked and 100-continue bodies still work."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=15) as sock:
        for i in range(3):  # keep-alive: the same connection, request after request
            sock.sendall(_request("PUT", "/kv/ka", str(i).encode()))
            status, headers, body = _responses(sock.recv(65536))[0]
            assert status == 200 and headers["etag"] == f'"{json.loads(body)["version"]}"'
            assert "connection" not in headers and headers["server"] == "uvicorn"
        sock.sendall(_request("PUT", "/kv/pl-a", b"one")
                     + _request("GET", "/kv/pl-a")
                     + _request("GET", "/health")
                     + _request("POST", "/kv/pl-a", b"x")
                     + _request("GET", "/kv/ka")
                     + _request("DELETE", "/kv/pl-a")
                     + _request("GET", "/kv/pl-a")
                     + _request("GET", "/metrics")
                     + b"PUT /kv/pl-chunked HTTP/1.1\r\nHost: t\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                     + b"PUT /kv/pl-expect HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
                       b"Expect: 100-continue\r\n\r\nok"
                     + _request("GET", "/kv/pl-chunked", close=True))
        out = _responses(_read_until_closed(sock))
    assert [s for s, _, _ in out] == [200, 200, 200, 405, 200, 200, 404, 200, 200, 200, 200]
    assert json.loads(out[1][2])["value"] == "one"
    assert json.loads(out[2][2]) == {"status": "ok"}
    assert json.loads(out[4][2])["value"] == "2"
    assert json.loads(out[5][2]) == {"key": "pl-a", "deleted": True}
    assert b"zkv_gateway_requests_total" in out[7][2]
    assert json.loads(out[10][2])["value"] == "abc" and out[10][1]["connection"] == "close"
    with httpx.Client(base_url=gateway.url, timeout=15) as c:
        assert c.get("/kv/pl-expect").json()["value"] == "ok"


def test_ui_data_shows_shards_leaders_and_traffic(http: httpx.Client) -> None:
    assert "zkv cluster" in http.get("/ui").text
    assert "function renderChart" in http.get("/ui/app.js").text
    for i in range(50):
        http.put(f"/kv/ui{i}", content=b"x")
    deadline = time.monotonic() + 10
    while True:
        d = http.get("/ui/data").json()
        if any(p["rps"] > 0 for p in d["series"]):
            break
        assert time.monotonic() < deadline, d
        time.sleep(0.5)
    shards = d["cluster"]["shards"]
    assert set(shards) == {"0", "1"}
    for s in shards.values():
        assert s["leader"] and len(s["replicas"]) == 3 and 0.3 < s["share"] < 0.7
        assert {r["role"] for r in s["replicas"]} == {"leader", "follower"}
        assert all(r["lag"] is not None and r["term"] >= 1 for r in s["replicas"])


def test_several_workers_share_the_load_and_add_up_their_metrics(
        cluster: LocalCluster, logs: Path) -> None:
    with running_gateway(cluster, logs, name="workers", extra_args=("--workers", "2")) as gw, \
            httpx.Client(base_url=gw.url, timeout=15) as http:
        for i in range(40):  # new connections, so both workers get some
            with httpx.Client(base_url=gw.url, timeout=15) as once:
                assert once.put(f"/kv/w{i}", content=b"x").status_code == 200
        assert all(http.get(f"/kv/w{i}").status_code == 200 for i in range(40))
        # Every worker's count, added up. A scrape flushes the worker that serves it; the
        # other moves its tallies into the shared files within a second (metrics.py).
        deadline = time.monotonic() + 10
        while True:
            text = http.get("/metrics").text
            m = re.search(r'zkv_gateway_requests_total\{code="200",op="put",route="kv"\} (\d+)',
                          text)
            if m is not None and int(m.group(1)) == 40:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while not any(p["rps"] > 0 for p in http.get("/ui/data").json()["series"]):
            assert time.monotonic() < deadline, "the page's history misses the traffic"
            time.sleep(0.5)


# --------------------------------------------------------------------------- restarts, faults


def test_gateway_restart_loses_nothing(cluster: LocalCluster, logs: Path) -> None:
    port = None
    with running_gateway(cluster, logs, name="restart1") as gw:
        port = gw.port
        with httpx.Client(base_url=gw.url, timeout=15) as c:
            versions = {f"r{i}": c.put(f"/kv/r{i}", content=f"v{i}".encode()).json()["version"]
                        for i in range(100)}
        gw.stop(signal.SIGKILL)
    with running_gateway(cluster, logs, port=port, name="restart2") as gw, \
            httpx.Client(base_url=gw.url, timeout=15) as c:
        for i in range(100):
            assert c.get(f"/kv/r{i}").json() == {"key": f"r{i}", "value": f"v{i}",
                                                  "version": versions[f"r{i}"]}


def _wait_ready(http: httpx.Client, ready: bool, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while (http.get("/ready").status_code == 200) != ready:
        assert time.monotonic() < deadline, f"/ready never became {ready}"
        time.sleep(0.1)


def test_no_leader_is_503_and_a_silent_shard_is_504(cluster: LocalCluster, logs: Path) -> None:
    shard = 1
    key = key_on_shard(cluster, shard, "fault")
    members = [n for n in cluster.node_ids if n.startswith(f"s{shard}r")]
    # The gateway waits 0.3 s, less than the broker's 0.5 s election timeout: a shard
    # that stops answering looks silent (504) before the broker calls it leaderless.
    with running_gateway(cluster, logs, timeout_s=0.3, name="faults") as gw, \
            httpx.Client(base_url=gw.url, timeout=15) as http:
        assert http.put(kv_url(key), content=b"before").status_code == 200
        for n in members:
            cluster.kill_node(n, signal.SIGSTOP)
        try:
            r = http.put(kv_url(key), content=b"during")
            assert r.status_code == 504, r.text
            assert "outcome is unknown" in r.json()["detail"] and r.json()["outcome"] == "unknown"
            r = http.get(kv_url(key))
            assert r.status_code == 504 and "outcome" not in r.json(), r.text
        finally:
            for n in members:
                cluster.kill_node(n, signal.SIGCONT)
        _wait_ready(http, True)
        for n in members:
            cluster.kill_node(n, signal.SIGKILL)
        try:
            _wait_ready(http, False)
            assert http.get("/ready").json()["shards_without_leader"] == [str(shard)]
            for r in (http.put(kv_url(key), content=b"x"), http.get(kv_url(key)),
                      http.delete(kv_url(key))):
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "1" and "NoLeader" in r.json()["detail"]
            other = key_on_shard(cluster, 1 - shard, "alive")
            assert http.put(kv_url(other), content=b"y").status_code == 200  # the other shard
        finally:
            for n in members:
                cluster.restart_node(n)
        _wait_ready(http, True)
        # fsync=always: the acknowledged "before" survived every replica's SIGKILL (or
        # the unknown-outcome "during" replaced it).
        assert http.get(kv_url(key)).json()["value"] in ("before", "during")
