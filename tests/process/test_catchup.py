"""A follower that missed more than the leader kept in its log catches up by snapshot."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from zkv.client import AsyncKVClient, KVClient
from zkv.ops.cluster import LocalCluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def test_follower_behind_a_compacted_log_installs_the_leaders_snapshot(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "data", shards=1, replicas=3, port=0, fsync="always",
                      node_args=["--snapshot-entries", "200"]) as cluster:
        cluster.wait_ready(30)
        leader = cluster.leader_of(0)
        follower = next(n for n in cluster.node_ids if n != leader)
        cluster.kill_node(follower, signal.SIGKILL)

        async def load() -> None:
            async with AsyncKVClient(cluster.endpoints, timeout_s=20) as kv:
                await asyncio.gather(*(kv.put(f"k{i}", f"v{i}") for i in range(1500)))

        asyncio.run(asyncio.wait_for(load(), 60))
        cluster.restart_node(follower)
        deadline = time.monotonic() + 30
        while True:
            nodes = {n["node_id"]: n for n in cluster.status()["nodes"]}
            f, lead = nodes.get(follower), nodes.get(leader)
            if f and lead and f["applied_index"] >= lead["commit_index"] and f["key_count"] == 1500:
                break
            assert time.monotonic() < deadline, f"follower never caught up: {f} vs {lead}"
            time.sleep(0.2)
        log = (tmp_path / "data" / "logs" / f"{follower}.log").read_text()
        assert "installed snapshot" in log  # caught up by snapshot, not from the log
        # and it serves stale reads with the data
        with KVClient(cluster.endpoints, timeout_s=10) as kv:
            cluster.kill_node(leader, signal.SIGKILL)  # the caught-up node may now lead
            assert kv.get("k1499") == b"v1499"
