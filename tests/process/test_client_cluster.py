"""The SDK, the CLI and LocalCluster against real broker and storage-node processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from zkv.client import AsyncKVClient, KVClient
from zkv.ops.cluster import LocalCluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(90)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "data", shards=2, replicas=3, port=0, fsync="never",
                      heartbeat_ms=50, election_timeout_ms=500, log_level="INFO") as c:
        c.wait_ready(30)
        yield c


def test_round_trips_and_leader_failover(cluster: LocalCluster) -> None:
    with KVClient(cluster.endpoints, timeout_s=10) as kv:
        versions = {f"k{i}": kv.put(f"k{i}", f"v{i}") for i in range(20)}
        assert all(kv.get(k) == f"v{i}".encode() for i, k in enumerate(versions))
        assert kv.get_versioned("k0") == (b"v0", versions["k0"])
        assert kv.cas("k0", versions["k0"], "w") is True
        assert kv.delete("k1") is True and kv.get("k1") is None
        leader = cluster.leader_of(0)
        cluster.kill_node(leader, signal.SIGKILL)
        start = time.monotonic()
        for i in range(20):  # every key still writable and readable after failover
            kv.put(f"k{i}", f"after{i}")
            assert kv.get(f"k{i}") == f"after{i}".encode()
        assert time.monotonic() - start < 10
        assert cluster.leader_of(0) != leader
        cluster.restart_node(leader)
        deadline = time.monotonic() + 15
        while leader not in {n["node_id"] for n in kv.status()["nodes"]}:
            assert time.monotonic() < deadline, "restarted node never heartbeated"
            time.sleep(0.2)


def test_async_client_pipelines_against_real_cluster(cluster: LocalCluster) -> None:
    async def main() -> None:
        async with AsyncKVClient(cluster.endpoints, timeout_s=10) as kv:
            await asyncio.gather(*(kv.put(f"a{i}", str(i)) for i in range(300)))
            got = await asyncio.gather(*(kv.get(f"a{i}") for i in range(300)))
            assert got == [str(i).encode() for i in range(300)]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_broker_restart_keeps_data(cluster: LocalCluster) -> None:
    with KVClient(cluster.endpoints, timeout_s=15) as kv:
        kv.put("durable", "yes")
        cluster.restart_broker(0)
        assert kv.get("durable") == b"yes"


def _pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().split()[2]
            except OSError:
                continue
            if text in cmdline and state != "Z":
                pids.append(int(entry.name))
    return pids


def test_cli_cluster_up_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    from zkv.ops.cluster import free_port_block

    port = free_port_block(3)
    data = tmp_path / "cli-data"
    cmd = [sys.executable, "-m", "zkv.client.cli", "cluster", "up", "--shards", "1",
           "--replicas", "1", "--data-dir", str(data), "--port", str(port), "--fsync", "never"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == f"zkv cluster up: serving on tcp://127.0.0.1:{port}"
        with KVClient(f"tcp://127.0.0.1:{port}", timeout_s=10) as kv:
            kv.put("x", "1")
        children = _pids_mentioning(str(data))
        assert len(children) == 2  # the CLI and the node (the broker has no data dir)
        assert (data / "cluster.json").exists() and (data / "logs" / "s0r0.log").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert _pids_mentioning(str(data)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The same data dir on another port brings the data back.
    port2 = free_port_block(3)
    with LocalCluster(data, port=port2, fsync="never") as c:
        c.wait_ready(30)
        with KVClient(c.endpoints, timeout_s=10) as kv:
            assert kv.get("x") == b"1"
    assert os.listdir(data / "logs")


def test_cli_cluster_up_with_8_shards_spreads_the_keys(tmp_path: Path) -> None:
    """``zkv cluster up --shards 8`` (x 3 replicas: 24 node processes): every shard gets
    a leader and its share of the keys, and ``zkv status`` shows each shard's ring share
    and key count."""
    from zkv.ops.cluster import free_port_block
    from zkv.protocol.ring import Ring

    port = free_port_block(3)
    endpoint = f"tcp://127.0.0.1:{port}"
    data = tmp_path / "cli-data"
    cmd = [sys.executable, "-m", "zkv.client.cli", "cluster", "up", "--shards", "8",
           "--replicas", "3", "--data-dir", str(data), "--port", str(port), "--fsync", "never"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != f"zkv cluster up: serving on {endpoint}":
            proc.kill()  # say why: the supervisor's own account of its start
            raise AssertionError(f"no serving line ({line!r}); supervisor stderr:\n"
                                 f"{proc.communicate(timeout=30)[1][-4000:]}")
        keys = [f"key-{i}" for i in range(800)]
        with KVClient(endpoint, timeout_s=20) as kv:
            for k in keys:
                kv.put(k, k)
            assert all(kv.get(k) == k.encode() for k in keys[::37])
        ring = Ring.of(range(8))
        expected = {s: sum(1 for k in keys if ring.shard_for(k.encode()) == s) for s in range(8)}
        assert all(n > 0 for n in expected.values())
        deadline = time.monotonic() + 10  # key counts travel in heartbeats (100 ms)
        while True:
            status = subprocess.run(
                [sys.executable, "-m", "zkv.client.cli", "--endpoint", endpoint, "status"],
                capture_output=True, text=True, timeout=30)
            assert status.returncode == 0, status.stderr
            rows = {int(m.group(1)): m for m in re.finditer(
                r"^shard (\d+)  leader (\S+) .* ring share ([\d.]+)%  keys (\d+|-)$",
                status.stdout, re.MULTILINE)}
            counts = {s: m.group(4) for s, m in rows.items()}
            if counts == {s: str(n) for s, n in expected.items()}:
                break
            assert time.monotonic() < deadline, f"{expected}\n{status.stdout}"
            time.sleep(0.3)
        shares = {s: float(m.group(3)) for s, m in rows.items()}
        assert all(m.group(2) != "NONE" for m in rows.values())
        assert abs(sum(shares.values()) - 100) < 0.5 and all(5 < v < 20 for v in shares.values())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_cluster_created_at_256_vnodes_keeps_them_after_the_default_changed(
    tmp_path: Path,
) -> None:
    """A data dir from before the 1024 default: its nodes persisted a 256-vnode ring and
    its cluster.json has no ``vnodes``. Restarted, it serves at 256 (the persisted ring
    wins over ``--vnodes``), and cluster.json then records 256 so an added shard's nodes
    start from the same ring."""
    import json

    from zkv.protocol.ring import Ring

    data = tmp_path / "data"
    with LocalCluster(data, shards=2, replicas=1, port=0, fsync="never", vnodes=256) as c:
        c.wait_ready(30)
        with KVClient(c.endpoints, timeout_s=10) as kv:
            for i in range(40):
                kv.put(f"k{i}", f"v{i}")
    spec = json.loads((data / "cluster.json").read_text())
    del spec["vnodes"]  # as written before vnodes were recorded
    (data / "cluster.json").write_text(json.dumps(spec))
    with LocalCluster(data, port=0, fsync="never", node_args=("--vnodes", "1024")) as c:
        c.wait_ready(30)
        assert json.loads((data / "cluster.json").read_text())["vnodes"] == 256
        with KVClient(c.endpoints, timeout_s=10) as kv:
            assert kv.status()["ring"]["vnodes"] == 256
            assert all(kv.get(f"k{i}") == f"v{i}".encode() for i in range(40))
            ring = Ring.of(range(2), vnodes=256)
            expected = {s: sum(ring.shard_for(f"k{i}".encode()) == s for i in range(40))
                        for s in (0, 1)}
            deadline = time.monotonic() + 10  # key counts travel in heartbeats
            while True:
                counts = {int(n["shard_id"]): int(n["key_count"])
                          for n in kv.status()["nodes"]}
                if counts == expected or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert counts == expected
