"""The HTTP gateway in front of a ``--secure`` cluster (issue 12, part 5): bearer tokens
mapped to roles, the gateway's own Curve client key to the brokers, HTTPS through
uvicorn, a token rotated with no downtime, a non-loopback bind without tokens refused,
and ``zkv cluster up --secure`` starting the gateway with its key and tokens."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from zkv.client import KVClient
from zkv.gateway.process import GatewayProcess
from zkv.gateway.tokens import token_for
from zkv.ops.cluster import LocalCluster, free_port, free_port_block

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    data = tmp_path_factory.mktemp("gwsec") / "data"
    with LocalCluster(data, shards=1, replicas=1, port=0, fsync="never", secure=True,
                      heartbeat_ms=50, election_timeout_ms=500) as c:
        c.wait_ready(30)
        yield c


def _gateway(cluster: LocalCluster, log: Path, **kw: object) -> GatewayProcess:
    return GatewayProcess(cluster.endpoint, free_port(), log_path=log, timeout_s=5.0,
                          keys=cluster.gateway_keys, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gateway(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("gwsec-logs") / "gateway.log"
    gw = _gateway(cluster, log, tokens=cluster.gateway_tokens)
    assert gw.start() is None
    try:
        assert gw.wait_healthy(30), log.read_text(errors="replace")
        yield gw
    finally:
        gw.stop()


def _token(cluster: LocalCluster, role: str) -> dict[str, str]:
    assert cluster.gateway_tokens is not None
    token = token_for(cluster.gateway_tokens, role)
    assert token is not None
    return {"Authorization": f"Bearer {token}"}


def test_tokens_and_roles_against_a_secure_cluster(cluster: LocalCluster,
                                                   gateway: GatewayProcess) -> None:
    client, admin, metrics = (_token(cluster, r) for r in ("client", "admin", "metrics"))
    with httpx.Client(base_url=gateway.url, timeout=15) as http:
        # open: probes; /ready answers 200 only if the gateway's own key reached the broker
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
        assert ready.status_code == 200, ready.text
        assert http.get("/docs").status_code == 200
        # no token, a wrong one: 401 with the Bearer challenge, nothing stored
        r = http.put("/kv/sec", content=b"anon")
        assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="zkv"'
        r = http.get("/kv/sec", headers={"Authorization": "Bearer not-a-token-0123456789"})
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
        # the client token reads and writes keys, through the broker, under the gateway's key
        r = http.put("/kv/sec", content=b"v1", headers=client)
        assert r.status_code == 200, r.text
        assert http.get("/kv/sec", headers=client).json()["value"] == "v1"
        with KVClient(cluster.endpoint, timeout_s=5, keys=cluster.client_keys) as kv:
            assert kv.get("sec") == b"v1"
        scan = http.get("/kv", params={"prefix": "sec"}, headers=client)
        assert scan.status_code == 200 and [i["key"] for i in scan.json()["items"]] == ["sec"]
        assert http.get("/kv", params={"prefix": "sec"}).status_code == 401
        # ... and nothing else: the operator routes are 403
        for path in ("/metrics", "/ui/data"):
            r = http.get(path, headers=client)
            assert r.status_code == 403, (path, r.text)
            assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        # admin: data, metrics and the live page's cluster view (leader known)
        assert http.put("/kv/sec", content=b"v2", headers=admin).status_code == 200
        assert "zkv_gateway_requests_total" in http.get("/metrics", headers=admin).text
        view = http.get("/ui/data", headers=admin).json()
        assert view["error"] is None and view["cluster"]["shards"]["0"]["leader"], view
        # metrics: scrape only
        assert http.get("/metrics", headers=metrics).status_code == 200
        assert http.get("/kv/sec", headers=metrics).status_code == 403
        assert http.get("/kv", params={"prefix": ""}, headers=metrics).status_code == 403
        # the gateway's tally counts the refusals (what an operator alerts on)
        text = http.get("/metrics", headers=metrics).text
        assert 'code="401"' in text and 'code="403"' in text


def test_a_token_is_rotated_with_no_downtime(cluster: LocalCluster, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    old, new = "old-client-token-0123456789abc", "new-client-token-0123456789abc"
    tokens.write_text(f"client {old}\n")
    os.chmod(tokens, 0o600)
    gw = _gateway(cluster, tmp_path / "gateway.log", tokens=tokens)
    assert gw.start() is None
    failures: list[str] = []
    stop = threading.Event()
    current = {"token": old}
    done = {old: 0, new: 0}

    def load() -> None:  # a client that always uses the token it was last told to use
        with httpx.Client(base_url=gw.url, timeout=10) as http:
            i = 0
            while not stop.is_set():
                token = current["token"]
                r = http.put(f"/kv/rot{i % 50}", content=b"x",
                             headers={"Authorization": f"Bearer {token}"})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} with the {token[:3]} token: {r.text}")
                done[token] += 1
                i += 1

    def accepted(http: httpx.Client, token: str) -> bool:
        return http.get("/kv/rot0", headers={"Authorization": f"Bearer {token}"}
                        ).status_code != 401

    try:
        assert gw.wait_healthy(30), (tmp_path / "gateway.log").read_text(errors="replace")
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        with httpx.Client(base_url=gw.url, timeout=10) as http:
            time.sleep(0.5)
            # 1. add the new token beside the old one: both are accepted
            tokens.write_text(f"client {old}\nclient {new}\n")
            deadline = time.monotonic() + 10
            while not accepted(http, new):
                assert time.monotonic() < deadline, "the new token was never accepted"
                time.sleep(0.1)
            # 2. move the client to it; 3. retire the old one
            current["token"] = new
            time.sleep(0.5)
            tokens.write_text(f"client {new}\n")
            deadline = time.monotonic() + 10
            while accepted(http, old):
                assert time.monotonic() < deadline, "the old token was never retired"
                time.sleep(0.1)
            time.sleep(0.5)
        stop.set()
        worker.join(10)
        assert failures == []
        assert done[old] > 0 and done[new] > 0, done
        assert "tokens reloaded" in (tmp_path / "gateway.log").read_text(errors="replace")
    finally:
        stop.set()
        gw.stop()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    os.chmod(key, 0o600)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed")
def test_https_with_the_ca_and_nothing_in_plaintext(cluster: LocalCluster,
                                                    tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    log = tmp_path / "gateway.log"
    gw = _gateway(cluster, log, tokens=cluster.gateway_tokens, tls=(cert, key), ca=cert)
    assert gw.url.startswith("https://127.0.0.1:")
    assert gw.start() is None
    try:
        assert gw.wait_healthy(30), log.read_text(errors="replace")
        client = _token(cluster, "client")
        ca = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=gw.url, verify=ca, timeout=15) as https:
            assert https.put("/kv/tls", content=b"over tls", headers=client).status_code == 200
            assert https.get("/kv/tls", headers=client).json()["value"] == "over tls"
            assert https.get("/kv/tls").status_code == 401
        plain = gw.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port gets no answer
            httpx.get(plain + "/health", timeout=5)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(gw.url + "/health", timeout=5)  # the system CAs do not know ours
    finally:
        gw.stop()


def _gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "zkv.client.cli", "--endpoint", "tcp://127.0.0.1:1",
           "gateway", "--port", str(free_port()), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZKV_")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_non_loopback_without_tokens_is_refused_and_says_why(tmp_path: Path) -> None:
    done = _gateway_cli("--host", "0.0.0.0")
    assert done.returncode == 2, done.stderr
    assert "refusing to listen on 0.0.0.0 (not a loopback address) without bearer tokens" \
        in done.stderr
    assert "--insecure" in done.stderr and "Traceback" not in done.stderr
    loose = tmp_path / "tokens"
    loose.write_text("client some-client-token-0123456789\n")
    os.chmod(loose, 0o644)
    done = _gateway_cli("--host", "0.0.0.0", "--tokens", str(loose))
    assert done.returncode == 2 and "chmod 600" in done.stderr, done.stderr


def test_cluster_up_secure_starts_the_gateway_with_its_key_and_tokens(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    cmd = [sys.executable, "-m", "zkv.client.cli", "cluster", "up", "--secure", "--shards", "1",
           "--replicas", "1", "--data-dir", str(data), "--port", str(free_port_block(3)),
           "--fsync", "never", "--http-port", str(port), "--no-metrics"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not any("HTTP bearer tokens in" in line for line in lines):
            line = proc.stdout.readline()
            assert line, (lines, proc.stderr.read() if proc.stderr else "")
            lines.append(line)
        tokens = data / "keys" / "gateway" / "tokens"
        assert f"HTTP bearer tokens in {tokens}" in lines[-1]
        assert tokens.stat().st_mode & 0o777 == 0o600
        assert (data / "keys" / "public" / "clients" / "gateway.key").exists()
        assert any(f"HTTP gateway on http://127.0.0.1:{port}" in line for line in lines)
        # the command it prints, run as printed, carries the client token
        example = lines[-1].split("e.g. ", 1)[1].strip()
        assert example.startswith("curl ")
        done = subprocess.run(example + " -s -o /dev/null -w '%{http_code}'", shell=True,
                              capture_output=True, text=True, timeout=30)
        if shutil.which("curl") is not None:
            assert done.stdout == "404", (example, done.stdout, done.stderr)  # no key foo yet
        url = f"http://127.0.0.1:{port}"
        client = token_for(tokens, "client")
        with httpx.Client(base_url=url, timeout=15) as http:
            assert http.get("/kv/foo").status_code == 401
            r = http.put("/kv/foo", content=b"bar", headers={"Authorization": f"Bearer {client}"})
            assert r.status_code == 200, r.text
            assert http.get("/ready").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
