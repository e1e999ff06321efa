"""Dead connections are noticed and replaced (issue 10, item 1).

A storage node reaches its broker's backend through a TCP proxy. The proxy then turns
the live connection into a black hole: it stays ESTABLISHED on both ends but carries
nothing, the shape that a network fault, a reconnect to a new address, or a broker
that closed its end while the node's end stayed open leaves behind. The broker still
hears the node's heartbeats (they travel on another connection), so it keeps routing
to that leader. Without liveness on the connection the shard answered nothing for
minutes; with ZMTP heartbeats the node sees its PINGs go unanswered, drops the dead
connection and connects again, and the shard serves within a few seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tcp_proxy import BlackholeProxy
from zkv.client import KVClient
from zkv.ops.cluster_spec import free_port
from zkv.protocol.errors import KVError

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

HEARTBEAT_MS = 100
ELECTION_TIMEOUT_MS = 1000
READY_RE = re.compile(r"ready frontend=(\S+) backend=(\S+) heartbeats=(\S+)")
#: The promise: a dead connection is noticed within an election timeout; allow the
#: reconnect, the broker's handover and a client retry on top.
RECOVERY_S_MAX = 5.0


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> Path:
        log = self.tmp / f"{name}.log"
        with log.open("ab") as out:
            self.procs.append(subprocess.Popen(argv, stdout=out, stderr=out))
        return log

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def wait_for(log: Path, pattern: re.Pattern[str], timeout_s: float = 15) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = pattern.search(log.read_text(errors="replace")) if log.exists() else None
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"{pattern.pattern!r} not in {log}:\n{log.read_text()[-3000:]}")


TIMING = ["--heartbeat-ms", str(HEARTBEAT_MS), "--election-timeout-ms", str(ELECTION_TIMEOUT_MS)]


def start_broker(procs: Procs) -> tuple[str, ...]:
    """A broker on free ports: its frontend, backend and heartbeat endpoints."""
    any_port = "tcp://127.0.0.1:*"
    blog = procs.start("broker", [
        sys.executable, "-m", "zkv.broker.main", "--broker-id", "b0", "--frontend", any_port,
        "--backend", any_port, "--heartbeat-endpoint", any_port, *TIMING,
    ])  # fmt: skip
    return wait_for(blog, READY_RE).groups()


def put_until_ok(kv: KVClient, key: str, value: str, timeout_s: float) -> float:
    start = time.monotonic()
    while True:
        try:
            kv.put(key, value, timeout=0.5)
            return time.monotonic() - start
        except KVError:
            assert time.monotonic() - start < timeout_s, f"no successful put in {timeout_s}s"


def test_half_open_broker_connection_is_replaced(procs: Procs, tmp_path: Path) -> None:
    frontend, backend, heartbeats = start_broker(procs)
    port = int(backend.rsplit(":", 1)[1])
    proxy = BlackholeProxy("127.0.0.1", port)
    try:
        procs.start("node", [
            sys.executable, "-m", "zkv.storage_node.main", "--node-id", "n0", "--shard", "0",
            "--data-dir", str(tmp_path / "n0"), "--listen", "tcp://127.0.0.1:0",
            "--brokers", proxy.endpoint, "--heartbeat-endpoints", heartbeats,
            "--fsync", "never", "--bootstrap", *TIMING,
        ])  # fmt: skip
        with KVClient(frontend, timeout_s=2.0) as kv:
            put_until_ok(kv, "before", "1", timeout_s=30)
            assert proxy.blackhole() >= 1
            took = put_until_ok(kv, "after", "2", timeout_s=30)
            assert kv.get("after") == b"2" and kv.get("before") == b"1"
        print(f"served again {took:.2f} s after the connection went dead")
        assert took < RECOVERY_S_MAX, f"the shard served again only after {took:.1f}s"
        assert proxy.accepted >= 2, "the node never reconnected"
    finally:
        proxy.close()


REFUSED_RE = re.compile(r"refused peer connection #\d+: s0r0 \(shard 0\) dialed s0r1 but "
                        r"reached s1r0")
REDIAL_RE = re.compile(r"our connection to s0r1 reached s1r0 \(shard 1, cluster '[^']*'\).*"
                       r"redialing s0r1")


def test_peer_address_that_reaches_the_wrong_node_is_refused_loudly(
    procs: Procs, tmp_path: Path
) -> None:
    """A node whose address for a peer now belongs to another shard's node (a container
    came back elsewhere): the wrong node refuses the connection and says so, the dialer
    is told, logs the stale address and redials (which resolves the name again)."""
    _, backend, heartbeats = start_broker(procs)
    wrong = f"tcp://127.0.0.1:{free_port()}"
    common = ["--brokers", backend, "--heartbeat-endpoints", heartbeats, "--fsync", "never",
              "--shards", "0,1", "--bootstrap", *TIMING]
    clog = procs.start("s1r0", [
        sys.executable, "-m", "zkv.storage_node.main", "--node-id", "s1r0", "--shard", "1",
        "--data-dir", str(tmp_path / "s1r0"), "--listen", wrong, *common,
    ])  # fmt: skip
    alog = procs.start("s0r0", [
        sys.executable, "-m", "zkv.storage_node.main", "--node-id", "s0r0", "--shard", "0",
        "--data-dir", str(tmp_path / "s0r0"), "--listen", f"tcp://127.0.0.1:{free_port()}",
        "--peers", f"s0r1={wrong}", *common,
    ])  # fmt: skip
    wait_for(clog, REFUSED_RE, timeout_s=20)
    wait_for(alog, REDIAL_RE, timeout_s=20)
