"""Durability on real processes: with ``fsync=always`` an acknowledged write survives
SIGKILL of every node of its shard at once (invariant 1), through WAL replay alone and
through snapshot + WAL replay; deletes and CAS versions survive too.

Each test starts a ``LocalCluster`` (context manager: every child is stopped even when
the test fails), writes through the SDK, SIGKILLs all nodes together, restarts them on
the same data directories and reads everything back with its version.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import time
from pathlib import Path

import pytest

from zkv.client import AsyncKVClient, KVClient
from zkv.ops.cluster import LocalCluster
from zkv.protocol.errors import KVError

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]

KEYS = 2_000
HEARTBEAT_MS = 100
ELECTION_TIMEOUT_MS = 600
RECOVERED_RE = re.compile(r"recovered term=(\d+) log=(\d+)\.\.(\d+) snapshot=(\d+) keys=(\d+)")


# --------------------------------------------------------------------------- helpers


def _cluster(tmp_path: Path, replicas: int, node_args: tuple[str, ...] = ()) -> LocalCluster:
    return LocalCluster(tmp_path / "data", shards=1, replicas=replicas, brokers=1, port=0,
                        fsync="always", heartbeat_ms=HEARTBEAT_MS,
                        election_timeout_ms=ELECTION_TIMEOUT_MS, log_level="INFO",
                        node_args=node_args)


def _live_leader(cluster: LocalCluster, shard: int, above_term: int) -> tuple[str, int] | None:
    """The live leader of ``shard`` claiming a term above ``above_term``, per the broker."""
    try:
        status = cluster.status(timeout_s=1.0)
    except KVError:
        return None
    best: tuple[str, int] | None = None
    for n in status["nodes"]:
        if (n["shard_id"] == shard and n["role"] == 2 and n.get("live", True)
                and n["term"] > above_term and (best is None or n["term"] > best[1])):
            best = (n["node_id"], n["term"])
    return best


def wait_leader(cluster: LocalCluster, shard: int = 0, *, above_term: int = -1,
                timeout_s: float = 60.0) -> tuple[str, int]:
    """Wait for a live leader of ``shard`` at a term above ``above_term``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = _live_leader(cluster, shard, above_term)
        if found is not None:
            return found
        dead = [c.name for c in cluster.nodes.values() if c.proc is not None and c.proc.poll() is not None]
        assert not dead, f"nodes exited: {dead}\n" + "\n".join(cluster.nodes[n].tail() for n in dead)
        assert time.monotonic() < deadline, f"no leader of shard {shard} above term {above_term}"
        time.sleep(0.1)


def kill_all_nodes_at_once(cluster: LocalCluster) -> None:
    """SIGKILL every node process back to back, then reap them."""
    procs = [c.proc for c in cluster.nodes.values() if c.proc is not None and c.proc.poll() is None]
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=10)


def restart_all_nodes(cluster: LocalCluster) -> None:
    for nid in cluster.node_ids:
        cluster.restart_node(nid)


def _value(i: int) -> bytes:
    return f"value-{i:05d}-".encode() + bytes([i % 251]) * (i % 97)


async def _write_all(endpoints: list[str], n: int) -> dict[bytes, int]:
    async with AsyncKVClient(endpoints, timeout_s=60, max_in_flight=256) as kv:
        versions = await asyncio.gather(*(kv.put(f"key-{i:05d}", _value(i)) for i in range(n)))
    return {f"key-{i:05d}".encode(): v for i, v in enumerate(versions)}


async def _read_all(endpoints: list[str], keys: list[bytes]) -> list[tuple[bytes, int] | None]:
    async with AsyncKVClient(endpoints, timeout_s=60, max_in_flight=256) as kv:
        return list(await asyncio.gather(*(kv.get_versioned(k) for k in keys)))


def write_keys(cluster: LocalCluster, n: int = KEYS) -> dict[bytes, int]:
    versions = asyncio.run(asyncio.wait_for(_write_all(cluster.endpoints, n), 120))
    assert len(set(versions.values())) == n, "every put must get its own log index"
    return versions


def check_keys(cluster: LocalCluster, versions: dict[bytes, int]) -> None:
    keys = sorted(versions)
    got = asyncio.run(asyncio.wait_for(_read_all(cluster.endpoints, keys), 120))
    lost = [k for k, g in zip(keys, got, strict=True) if g is None]
    assert not lost, f"{len(lost)} acknowledged keys lost after restart, e.g. {lost[:5]}"
    wrong = [(k, g, versions[k]) for k, g in zip(keys, got, strict=True)
             if g != (_value(int(k[4:])), versions[k])]
    assert not wrong, f"{len(wrong)} keys with a wrong value/version, e.g. {wrong[:3]}"


def wal_record_count(node_dir: Path) -> int:
    """Records in the node's WAL segments, read-only (``u32 len | u32 crc | payload``)."""
    count = 0
    for seg in sorted((node_dir / "wal").glob("*.seg")):
        buf = seg.read_bytes()
        pos = 0
        while pos + 8 <= len(buf):
            (size, _) = struct.unpack_from("<II", buf, pos)
            if size == 0 or pos + 8 + size > len(buf):
                break  # (zeros: the tail the WAL writes ahead, storage_node/wal_tail.py)
            pos += 8 + size
            count += 1
    return count


def snapshot_indexes(node_dir: Path) -> list[int]:
    return sorted(int(p.name[:20]) for p in (node_dir / "snap").glob("*.snap"))


