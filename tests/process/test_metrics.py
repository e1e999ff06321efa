"""Prometheus /metrics of a real broker and real storage nodes (``LocalCluster`` with
``metrics_port=0``): the key series exist with sane values, and a leader kill shows up
as elections and leader changes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zkv.client import KVClient
from zkv.ops.cluster import LocalCluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "data", shards=2, replicas=3, port=0, fsync="always",
                      heartbeat_ms=50, election_timeout_ms=500, metrics_port=0) as c:
        c.wait_ready(30)
        yield c


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_every_process_serves_the_key_series(cluster: LocalCluster) -> None:
    urls = cluster.metrics_urls()
    assert set(urls) == {"b0", *cluster.node_ids}
    before = {nid: scrape(urls[nid]) for nid in cluster.node_ids}
    with KVClient(cluster.endpoints, timeout_s=10) as kv:
        for i in range(100):
            kv.put(f"k{i}", f"v{i}")
        for i in range(100):
            assert kv.get(f"k{i}") == f"v{i}".encode()
        assert kv.delete("k0") is True
        assert kv.delete("k0") is False
    time.sleep(0.3)  # a few heartbeats: the snapshots are published once per heartbeat

    broker = scrape(urls["b0"])
    assert value(broker, "zkv_broker_requests_total", op="put") >= 100
    assert value(broker, "zkv_broker_requests_total", op="get") >= 100
    assert value(broker, "zkv_broker_replies_total", result="relayed") >= 202
    assert value(broker, "zkv_broker_request_duration_seconds_count") >= 202
    assert 0 < value(broker, "zkv_broker_request_duration_seconds_sum") < 202 * 5
    assert value(broker, "zkv_broker_requests_in_flight") == 0
    assert value(broker, "zkv_broker_shards_with_leader") == 2
    assert value(broker, "zkv_broker_nodes") == 6

    nodes = {nid: scrape(url) for nid, url in urls.items() if nid != "b0"}
    leaders = [nid for nid, s in nodes.items() if value(s, "zkv_node_raft_role") == 2]
    assert len(leaders) == 2
    assert sum(total(nodes[n], "zkv_node_requests_total", op="put", result="ok")
               for n in leaders) == 100
    assert sum(total(nodes[n], "zkv_node_requests_total", op="get", result="ok")
               for n in leaders) == 100
    assert sum(total(nodes[n], "zkv_node_requests_total", op="delete", result="ok")
               for n in leaders) == 2
    assert sum(value(nodes[n], "zkv_node_keys") for n in leaders) == 99
    for nid, s in nodes.items():
        assert value(s, "zkv_node_raft_term") >= 1, nid
        assert value(s, "zkv_node_raft_commit_index") > value(
            before[nid], "zkv_node_raft_commit_index"), nid
        assert value(s, "zkv_node_raft_applied_index") <= value(s, "zkv_node_raft_commit_index")
        assert value(s, "zkv_node_wal_fsync_seconds_count") > 0, nid
        assert value(s, "zkv_node_wal_batch_entries_sum") >= value(s, "zkv_node_raft_commit_index") - 1
        assert value(s, "zkv_node_data_bytes") > 0, nid
        assert value(s, "zkv_node_migration_streams") == 0
    for leader in leaders:
        lags = [v for (n, _), v in nodes[leader].items()
                if n == "zkv_node_raft_follower_lag_entries"]
        assert len(lags) == 2 and all(0 <= lag < 50 for lag in lags)


def test_leader_kill_counts_an_election_and_a_leader_change(cluster: LocalCluster) -> None:
    urls = cluster.metrics_urls()
    leader = cluster.leader_of(0)
    followers = [n for n in cluster.node_ids if n.startswith("s0") and n != leader]
    broker0 = scrape(urls["b0"])
    before = {n: scrape(urls[n]) for n in followers}
    cluster.kill_node(leader, signal.SIGKILL)
    wait_for(lambda: cluster.leader_of(0) not in ("", None, leader), 15, "a new leader")
    new_leader = cluster.leader_of(0)
    assert new_leader in followers
    time.sleep(0.3)

    def counted() -> bool:
        after = {n: scrape(urls[n]) for n in followers}
        return all(value(after[n], "zkv_node_raft_elections_total")
                   > value(before[n], "zkv_node_raft_elections_total")
                   and value(after[n], "zkv_node_raft_leader_changes_total")
                   > value(before[n], "zkv_node_raft_leader_changes_total")
                   for n in followers)

    wait_for(counted, 5, "elections and leader changes counted on the survivors")
    assert value(scrape(urls[new_leader]), "zkv_node_raft_became_leader_total") >= 1
    broker1 = scrape(urls["b0"])
    assert (value(broker1, "zkv_broker_leader_changes_total")
            > value(broker0, "zkv_broker_leader_changes_total"))


def test_cli_cluster_up_prints_each_process_metrics_url(tmp_path: Path) -> None:
    from zkv.ops.cluster import free_port_block

    port = free_port_block(3)
    cmd = [sys.executable, "-m", "zkv.client.cli", "cluster", "up", "--shards", "1",
           "--replicas", "1", "--data-dir", str(tmp_path / "data"), "--port", str(port),
           "--fsync", "never"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert "serving on" in proc.stdout.readline()
        urls = {}
        while len(urls) < 2:
            line = proc.stderr.readline()
            assert line, "cluster up ended before printing the metrics URLs"
            m = re.match(r"zkv cluster up: metrics of (\S+) on (http://\S+)$", line.strip())
            if m:
                urls[m.group(1)] = m.group(2)
        assert set(urls) == {"b0", "s0r0"}
        wait_for(lambda: value(scrape(urls["b0"]), "zkv_broker_shards_with_leader") == 1,
                 10, "the broker's metrics to show the leader")
        assert value(scrape(urls["s0r0"]), "zkv_node_raft_role") == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_taken_metrics_port_is_logged_and_does_not_stop_the_process() -> None:
    import socket

    from zkv.protocol.metrics import serve_metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve_metrics("127.0.0.1", taken.getsockname()[1], "test") is None
    assert serve_metrics("127.0.0.1", -1, "test") is None
    collector = serve_metrics("127.0.0.1", 0, "test")
    assert collector is not None
