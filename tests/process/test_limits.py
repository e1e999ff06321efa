"""Limits on a real 3-node shard: the data quota (``--max-data-bytes``) and log
compaction by bytes (``--snapshot-bytes``), issue 10 item 7b and the quota bullet."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.process.test_durability import snapshot_indexes, wait_leader
from zkv.client import KVClient
from zkv.client.cli import annotate_status, format_status
from zkv.ops.cluster import LocalCluster
from zkv.protocol.errors import QuotaExceeded

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

QUOTA = 20_000


def test_filling_the_quota_gives_quota_exceeded_and_nothing_else_breaks(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "data", shards=1, replicas=3, port=0, fsync="always",
                      heartbeat_ms=100, election_timeout_ms=600,
                      node_args=("--max-data-bytes", str(QUOTA))) as cluster:
        cluster.wait_ready(60)
        wait_leader(cluster)
        value = b"v" * 990  # + a 10-byte key: 1000 bytes a key
        with KVClient(cluster.endpoints, timeout_s=10) as kv:
            stored = 0
            with pytest.raises(QuotaExceeded) as err:
                for i in range(100):
                    kv.put(f"key-{i:06d}", value)
                    stored += 1
            assert stored == QUOTA // 1000
            assert "quota" in str(err.value)
            # reads, deletes, shrinking overwrites and CAS that shrink still work
            assert kv.get("key-000000") == value
            assert kv.delete("key-000000") is True
            kv.put("key-000001", b"small")
            kv.put("key-000000", value)  # room again after the delete and the shrink
            with pytest.raises(QuotaExceeded):
                kv.put("one-more-key", value)
            # status shows usage against the quota on every node
            deadline = time.monotonic() + 5
            while True:
                text = format_status(annotate_status(cluster.status()))
                if text.count(f"/{QUOTA / 1024:.1f}KiB") == 3:
                    break
                assert time.monotonic() < deadline, text
                time.sleep(0.2)
            print("\n" + text)
        for c in cluster.nodes.values():
            assert c.alive, c.tail()


def test_log_is_compacted_by_bytes_as_well_as_entries(tmp_path: Path) -> None:
    """256 KiB values, --snapshot-bytes 2 MiB: snapshots come every ~8 entries although
    --snapshot-entries is 50,000, so the in-memory log stays near 2 MiB."""
    with LocalCluster(tmp_path / "data", shards=1, replicas=3, port=0, fsync="always",
                      heartbeat_ms=100, election_timeout_ms=600,
                      node_args=("--snapshot-bytes", str(2 << 20))) as cluster:
        cluster.wait_ready(60)
        wait_leader(cluster)
        with KVClient(cluster.endpoints, timeout_s=10) as kv:
            for i in range(40):
                kv.put(f"big-{i % 4}", bytes([i]) * (256 << 10))
        deadline = time.monotonic() + 10
        dirs = [cluster.data_dir / nid for nid in cluster.node_ids]
        while not all(snapshot_indexes(d) and snapshot_indexes(d)[-1] >= 30 for d in dirs):
            assert time.monotonic() < deadline, [snapshot_indexes(d) for d in dirs]
            time.sleep(0.1)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for RSS")
def test_memory_stays_bounded_with_values_near_the_limit(tmp_path: Path) -> None:
    """Item 7b: 1000 KiB values; by count alone (50,000 entries) every node kept the whole
    log in memory (~350 MB at 300 such puts, growing without bound). By bytes
    (--snapshot-bytes 16 MiB) a node stays near its baseline + 16 MiB of log + the data."""
    with LocalCluster(tmp_path / "data", shards=1, replicas=3, port=0, fsync="never",
                      heartbeat_ms=100, election_timeout_ms=600,
                      node_args=("--snapshot-bytes", str(16 << 20))) as cluster:
        cluster.wait_ready(60)
        wait_leader(cluster)
        value = b"v" * (1000 << 10)
        peak: dict[str, float] = {}
        with KVClient(cluster.endpoints, timeout_s=20) as kv:
            for i in range(200):
                kv.put(f"big-{i % 8}", value)
                if i % 10 == 9:
                    for nid in cluster.node_ids:
                        pid = cluster.node_pid(nid)
                        if pid:
                            peak[nid] = max(peak.get(nid, 0.0), _rss_mb(pid))
        print(f"\npeak RSS after 200 puts of 1000 KiB (--snapshot-bytes 16 MiB): "
              f"{ {n: round(v) for n, v in peak.items()} } MB")
        assert max(peak.values()) < 180, peak  # by count: > 250 MB here
