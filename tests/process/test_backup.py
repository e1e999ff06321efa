"""Backup and restore on real processes: ``zkv admin snapshot save`` while writers keep
writing, ``zkv cluster restore`` into a new data dir, and the restored cluster (2
shards x 3) serves every key acknowledged before the save started, with its version."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from zkv.client import KVClient
from zkv.client.cli import main
from zkv.ops.cluster import LocalCluster
from zkv.ops.membership import members
from zkv.protocol.errors import KVError
from zkv.protocol.messages import AdminAddReplica

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]


def _cluster(data_dir: Path) -> LocalCluster:
    return LocalCluster(data_dir, shards=2, replicas=3, brokers=1, port=0, fsync="always",
                        heartbeat_ms=100, election_timeout_ms=600, log_level="INFO")


def test_snapshot_save_under_load_and_restore_into_a_new_cluster(tmp_path: Path) -> None:
    acked: dict[str, int] = {}
    with _cluster(tmp_path / "old") as old:
        old.wait_ready(60)
        with KVClient(old.endpoints, timeout_s=30) as kv:
            for i in range(1000):
                acked[f"k{i:04d}"] = kv.put(f"k{i:04d}", f"v{i}")
        stop = threading.Event()

        def writer() -> None:
            with KVClient(old.endpoints, timeout_s=5) as kv:
                n = 0
                while not stop.is_set():
                    try:
                        kv.put(f"during-{n % 100}", str(n))
                    except KVError:
                        pass
                    n += 1

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        try:
            assert main(["admin", "snapshot", "save", str(tmp_path / "backup"),
                         "--endpoint", old.endpoint]) == 0
        finally:
            stop.set()
            t.join(30)
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert sum(s["keys"] for s in manifest["shards"].values()) >= 1000

    assert main(["cluster", "restore", str(tmp_path / "backup"),
                 "--data-dir", str(tmp_path / "new")]) == 0
    with _cluster(tmp_path / "new") as new:
        new.wait_ready(60)
        with KVClient(new.endpoints, timeout_s=30) as kv:
            got = {k: kv.get_versioned(k) for k in acked}
            missing = [k for k, g in got.items() if g is None or g[1] != acked[k]]
            assert not missing, f"{len(missing)} keys lost or changed, e.g. {missing[:5]}"
            assert kv.put("after-restore", "x") > 0  # and writable
        deadline = time.monotonic() + 30
        while True:  # every restored node is a voter, not an empty newcomer
            nodes = new.status()["nodes"]
            if len(nodes) == 6 and all(n["extra"]["voter"] is True for n in nodes):
                break
            assert time.monotonic() < deadline, nodes
            time.sleep(0.2)


def test_force_new_cluster_recovers_a_shard_from_its_last_survivor(tmp_path: Path) -> None:
    """Two of three replicas are gone for good: the most up-to-date survivor, restarted
    once with ``--force-new-cluster``, serves the shard alone with every acknowledged
    write, and ``add-replica`` grows it again."""
    from zkv.ops.cluster import spec_add_replica

    with LocalCluster(tmp_path / "data", shards=1, replicas=3, brokers=1, port=0,
                      fsync="always", heartbeat_ms=100, election_timeout_ms=600,
                      log_level="INFO") as c:
        c.wait_ready(60)
        with KVClient(c.endpoints, timeout_s=30) as kv:
            acked = {f"k{i}": kv.put(f"k{i}", f"v{i}") for i in range(300)}
        leader = c.leader_of(0)
        survivor = next(n for n in c.node_ids if n != leader)
        time.sleep(0.5)  # the survivor has every entry (commit needs it or the third)
        for n in c.node_ids:
            c.kill_node(n)
        c.nodes[survivor].argv.append("--force-new-cluster")
        c.restart_node(survivor)
        c.nodes[survivor].argv.remove("--force-new-cluster")  # once only
        deadline = time.monotonic() + 60
        while c.leaders().get(0) != survivor:
            assert time.monotonic() < deadline, "the survivor did not take over"
            time.sleep(0.2)
        log = (c.data_dir / "logs" / f"{survivor}.log").read_text()
        assert "FORCED NEW CLUSTER" in log
        with KVClient(c.endpoints, timeout_s=30) as kv:
            missing = [k for k, v in acked.items() if kv.get_versioned(k) is None]
            assert not missing, missing[:5]
            addr = spec_add_replica(c.data_dir, 0, "s0r5")
            c.sync_spec()
            kv.admin(AdminAddReplica(b"", 0, 0, "s0r5", addr))
            while "s0r5" not in members(kv, 0).voters:
                assert time.monotonic() < deadline + 60, "s0r5 never became a voter"
                time.sleep(0.2)
            assert list(members(kv, 0).voters) == [survivor, "s0r5"]
