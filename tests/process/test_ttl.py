"""Keys with short TTLs under leader kills (issue 15, item 1), against real processes.

A 1-shard x 3-replica ``LocalCluster``. Writers put unique keys with TTLs of 1-2 s;
readers read recent keys (linearizable) all along; the nemesis SIGKILLs the shard
leader twice and restarts it. Every node runs on this machine, so the clock skew
between nodes is 0 and the documented failover bound (README, "Keys that expire") is
the skew plus the 1 ms resolution of a deadline; the checks allow ``SLACK_S`` for that.

Checked for every acknowledged put (sent at ``t_send``, acknowledged at ``t_ack``,
TTL ``ttl``) and every read (started ``t0``, answered ``t1``):
- never visible after expiry: a read that found the key started before
  ``t_ack + ttl + SLACK_S`` (the leader stamped the deadline before it acknowledged,
  and judges reads by a clock no older than the read);
- never gone early: a read that started after ``t_ack`` and found nothing answered
  no earlier than ``t_send + ttl - SLACK_S``;
- the sweep removes every expired key, on every replica, failovers included.
A put whose outcome is unknown (timeout) is left out of the checks.
"""

from __future__ import annotations

import math
import random
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

from zkv.client import KVClient
from zkv.ops.cluster import LocalCluster
from zkv.protocol.errors import KVError

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

RUN_S = 12.0
SLACK_S = 0.005
TTLS_S = (1.0, 1.5, 2.0)


@dataclass
class PutRecord:
    key: str
    ttl: float
    t_send: float
    t_ack: float


@dataclass
class ReadRecord:
    key: str
    t0: float
    t1: float
    found: bool


class History:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.puts: dict[str, PutRecord] = {}
        #: the latest puts (a few seconds' worth): readers pick keys near their expiry
        self.recent: deque[PutRecord] = deque(maxlen=600)
        self.reads: list[ReadRecord] = []
        self.unknown = 0
        self.faults: list[str] = []


def _writer(endpoint: str, h: History, wid: int, stop: threading.Event) -> None:
    rng = random.Random(wid)
    with KVClient(endpoint, timeout_s=5) as kv:
        i = 0
        while not stop.is_set():
            key, ttl = f"w{wid}-{i}", rng.choice(TTLS_S)
            i += 1
            t_send = time.time()
            try:
                kv.put(key, "v", ttl=ttl)
            except KVError:
                with h.lock:
                    h.unknown += 1
                continue
            with h.lock:
                h.puts[key] = rec = PutRecord(key, ttl, t_send, time.time())
                h.recent.append(rec)
            time.sleep(0.01)


def _reader(endpoint: str, h: History, rid: int, stop: threading.Event) -> None:
    rng = random.Random(100 + rid)
    with KVClient(endpoint, timeout_s=5) as kv:
        while not stop.is_set():
            now = time.time()
            with h.lock:  # keys whose expiry is within 0.25 s of now: the edge is tested
                recent = [p.key for p in h.recent if abs(p.t_ack + p.ttl - now) < 0.25]
            if not recent:
                time.sleep(0.01)
                continue
            key = rng.choice(recent)
            t0 = time.time()
            try:
                found = kv.get(key) is not None
            except KVError:
                continue
            with h.lock:
                h.reads.append(ReadRecord(key, t0, time.time(), found))


def _nemesis(cluster: LocalCluster, h: History, stop: threading.Event) -> None:
    for _ in range(2):
        if stop.wait(2.5):
            return
        leader = cluster.leader_of(0, 10)
        h.faults.append(f"{time.time():.3f} SIGKILL {leader}")
        cluster.kill_node(leader, signal.SIGKILL)
        if stop.wait(2.0):
            return
        cluster.restart_node(leader)
        h.faults.append(f"{time.time():.3f} restarted {leader}")