def recovered_lines(cluster: LocalCluster, nid: str) -> list[tuple[int, ...]]:
    text = cluster.nodes[nid].log_path.read_text(errors="replace")
    return [tuple(int(g) for g in m.groups()) for m in RECOVERED_RE.finditer(text)]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("replicas", "wal_sync"), [(1, "aio"), (3, "aio"), (3, "thread"),
                                                    (3, "inline")])
def test_acknowledged_writes_survive_sigkill_of_every_node(tmp_path: Path, replicas: int,
                                                           wal_sync: str) -> None:
    """Every place the fsync may run (``--wal-sync``): in the kernel through Linux AIO
    (the default), on the sync thread, and in the node's loop."""
    with _cluster(tmp_path, replicas, ("--wal-sync", wal_sync)) as cluster:
        cluster.wait_ready(60)
        for nid, node in cluster.nodes.items():  # each runs the fsync where it was asked
            text = node.log_path.read_text(errors="replace")
            assert (f"(--wal-sync {wal_sync})" in text
                    or (wal_sync == "aio" and "Linux AIO fsync is not available" in text)), nid
        _, term = wait_leader(cluster)
        started = time.monotonic()
        versions = write_keys(cluster)
        written_s = time.monotonic() - started
        kill_all_nodes_at_once(cluster)
        restart_all_nodes(cluster)
        leader, new_term = wait_leader(cluster, above_term=term)
        recovered_s = time.monotonic() - started - written_s
        check_keys(cluster, versions)
        print(f"\n{replicas} replica(s): {KEYS} puts in {written_s:.1f}s; after SIGKILL of all "
              f"nodes, {leader} leads at term {new_term} after {recovered_s:.1f}s")


@pytest.mark.parametrize("replicas", [1, 3])
def test_acknowledged_writes_survive_sigkill_across_snapshots(tmp_path: Path, replicas: int) -> None:
    with _cluster(tmp_path, replicas, ("--snapshot-entries", "500")) as cluster:
        cluster.wait_ready(60)
        _, term = wait_leader(cluster)
        versions = write_keys(cluster)
        last = max(versions.values())
        # Every replica snapshots once it has applied 500 entries past its last snapshot;
        # followers learn the commit index a heartbeat later, so give them a moment.
        deadline = time.monotonic() + 20
        node_dirs = {nid: cluster.data_dir / nid for nid in cluster.node_ids}
        while not all(snapshot_indexes(d) and snapshot_indexes(d)[-1] >= last - 500
                      for d in node_dirs.values()):
            assert time.monotonic() < deadline, {n: snapshot_indexes(d) for n, d in node_dirs.items()}
            time.sleep(0.2)
        wal_counts = {nid: wal_record_count(d) for nid, d in node_dirs.items()}
        snaps = {nid: snapshot_indexes(d) for nid, d in node_dirs.items()}
        kill_all_nodes_at_once(cluster)
        restart_all_nodes(cluster)
        wait_leader(cluster, above_term=term)
        check_keys(cluster, versions)
        for nid in cluster.node_ids:
            rec = recovered_lines(cluster, nid)
            assert len(rec) >= 2, f"{nid} did not log its recovery: {rec}"
            snap_at_restart = rec[-1][3]
            assert snap_at_restart >= last - 500, (
                f"{nid} restarted from snapshot {snap_at_restart}, expected >= {last - 500}")
        print(f"\n{replicas} replica(s): last index {last}; snapshots {snaps}; WAL records on "
              f"disk {wal_counts} (a segment is compacted only once it is full and not the last)")


@pytest.mark.parametrize("replicas", [1, 3])
def test_deletes_and_cas_versions_survive_restart(tmp_path: Path, replicas: int) -> None:
    with _cluster(tmp_path, replicas, ("--snapshot-entries", "50")) as cluster:
        cluster.wait_ready(60)
        _, term = wait_leader(cluster)
        with KVClient(cluster.endpoints, timeout_s=30) as kv:
            kv.put("gone-early", "x")
            assert kv.delete("gone-early") is True
            v1 = kv.put("counter", "1")
            swapped, v2 = kv.cas_versioned("counter", v1, "2")
            assert swapped and v2 > v1
            assert kv.cas_versioned("counter", v1, "stale") == (False, v2)
            for i in range(120):  # push the early writes into snapshots
                kv.put(f"filler-{i}", str(i))
            kv.put("gone-late", "y")
            assert kv.delete("gone-late") is True
            swapped, v3 = kv.cas_versioned("counter", v2, "3")
            assert swapped and v3 > v2
            absent_v = kv.cas_versioned("fresh", 0, "created")
            assert absent_v[0] is True
        kill_all_nodes_at_once(cluster)
        restart_all_nodes(cluster)
        wait_leader(cluster, above_term=term)
        with KVClient(cluster.endpoints, timeout_s=30) as kv:
            assert kv.get("gone-early") is None
            assert kv.get("gone-late") is None
            assert kv.get_versioned("counter") == (b"3", v3)
            assert kv.get_versioned("fresh") == (b"created", absent_v[1])
            assert kv.cas_versioned("counter", v2, "old") == (False, v3)
            assert kv.cas_versioned("fresh", 0, "again") == (False, absent_v[1])
            swapped, v4 = kv.cas_versioned("counter", v3, "4")
            assert swapped and v4 > v3
            assert kv.delete("gone-early") is False
            assert kv.get_versioned("counter") == (b"4", v4)
