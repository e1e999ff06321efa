"""Issue 12, item 3, on real processes: a node key trusted from a committed membership
change, never published in ``keys/public``.

A ``--secure`` cluster of one shard x 3. A new node s0r9 gets a key pair generated
*outside* the cluster's keys dir: its own keys dir holds its pair and a copy of the
cluster's public certificates, so it trusts the cluster, but no member or broker has its
certificate. Then:

- ``zkv admin add-replica`` *without* ``--public-key``: the node is refused everywhere.
  It never catches up (the change does not take effect), the broker never lists it.
- removed, and added again *with* ``--public-key`` (its ``s0r9.key``): it catches up and
  is promoted, the broker accepts its heartbeats (``zkv status`` lists it, a voter),
  and once the old leader is killed the shard elects a leader and keeps taking writes
  with s0r9's vote and acks (three of four voters left: s0r9 is in every majority);
- with s0r9 leading, the killed node restarts and catches up from it: it trusts s0r9's
  key from the member keys it saved, before any leader tells it its commit index.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from zkv.client import KVClient
from zkv.ops.cluster import LocalCluster, spec_add_replica
from zkv.ops.keys import ensure_identity, generate
from zkv.protocol.errors import KVError
from zkv.protocol.security import NODE

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]

NEW = "s0r9"


class _OutsideKeyCluster(LocalCluster):
    """A secure cluster where the nodes of ``outside`` run with keys dirs of their own,
    and whose key generation never makes (nor publishes) a pair for them."""

    outside: dict[str, Path]

    def _ensure_keys(self) -> None:
        spec = self.spec  # the keys of every node but the outside ones
        self.spec = {**spec, "nodes": [n for n in spec["nodes"] if n["id"] not in self.outside]}
        try:
            super()._ensure_keys()
        finally:
            self.spec = spec

    def _node_argv(self, spec: dict[str, Any]) -> list[str]:
        argv = super()._node_argv(spec)
        if spec["id"] in self.outside:
            argv[argv.index("--keys") + 1] = str(self.outside[spec["id"]])
        return argv


def _outside_keys(cluster: LocalCluster, where: Path, node: str) -> Path:
    """``where``: the node's own pair plus a copy of the cluster's public certificates
    (so it trusts the cluster); its own public key is published nowhere."""
    ident = ensure_identity(where, NODE, node)
    (where / "public" / "nodes" / f"{node}.key").unlink()
    assert cluster.keys_dir is not None
    for sub in ("nodes", "brokers"):
        (where / "public" / sub).mkdir(parents=True, exist_ok=True)
        for cert in (cluster.keys_dir / "public" / sub).glob("*.key"):
            shutil.copy(cert, where / "public" / sub / cert.name)
    return ident / f"{node}.key"


def _zkv(cluster: LocalCluster, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("ZKV_KEYS", None)
    argv = [sys.executable, "-m", "zkv.client.cli", "--endpoint", cluster.endpoint,
            "--keys", str(cluster.admin_keys)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout_s,
                          env=env)


def _nodes(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    try:
        return {n["node_id"]: n for n in cluster.status(timeout_s=2.0)["nodes"]
                if n.get("live", True)}
    except KVError:
        return {}


def wait_for(what: str, check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_node_key_from_a_committed_membership_change(tmp_path: Path) -> None:
    cluster = _OutsideKeyCluster(tmp_path / "data", shards=1, replicas=3, brokers=1, port=0,
                                 fsync="never", secure=True, heartbeat_ms=50,
                                 election_timeout_ms=500, log_level="INFO")
    cluster.outside = {}
    with cluster:
        cluster.wait_ready(timeout=60)
        assert cluster.keys_dir is not None
        with KVClient(cluster.endpoints, timeout_s=10, keys=cluster.client_keys) as kv:
            for i in range(200):
                kv.put(f"before-{i}", f"v{i}")

        cluster.outside[NEW] = tmp_path / "outside-keys"
        addr = spec_add_replica(cluster.data_dir, 0, NEW)
        cert = _outside_keys(cluster, cluster.outside[NEW], NEW)
        assert cluster.sync_spec() == [f"started {NEW} for shard 0"]
        assert not (cluster.keys_dir / "public" / "nodes" / f"{NEW}.key").exists()

        # without --public-key: refused by members and broker alike, never caught up
        refused = _zkv(cluster, "admin", "add-replica", "0", "--node-id", NEW,
                       "--peer-addr", addr, "--wait", "4")
        assert refused.returncode != 0 and "did not take effect" in refused.stderr, refused
        assert NEW not in _nodes(cluster)  # its heartbeats are not accepted
        leader = cluster.leader_of(0)
        leader_log = (cluster.data_dir / "logs" / f"{leader}.log").read_text()
        assert f"no key for {NEW}" in leader_log
        broker_log = (cluster.data_dir / "logs" / "broker-b0.log").read_text()
        assert "refused a CURVE connection" in broker_log
        removed = _zkv(cluster, "admin", "remove-replica", "0", NEW, "--wait", "30")
        assert removed.returncode == 0, removed.stderr

        # with --public-key: caught up, promoted, heard by the broker
        added = _zkv(cluster, "admin", "add-replica", "0", "--node-id", NEW, "--peer-addr",
                     addr, "--public-key", str(cert), "--wait", "60")
        assert added.returncode == 0, added.stderr
        assert f"{NEW} is a voter" in added.stderr  # progress goes to stderr
        row = wait_for(f"{NEW} in zkv status", lambda: _nodes(cluster).get(NEW), 30)
        assert row["extra"]["config_role"] == "voter"
        status = _zkv(cluster, "status")
        assert status.returncode == 0 and NEW in status.stdout, status.stderr
        assert not (cluster.keys_dir / "public" / "nodes" / f"{NEW}.key").exists()

        # the old leader goes: three voters of four remain, s0r9 among every majority
        old = cluster.leader_of(0)
        cluster.kill_node(old, signal.SIGKILL)
        wait_for("a new leader", lambda: (lead := _leader(cluster)) and lead != old, 60)
        with KVClient(cluster.endpoints, timeout_s=30, keys=cluster.client_keys) as kv:
            for i in range(100):
                kv.put(f"after-{i}", f"w{i}")
            assert kv.get("before-7") == b"v7" and kv.get("after-99") == b"w99"
        new_row = wait_for(f"{NEW} applied the new writes", lambda: (
            (r := _nodes(cluster).get(NEW)) and r["applied_index"] >= _max_commit(cluster)
            and r), 30)
        assert new_row["applied_index"] > row["applied_index"]

        # s0r9 leads, and the old leader comes back: its snapshot predates the change, so
        # only the member keys it saved let it trust s0r9 before s0r9 tells it more
        moved = _zkv(cluster, "admin", "transfer-leader", "0", "--to", NEW, "--wait", "30")
        assert moved.returncode == 0, moved.stderr
        cluster.restart_node(old)
        with KVClient(cluster.endpoints, timeout_s=30, keys=cluster.client_keys) as kv:
            kv.put("last", "x")
        back = wait_for(f"{old} caught up from {NEW}", lambda: (
            (r := _nodes(cluster).get(old)) and r["applied_index"] >= _max_commit(cluster)
            and r), 30)
        assert back["leader_id"] == NEW


def _leader(cluster: LocalCluster) -> str | None:
    leaders = [n for n, r in _nodes(cluster).items() if r["role"] == 2]
    return leaders[0] if len(leaders) == 1 else None


def _max_commit(cluster: LocalCluster) -> int:
    return max((r["commit_index"] for r in _nodes(cluster).values()), default=0)


def test_refusal_monitor_reports_a_handshake_refused_by_zap(tmp_path: Path) -> None:
    """libzmq ends a session whose handshake ZAP refused and does not retry it: the
    monitor is how a node knows to reopen it (``storage_node/refusals.py``)."""
    import zmq

    from zkv.protocol.security import TrustStore, ZapHandler
    from zkv.storage_node.refusals import RefusalMonitors

    keys = generate(tmp_path / "keys", ["s0r0"], [])
    ctx = zmq.Context()
    trust = TrustStore(keys)
    zap = ZapHandler(ctx, trust)
    server_pub, server_sec = zmq.curve_keypair()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.setsockopt(zmq.ZAP_DOMAIN, b"peer")
    server.curve_server = True
    server.curve_publickey, server.curve_secretkey = server_pub, server_sec
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client_pub, client_sec = zmq.curve_keypair()
    monitors = RefusalMonitors()
    client = ctx.socket(zmq.DEALER)
    try:
        client.setsockopt(zmq.LINGER, 0)
        client.curve_serverkey = server_pub
        client.curve_publickey, client.curve_secretkey = client_pub, client_sec
        monitors.watch("peer:x", client)
        client.connect(f"tcp://127.0.0.1:{port}")
        assert wait_for("the refusal", lambda: monitors.refused(), 10) == ["peer:x"]
        trust.learn({client_pub: "x"})  # trusted now, but libzmq never dials again
        time.sleep(1.0)
        assert zap.refused == 1 and zap.accepted == 0
        monitors.forget("peer:x")
        client.close(linger=0)
        client = ctx.socket(zmq.DEALER)  # what _follow_refusals does: a new socket
        client.setsockopt(zmq.LINGER, 0)
        client.curve_serverkey = server_pub
        client.curve_publickey, client.curve_secretkey = client_pub, client_sec
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hello")
        assert server.poll(5000) and server.recv_multipart()[-1] == b"hello"
        assert zap.accepted == 1
    finally:
        monitors.close()
        client.close(linger=0)
        server.close(linger=0)
        zap.close()
        ctx.term()
