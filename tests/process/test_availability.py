"""A leader the brokers cannot hear, or cannot reach, no longer keeps its shard down
(issue 10, item 3 and the availability rule).

1 shard x 3 replicas and one broker on 127.0.0.1. Each node reaches the broker (its
backend DEALER and its heartbeat PUB) through TCP proxies of its own, while the nodes
reach each other directly. The fault drops one direction of every byte between the
leader and the broker, on every connection present or future (``BlackholeProxy.drop``:
what an iptables rule on the leader's host does), and lasts the whole measurement:

- ``leader_to_broker``: the broker stops hearing the leader; it asks the followers to
  campaign, but they still hear their leader and refuse;
- ``broker_to_leader``: the broker's requests, campaigns and confirmations never reach
  the leader (and the ZMTP handshakes of its reconnections never complete).

Before the rule, either way: no successful request for 20 s (and for as long as the cut
lasts). With it: the leader, no longer confirmed by any broker (``Heard``), steps down
after an election timeout, its followers' lease on it runs out one more election
timeout later, and a follower that the broker hears is elected: the shard serves again
within ~2 election timeouts (asserted: < 5 s with a 1 s election timeout). Every write
acknowledged before, during or after the cut is read back once it heals.
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
from zkv.ops.cluster import free_port
from zkv.protocol.errors import KVError

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

HEARTBEAT_MS = 100
ELECTION_TIMEOUT_MS = 1000
NODES = ("n0", "n1", "n2")
READY_RE = re.compile(r"ready frontend=(\S+) backend=(\S+) heartbeats=(\S+)")
#: ~2 election timeouts, plus a client retry and slack for a loaded machine
RECOVERY_S_MAX = 5.0
#: a restarted broker serves within a few heartbeats (architecture, invariant 5)
RESTART_S_MAX = 0.9
#: how long a try goes on before the test gives up (issue 10 saw 0 successes in 20 s)
GIVE_UP_S = 20.0


class Shard:
    """One broker and three nodes, each node behind its own two proxies."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.proxies: dict[str, tuple[BlackholeProxy, BlackholeProxy]] = {}

    def start(self) -> None:
        timing = ["--heartbeat-ms", str(HEARTBEAT_MS),
                  "--election-timeout-ms", str(ELECTION_TIMEOUT_MS)]
        any_port = "tcp://127.0.0.1:*"
        self.frontend, backend, heartbeats = self.start_broker(any_port, any_port, any_port)
        ports = {n: free_port() for n in NODES}
        for n in NODES:
            proxies = (BlackholeProxy("127.0.0.1", _port(backend)),
                       BlackholeProxy("127.0.0.1", _port(heartbeats)))
            self.proxies[n] = proxies
            peers = ",".join(f"{p}=tcp://127.0.0.1:{ports[p]}" for p in NODES if p != n)
            self._spawn(n, [
                "-m", "zkv.storage_node.main", "--node-id", n, "--shard", "0",
                "--data-dir", str(self.tmp / n), "--listen", f"tcp://127.0.0.1:{ports[n]}",
                "--peers", peers, "--brokers", proxies[0].endpoint,
                "--heartbeat-endpoints", proxies[1].endpoint, "--fsync", "always", *timing,
                "--bootstrap",  # a new shard: founded once a majority of peers agree
            ])  # fmt: skip

    def start_broker(self, frontend: str, backend: str, heartbeats: str) -> tuple[str, ...]:
        timing = ["--heartbeat-ms", str(HEARTBEAT_MS),
                  "--election-timeout-ms", str(ELECTION_TIMEOUT_MS)]
        log = self.tmp / "broker.log"
        seen = len(log.read_text(errors="replace")) if log.exists() else 0
        self._spawn("broker", [
            "-m", "zkv.broker.main", "--broker-id", "b0", "--frontend", frontend,
            "--backend", backend, "--heartbeat-endpoint", heartbeats, *timing,
        ])  # fmt: skip
        self.broker = self.procs[-1]
        deadline = time.monotonic() + 15
        while True:
            m = READY_RE.search(log.read_text(errors="replace")[seen:]) if log.exists() else None
            if m:
                return m.groups()
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.05)

    def _spawn(self, name: str, argv: list[str]) -> Path:
        log = self.tmp / f"{name}.log"
        with log.open("ab") as out:
            self.procs.append(subprocess.Popen([sys.executable, *argv], stdout=out, stderr=out))
        return log

    def leader(self, kv: KVClient) -> str:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                rows = kv.status()["nodes"]
            except KVError:
                continue
            leaders = [r["node_id"] for r in rows if r["role"] == 2 and r["live"]]
            if len(leaders) == 1:
                return str(leaders[0])
            time.sleep(0.05)
        raise AssertionError("no leader within 15 s")

    def cut(self, node: str, to_broker: bool, from_broker: bool) -> None:
        for proxy in self.proxies[node]:
            proxy.drop(to_upstream=to_broker, to_client=from_broker)

    def heal(self) -> None:
        for pair in self.proxies.values():
            for proxy in pair:
                proxy.restore()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        for pair in self.proxies.values():
            for proxy in pair:
                proxy.close()