def test_ttl_keys_under_leader_kills(tmp_path: Path) -> None:
    h = History()
    with LocalCluster(tmp_path / "data", shards=1, replicas=3, brokers=1, port=0,
                      fsync="never", heartbeat_ms=50, election_timeout_ms=500) as cluster:
        cluster.wait_ready(30)
        stop = threading.Event()
        threads = [threading.Thread(target=_writer, args=(cluster.endpoint, h, w, stop))
                   for w in range(2)]
        threads += [threading.Thread(target=_reader, args=(cluster.endpoint, h, r, stop))
                    for r in range(3)]
        threads.append(threading.Thread(target=_nemesis, args=(cluster, h, stop)))
        for t in threads:
            t.start()
        time.sleep(RUN_S)
        stop.set()
        for t in threads:
            t.join(30)
        late, early = _violations(h)
        found = sum(r.found for r in h.reads)
        print(f"{len(h.puts)} puts ({h.unknown} unknown), {len(h.reads)} reads "
              f"({found} found, {len(h.reads) - found} absent); faults: {h.faults}")
        assert len(h.faults) >= 3, h.faults
        assert len(h.puts) > 200 and found > 100 and len(h.reads) - found > 100
        assert not late, f"read after expiry: {late[:5]}"
        assert not early, f"gone before expiry: {early[:5]}"
        # the replicated sweep empties every replica (the killed one too, once back)
        deadline = time.time() + max(TTLS_S) + 20
        counts: dict[str, int] = {}
        while time.time() < deadline:
            counts = {n["node_id"]: n["key_count"] for n in cluster.status()["nodes"]
                      if n.get("live")}
            if len(counts) == 3 and not any(counts.values()):
                break
            time.sleep(0.2)
        assert len(counts) == 3 and not any(counts.values()), counts


def _violations(h: History) -> tuple[list[str], list[str]]:
    late, early = [], []
    for r in h.reads:
        p = h.puts.get(r.key)
        if p is None:
            continue
        if r.found and r.t0 >= p.t_ack + p.ttl + SLACK_S:
            late.append(f"{r.key}: read at {r.t0 - p.t_ack:.3f}s after ack, ttl {p.ttl}")
        if not r.found and r.t0 > p.t_ack and r.t1 < p.t_send + p.ttl - SLACK_S:
            early.append(f"{r.key}: absent {r.t1 - p.t_send:.3f}s after send, ttl {p.ttl}")
    return late, early


def _cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zkv.client.cli", "--endpoint",
                           cluster.endpoint, *args], capture_output=True, text=True,
                          timeout=30, check=False)


def test_deadlines_survive_snapshots_a_full_restart_and_a_shard_move(tmp_path: Path) -> None:
    """Expiry is state: snapshots (every 50 entries here), a restart of every process
    (snapshot + WAL replay) and a shard move (migration batches) keep each deadline.
    The CLI drives the TTL commands once, end to end."""
    data = tmp_path / "data"
    args = dict(shards=1, replicas=3, brokers=1, port=0, fsync="always", heartbeat_ms=50,
                election_timeout_ms=500, node_args=("--snapshot-entries", "50"))
    long_keys = [f"long-{i}" for i in range(150)]
    short_keys = [f"short-{i}" for i in range(150)]
    with LocalCluster(data, **args) as cluster:  # type: ignore[arg-type]
        cluster.wait_ready(30)
        assert _cli(cluster, "put", "cli", "v", "--ttl", "100").returncode == 0
        assert float(_cli(cluster, "ttl", "cli").stdout) > 99
        assert _cli(cluster, "persist", "cli").returncode == 0
        assert _cli(cluster, "ttl", "cli").stdout.strip() == "none"
        assert _cli(cluster, "expire", "cli", "200").returncode == 0
        assert _cli(cluster, "expire", "missing", "1").returncode == 1
        with KVClient(cluster.endpoint, timeout_s=10) as kv:
            for k in long_keys:
                kv.put(k, "v", ttl=120)
            t_short = time.time()
            for k in short_keys:
                kv.put(k, "v", ttl=6)
            kv.put("plain", "v")
    with LocalCluster(data, **args) as cluster:  # type: ignore[arg-type]
        cluster.wait_ready(30)
        with KVClient(cluster.endpoint, timeout_s=10) as kv:
            left = [kv.ttl(k) for k in long_keys]
            assert all(x is not None and 60 < x <= 120 for x in left), left[:5]
            assert kv.ttl("plain") == math.inf and 190 < (kv.ttl("cli") or 0) <= 200
            cluster.add_shard()
            moved = [kv.ttl(k) for k in long_keys]
            assert all(x is not None and 60 < x <= 120 for x in moved), moved[:5]
            time.sleep(max(0.0, t_short + 6.5 - time.time()))
            assert all(kv.get(k) is None for k in short_keys)
            assert all(kv.get(k) == b"v" for k in long_keys)
        # swept on every replica of both shards: what is left is the long keys, "plain"
        # and "cli", three copies each
        want = 3 * (len(long_keys) + 2)
        until = time.time() + 10
        counts: dict[str, int] = {}
        while time.time() < until:
            counts = {n["node_id"]: n["key_count"] for n in cluster.status()["nodes"]}
            if len(counts) == 6 and sum(counts.values()) == want:
                break
            time.sleep(0.1)
        assert len(counts) == 6 and sum(counts.values()) == want, counts
