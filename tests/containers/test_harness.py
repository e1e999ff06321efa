"""The container harness itself, on fake broker and node processes (tests/containers/
fakes.py): readiness, host endpoints, and every fault helper. Needs only the image."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.containers.cluster import ContainerCluster, ping

pytestmark = [pytest.mark.containers, pytest.mark.timeout(180)]

FAKES = "/opt/fakes.py"


def _fake_cluster(cluster_factory: Callable[..., ContainerCluster]) -> ContainerCluster:
    return cluster_factory(
        shards=1,
        replicas=3,
        brokers=1,
        broker_command=lambda b: ["python", FAKES, "broker", "--broker-id", b],
        node_command=lambda n, s, peers, backends: ["python", FAKES, "node", "--node-id", n],
        files={FAKES: (Path(__file__).parent / "fakes.py").read_bytes()},
        expect_leaders=False,
    )


def _reachable(cluster: ContainerCluster, src: str, dst: str) -> bool:
    rc, _ = cluster.exec(src, f"python {FAKES} probe tcp://{dst}:7100 --timeout-ms 700")
    return rc == 0


def test_harness_faults(cluster_factory: Callable[..., ContainerCluster]) -> None:
    t0 = time.monotonic()
    c = _fake_cluster(cluster_factory)
    boot_s = time.monotonic() - t0
    assert ping(c.broker_endpoint("broker0")) == "broker0"
    assert _reachable(c, "s0r1", "s0r0") and _reachable(c, "s0r0", "s0r2")

    # kill + start: new ready line, same host endpoint, answers again
    endpoint = c.broker_endpoint("broker0")
    t = time.monotonic()
    c.kill("broker0")
    assert ping(endpoint, timeout_ms=300) is None
    c.start("broker0")
    restart_s = time.monotonic() - t
    assert c.broker_endpoint("broker0") == endpoint
    assert ping(c.broker_endpoint("broker0")) == "broker0"

    # pause: no answer while paused; a request sent meanwhile is answered on unpause
    c.pause("broker0")
    assert ping(c.broker_endpoint("broker0"), timeout_ms=500) is None
    c.unpause("broker0")
    assert ping(c.broker_endpoint("broker0")) == "broker0"

    # iptables: cut s0r0 <-> s0r1 only; s0r2 still reaches both
    c.iptables_drop("s0r0", ["s0r1"])
    assert not _reachable(c, "s0r1", "s0r0")
    assert not _reachable(c, "s0r0", "s0r1")
    assert _reachable(c, "s0r2", "s0r0") and _reachable(c, "s0r2", "s0r1")
    c.iptables_heal("s0r0")
    assert _reachable(c, "s0r1", "s0r0")

    # one-way: drop only what s0r0 receives from s0r2
    c.iptables_drop("s0r0", ["s0r2"], direction="in")
    assert not _reachable(c, "s0r2", "s0r0")
    c.iptables_heal("s0r0")
    assert _reachable(c, "s0r2", "s0r0")

    # disconnect / reconnect: the alias must survive
    c.disconnect("s0r0")
    assert not _reachable(c, "s0r1", "s0r0")
    c.reconnect("s0r0")
    deadline = time.monotonic() + 10
    while not _reachable(c, "s0r1", "s0r0"):
        assert time.monotonic() < deadline, "s0r0 unreachable by name after reconnect"
    # a broker disconnected and reconnected is still reachable from the host
    c.disconnect("broker0")
    c.reconnect("broker0")
    c.wait_ping("broker0", timeout_s=10)

    print(f"harness: boot {boot_s:.2f}s, broker kill+start {restart_s:.2f}s")