@pytest.fixture
def shard(tmp_path: Path) -> Iterator[Shard]:
    s = Shard(tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.close()


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _wait_for(log: Path, pattern: re.Pattern[str], timeout_s: float = 15) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = pattern.search(log.read_text(errors="replace")) if log.exists() else None
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"{pattern.pattern!r} not in {log}:\n{log.read_text()[-3000:]}")


def _put_until_ok(kv: KVClient, acked: dict[str, str], key: str, value: str,
                  give_up_s: float) -> float | None:
    """Seconds until ``put`` succeeds (recorded in ``acked``); None if it never did."""
    start = time.monotonic()
    while time.monotonic() - start < give_up_s:
        try:
            kv.put(key, value, timeout=0.5)
        except KVError:
            continue
        acked[key] = value
        return time.monotonic() - start
    return None


def test_a_leader_that_steps_down_while_every_broker_is_down_is_replaced_at_once(
    shard: Shard,
) -> None:
    """The rule's cost: with its only broker down for longer than an election timeout,
    the leader steps down (nobody could route to it anyway). The restarted broker hears
    it claim no leadership while the followers still name it, treats the name as stale
    and asks for an election at once: the shard serves within a few heartbeats of the
    broker being back, not an election timeout later."""
    acked: dict[str, str] = {}
    with KVClient(shard.frontend, timeout_s=2.0) as kv:
        assert _put_until_ok(kv, acked, "before", "1", give_up_s=30) is not None
        leader = shard.leader(kv)
    backend, heartbeats = (proxy.upstream[1] for proxy in shard.proxies[NODES[0]])
    shard.broker.kill()
    shard.broker.wait(timeout=10)
    time.sleep(2.5 * ELECTION_TIMEOUT_MS / 1000)
    stepped = (shard.tmp / f"{leader}.log").read_text(errors="replace")
    assert "no broker has confirmed hearing us" in stepped, stepped[-2000:]
    shard.start_broker(shard.frontend, f"tcp://127.0.0.1:{backend}",
                       f"tcp://127.0.0.1:{heartbeats}")
    with KVClient(shard.frontend, timeout_s=2.0) as kv:
        took = _put_until_ok(kv, acked, "after", "2", give_up_s=GIVE_UP_S)
        assert took is not None, shard.logs()
        print(f"served {took:.2f} s after the restarted broker was ready")
        # a few heartbeats (reconnect, hear a majority, campaign, elect), well under the
        # election timeout that waiting on the stale name would add (measured 1.1 s)
        assert took < RESTART_S_MAX, f"served only {took:.1f} s after the restart"
        for key, value in acked.items():
            assert kv.get(key) == value.encode(), key


@pytest.mark.parametrize("direction", ["leader_to_broker", "broker_to_leader"])
def test_a_leader_cut_from_the_broker_hands_the_shard_over(shard: Shard, direction: str) -> None:
    acked: dict[str, str] = {}
    with KVClient(shard.frontend, timeout_s=2.0) as kv:
        for i in range(20):
            assert _put_until_ok(kv, acked, f"before{i}", str(i), give_up_s=30) is not None
        leader = shard.leader(kv)
        shard.cut(leader, to_broker=direction == "leader_to_broker",
                  from_broker=direction == "broker_to_leader")
        took = _put_until_ok(kv, acked, "during", "x", give_up_s=GIVE_UP_S)
        assert took is not None, (
            f"{direction}: no successful put in {GIVE_UP_S:.0f} s with leader {leader} cut "
            f"from the broker\n{shard.logs()}"
        )
        new_leader = shard.leader(kv)
        for i in range(5):
            assert _put_until_ok(kv, acked, f"after{i}", str(i), give_up_s=10) is not None
        print(f"{direction}: served again {took:.2f} s after the cut "
              f"(leader {leader} -> {new_leader})")
        assert new_leader != leader
        assert took < RECOVERY_S_MAX, f"{direction}: served again only after {took:.1f} s"
        shard.heal()
        for key, value in acked.items():
            assert kv.get(key) == value.encode(), key
