"""Issue 12 against real processes: a ``--secure`` cluster (Curve + ZAP) on 127.0.0.1.

- no key or an unknown key gets nothing back; a client key reads and writes;
- the wire carries no key or value in plaintext (a recording proxy on the client ->
  broker hop, on the broker -> node hop and in front of every node's peer port; the
  same captures against a plaintext cluster do contain them);
- forged Raft traffic (VoteRequest, AppendEntries carrying writes, InstallSnapshot)
  claiming a dead follower's id, sent to the live members' peer ports with a valid
  *client* key, or with another shard's *node* key, changes nothing; the same attack
  against a plaintext cluster commits the forged writes (so the check can fail);
- a client key rotated under load (add the new key, restart the holder, remove the old
  one) loses no acknowledged write and the old key is refused afterwards;
- a client key gets PERMISSION_DENIED from ``zkv admin remove-shard``; an admin key runs it.

The secure cluster is shared by the tests of this module, in file order (the last one
removes a shard).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.support.tcp_proxy import BlackholeProxy
from zkv.client import AsyncKVClient, KVClient
from zkv.ops.cluster import LocalCluster
from zkv.ops.keys import ensure_identity, generate
from zkv.protocol import codec
from zkv.protocol.errors import KVError, Timeout
from zkv.protocol.messages import AppendEntries, Entry, InstallSnapshot, VoteRequest
from zkv.protocol.ring import DEFAULT_VNODES, Ring, RingConfig
from zkv.protocol.security import CLIENT, Curve
from zkv.storage_node.commands import PutCommand, encode_command
from zkv.storage_node.state_machine import KVStateMachine

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

TIMING = {"heartbeat_ms": 50, "election_timeout_ms": 500}


def _cluster(path: Path, secure: bool, shards: int = 2) -> LocalCluster:
    return LocalCluster(path, shards=shards, replicas=3, port=0, fsync="never", secure=secure,
                        **TIMING)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with _cluster(tmp_path_factory.mktemp("secure") / "data", secure=True) as c:
        c.wait_ready(30)
        yield c


def test_no_key_or_unknown_key_gets_nothing(secure: LocalCluster, tmp_path: Path) -> None:
    with KVClient(secure.endpoints, timeout_s=10, keys=secure.client_keys) as kv:
        kv.put("guarded", "v1")
        assert kv.get("guarded") == b"v1"

    async def pipelined() -> list[bytes | None]:
        async with AsyncKVClient(secure.endpoints, timeout_s=10, keys=secure.client_keys) as akv:
            await asyncio.gather(*(akv.put(f"a{i}", str(i)) for i in range(50)))
            return list(await asyncio.gather(*(akv.get(f"a{i}") for i in range(50))))

    assert asyncio.run(asyncio.wait_for(pipelined(), 30)) == [str(i).encode() for i in range(50)]
    other = generate(tmp_path / "other", ["x"], ["b0"])  # a well-formed key nobody trusts
    assert secure.client_keys is not None
    unknown = _copy_identity(other / "client", secure.client_keys.parent / "public", tmp_path)
    for keys in (None, unknown):
        with KVClient(secure.endpoints, timeout_s=1.5, keys=keys) as kv, \
                pytest.raises(Timeout):
            kv.get("guarded")
    log = (secure.data_dir / "logs" / "broker-b0.log").read_text()
    assert "refused a CURVE connection" in log  # the unknown key, refused by ZAP


def test_secret_key_with_loose_permissions_is_refused(secure: LocalCluster, tmp_path: Path) -> None:
    keys = generate(tmp_path / "k", ["s0r0"], ["b0"])
    secret = keys / "nodes" / "s0r0" / "s0r0.key_secret"
    os.chmod(secret, 0o644)
    run = subprocess.run(
        [sys.executable, "-m", "zkv.storage_node.main", "--node-id", "s0r0", "--shard", "0",
         "--data-dir", str(tmp_path / "d"), "--listen", "tcp://127.0.0.1:0",
         "--brokers", "tcp://127.0.0.1:1", "--keys", str(keys)],
        capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "chmod 600" in run.stderr and "0644" in run.stderr
    assert secure.client_keys is not None
    loose = _copy_identity(secure.client_keys, secure.client_keys.parent / "public", tmp_path)
    os.chmod(loose / "client.key_secret", 0o644)
    with pytest.raises(KVError, match="permissions 0644"):
        KVClient(secure.endpoints, keys=loose)


def _copy_identity(identity: Path, public: Path, tmp_path: Path) -> Path:
    """A client identity dir holding ``identity``'s pair next to the ``public`` dir."""
    root = tmp_path / f"id-{len(list(tmp_path.iterdir()))}"
    dst = root / "client"
    dst.mkdir(parents=True)
    (root / "public").symlink_to(public)
    for f in identity.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
        os.chmod(dst / f.name, 0o600)
    return dst


def test_non_loopback_bind_without_keys_is_refused(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "zkv.broker.main", "--host", "0.0.0.0",
                          "--port", "0"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "--insecure" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "zkv.storage_node.main", "--node-id", "n", "--shard", "0",
         "--data-dir", str(tmp_path / "d"), "--listen", "tcp://0.0.0.0:0",
         "--brokers", "tcp://127.0.0.1:1"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "--insecure" in run.stderr


def test_two_brokers_each_with_its_own_key(tmp_path: Path) -> None:
    """Nodes and clients pick each broker's key by endpoint (its certificate lists them):
    both brokers hear every node, serve clients, and the SDK fails over between them."""
    with LocalCluster(tmp_path / "d", shards=1, replicas=3, brokers=2, port=0, fsync="never",
                      secure=True, **TIMING) as c:  # type: ignore[arg-type]
        c.wait_ready(30)
        for endpoint in c.endpoints:
            with KVClient(endpoint, timeout_s=10, keys=c.client_keys) as kv:
                kv.put("via", endpoint)
                assert kv.get("via") == endpoint.encode()
                deadline = time.monotonic() + 10
                while sum(n["live"] for n in kv.status()["nodes"]) < 3:
                    assert time.monotonic() < deadline, "a broker does not hear every node"
                    time.sleep(0.1)
        c.kill_broker(0)
        with KVClient(c.endpoints, timeout_s=10, keys=c.client_keys) as kv:
            kv.put("after", "1")
            assert kv.get("after") == b"1"


# ----------------------------------------------------------------------- wire capture


def _capture_puts(cluster: LocalCluster, marker: str) -> bytes:
    port = int(cluster.endpoints[0].rsplit(":", 1)[1])
    proxy = BlackholeProxy("127.0.0.1", port, record=True)
    try:
        with KVClient(proxy.endpoint, timeout_s=10, keys=cluster.client_keys) as kv:
            for i in range(20):
                kv.put(f"{marker}-key-{i}", f"{marker}-value-{i}")
                assert kv.get(f"{marker}-key-{i}") == f"{marker}-value-{i}".encode()
        return bytes(proxy.recorded)
    finally:
        proxy.close()


def test_wire_carries_no_plaintext(secure: LocalCluster, tmp_path: Path) -> None:
    wire = _capture_puts(secure, "SECRETMARK")
    assert len(wire) > 20 * 40  # the puts did go through the proxy
    assert b"SECRETMARK" not in wire
    with _cluster(tmp_path / "plain", secure=False, shards=1) as plain:
        plain.wait_ready(30)
        assert b"PLAINMARK-value-3" in _capture_puts(plain, "PLAINMARK")  # the check can fail


def _put_and_read_back(cluster: LocalCluster, marker: str) -> None:
    """20 puts of values that carry ``marker``, each read back."""
    with KVClient(cluster.endpoints, timeout_s=10, keys=cluster.client_keys) as kv:
        for i in range(20):
            kv.put(f"{marker}-key-{i}", f"{marker}-value-{i}")
            assert kv.get(f"{marker}-key-{i}") == f"{marker}-value-{i}".encode()


def _capture_backend(path: Path, secure: bool, marker: str) -> bytes:
    """Puts through a 1-node cluster whose node reaches the broker's backend through a
    recording proxy: the broker -> node hop carries every request, values included."""
    cluster = LocalCluster(path, shards=1, replicas=1, port=0, fsync="never", secure=secure,
                           **TIMING)  # type: ignore[arg-type]
    port = int(cluster.backend_endpoints()[0].rsplit(":", 1)[1])
    proxy = BlackholeProxy("127.0.0.1", port, record=True)
    cluster.backend_endpoints = lambda: [proxy.endpoint]  # type: ignore[method-assign]
    cluster.node_args = ("--heartbeat-endpoints", f"tcp://127.0.0.1:{port + 1}")
    try:
        with cluster:
            cluster.wait_ready(30)
            _put_and_read_back(cluster, marker)
        return bytes(proxy.recorded)
    finally:
        proxy.close()


def test_broker_to_node_traffic_carries_no_plaintext(tmp_path: Path) -> None:
    wire = _capture_backend(tmp_path / "secure", True, "SECRETMARK")
    assert len(wire) > 20 * 40 and b"SECRETMARK" not in wire
    plain = _capture_backend(tmp_path / "plain", False, "PLAINMARK")
    assert b"PLAINMARK-value-3" in plain  # the check can fail


class _PeerCapture(LocalCluster):
    """A cluster whose nodes reach each other's peer ports only through recording
    proxies (one per node): every node -> node byte (appends carrying the values,
    votes, snapshots) crosses a proxy."""

    proxies: dict[str, BlackholeProxy]

    def _node_argv(self, spec: dict[str, Any]) -> list[str]:
        argv = super()._node_argv(spec)
        if "--peers" in argv:
            i = argv.index("--peers") + 1
            peers = []
            for item in argv[i].split(","):
                nid, _, _ = item.partition("=")
                if nid not in self.proxies:
                    self.proxies[nid] = BlackholeProxy("127.0.0.1", self.peer_ports[nid],
                                                       record=True)
                peers.append(f"{nid}={self.proxies[nid].endpoint}")
            argv[i] = ",".join(peers)
        return argv


def _capture_peers(path: Path, secure: bool, marker: str) -> bytes:
    cluster = _PeerCapture(path, shards=1, replicas=3, port=0, fsync="never", secure=secure,
                           **TIMING)  # type: ignore[arg-type]
    cluster.proxies = {}
    try:
        with cluster:
            cluster.wait_ready(30)
            _put_and_read_back(cluster, marker)
        assert len(cluster.proxies) == 3
        return b"".join(bytes(p.recorded) for p in cluster.proxies.values())
    finally:
        for p in cluster.proxies.values():
            p.close()


def test_node_to_node_traffic_carries_no_plaintext(tmp_path: Path) -> None:
    wire = _capture_peers(tmp_path / "secure", True, "SECRETMARK")
    assert len(wire) > 20 * 40 and b"SECRETMARK" not in wire
    plain = _capture_peers(tmp_path / "plain", False, "PLAINMARK")
    assert b"PLAINMARK-value-3" in plain  # the check can fail


# ----------------------------------------------------------------------- forged members


def _row(cluster: LocalCluster, node: str) -> dict[str, Any]:
    rows = {r["node_id"]: r for r in cluster.status(timeout_s=5)["nodes"]}
    return rows[node]  # type: ignore[no-any-return]


def _forged_keys(shard: int, shards: tuple[int, ...]) -> list[bytes]:
    ring = Ring(RingConfig(1, shards, DEFAULT_VNODES))
    keys = (f"forged-{i}".encode() for i in range(10_000))
    return [k for k in keys if ring.shard_for(k) == shard][:3]


def _attack(cluster: LocalCluster, dead: str, targets: list[str], keys: list[bytes],
            curve: Curve | None) -> None:
    """Send each target a VoteRequest, an AppendEntries carrying writes (at a higher term,
    claiming ``dead`` leads) and an InstallSnapshot, all claiming to come from ``dead``."""
    time.sleep(0.5)  # heartbeats report the log as it is after the last write
    rows = [_row(cluster, t) for t in targets]
    top = max(rows, key=lambda r: r["last_index"])  # append after it: no committed conflict
    term, last, last_term = top["term"], top["last_index"], top["last_log_term"]
    now_ms = int(time.time() * 1000)
    cmds = [PutCommand(os.urandom(16), 1, 0, now_ms, k, b"FORGED") for k in keys]
    entries = tuple(Entry(term + 100, last + 1 + i, encode_command(c)) for i, c in enumerate(cmds))
    sm = KVStateMachine(shard_id=0, ring=RingConfig(1, tuple(cluster.initial_shards), DEFAULT_VNODES))
    for i, c in enumerate(cmds):
        sm.apply_command(i + 1, c)
    forged = [
        VoteRequest(term + 50, dead, last + 1000, term + 49),
        AppendEntries(term + 100, dead, last, last_term, entries, last + len(entries), 0),
        InstallSnapshot(term + 100, dead, last + 50, term + 100, 0, True, sm.snapshot_bytes()),
    ]
    ctx = zmq.Context()
    try:
        for target in targets:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, dead.encode())  # the routing id a member would use
            sock.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                curve.node_client(sock, target)
            sock.connect(f"tcp://127.0.0.1:{cluster.peer_ports[target]}")
            for _ in range(3):  # again after the handshake had time to finish
                for msg in forged:  # a refused key never gets a connection to send on
                    with contextlib.suppress(zmq.Again):
                        sock.send_multipart(codec.encode(msg), zmq.NOBLOCK)  # type: ignore[arg-type]
                time.sleep(0.3)
            sock.close()
    finally:
        ctx.term()


def _shard0(cluster: LocalCluster) -> tuple[str, str, list[str]]:
    leader = cluster.leader_of(0)
    followers = [n for n in cluster.node_ids if n.startswith("s0") and n != leader]
    return leader, followers[0], [leader, followers[1]]


def test_forged_member_traffic_changes_nothing(secure: LocalCluster) -> None:
    leader, dead, targets = _shard0(secure)
    keys = _forged_keys(0, tuple(secure.initial_shards))
    with KVClient(secure.endpoints, timeout_s=10, keys=secure.client_keys) as kv:
        for k in keys:
            kv.put(k, b"real")
        secure.kill_node(dead)
        before = _row(secure, leader)["term"]
        assert secure.keys_dir is not None
        for who in (secure.keys_dir / "client", secure.keys_dir / "nodes" / "s1r0"):
            _attack(secure, dead, targets, keys, Curve.for_identity(who))
        time.sleep(2 * TIMING["election_timeout_ms"] / 1000)
        assert secure.leader_of(0) == leader
        assert _row(secure, leader)["term"] == before
        assert _row(secure, targets[1])["term"] == before
        assert [kv.get(k) for k in keys] == [b"real"] * len(keys)
    log = (secure.data_dir / "logs" / f"{targets[1]}.log").read_text()
    assert "not a member of shard 0" in log  # s1r0's key got through ZAP, not into Raft
    secure.restart_node(dead)


def test_same_attack_on_plaintext_cluster_commits_forged_writes(tmp_path: Path) -> None:
    with _cluster(tmp_path / "plain", secure=False, shards=1) as plain:
        plain.wait_ready(30)
        leader, dead, targets = _shard0(plain)
        keys = _forged_keys(0, tuple(plain.initial_shards))
        with KVClient(plain.endpoints, timeout_s=10) as kv:
            for k in keys:
                kv.put(k, b"real")
            plain.kill_node(dead)
            _attack(plain, dead, targets, keys, None)
            deadline = time.monotonic() + 20
            while True:
                try:
                    if [kv.get(k) for k in keys] == [b"FORGED"] * len(keys):
                        break
                except KVError:
                    pass
                assert time.monotonic() < deadline, "the forged writes never committed"
                time.sleep(0.2)


# ----------------------------------------------------------------------- rotation


def test_client_key_rotation_under_load_loses_no_acknowledged_write(secure: LocalCluster) -> None:
    keys_dir = secure.keys_dir
    assert keys_dir is not None
    acked: dict[str, str] = {}
    identity = {"dir": keys_dir / "client"}
    stop = threading.Event()
    errors: list[str] = []

    def writer(tag: int) -> None:
        i = 0
        while not stop.is_set():
            current = identity["dir"]
            with KVClient(secure.endpoints, timeout_s=5, keys=current) as kv:
                while not stop.is_set() and identity["dir"] == current:  # "restart" on change
                    key, value = f"rot-{tag}-{i}", f"v{i}"
                    try:
                        kv.put(key, value)
                        acked[key] = value
                    except KVError as exc:
                        errors.append(repr(exc))
                    i += 1

    threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    before = len(acked)
    new = ensure_identity(keys_dir, CLIENT, "client-2")  # 1. add the new public key
    time.sleep(0.3)
    identity["dir"] = new  # 2. restart the holder with its new key
    time.sleep(1.0)
    (keys_dir / "public" / "clients" / "client.key").unlink()  # 3. remove the old key
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(timeout=15)
    after_rotation = len(acked) - before
    assert before > 20 and after_rotation > 20, (before, after_rotation, errors[:3])
    with KVClient(secure.endpoints, timeout_s=10, keys=new) as kv:
        lost = [k for k, v in acked.items() if kv.get(k) != v.encode()]
    assert lost == []
    with KVClient(secure.endpoints, timeout_s=1.5, keys=keys_dir / "client") as kv, \
            pytest.raises(Timeout):
        kv.get("rot-0-0")  # the old key is refused from now on
    (keys_dir / "public" / "clients" / "client.key").write_bytes(
        (keys_dir / "client" / "client.key").read_bytes())  # for the tests after this one


def _shard0_writer(secure: LocalCluster, tag: int, acked: dict[str, str],
                   ack_times: list[float], errors: list[str], stop: threading.Event) -> None:
    ring = Ring(RingConfig(1, (0, 1), DEFAULT_VNODES))
    assert secure.keys_dir is not None
    with KVClient(secure.endpoints, timeout_s=5, keys=secure.keys_dir / "client") as kv:
        i = 0
        while not stop.is_set():
            i += 1
            key = f"nrot-{tag}-{i}"
            if ring.shard_for(key.encode()) != 0:
                continue
            try:
                kv.put(key, key)
                acked[key] = key
                ack_times.append(time.monotonic())
            except KVError as exc:
                errors.append(repr(exc))


def test_node_key_rotation_under_load_keeps_the_shard_serving(secure: LocalCluster) -> None:
    """Replace shard 0's leader's key pair (stop it, ``zkv keys rotate``, start it):
    writes to the shard go on, its peers redial it with the new key, and it then forms
    the shard's majority (the other old member killed) with its new key alone."""
    from zkv.ops.keys import rotate_node_key
    from zkv.protocol.security import NODE, TrustStore, load_public

    keys_dir = secure.keys_dir
    assert keys_dir is not None
    acked: dict[str, str] = {}
    ack_times: list[float] = []
    errors: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_shard0_writer, daemon=True,
                                args=(secure, t, acked, ack_times, errors, stop))
               for t in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        x = secure.leader_of(0)
        old = load_public(keys_dir / "public" / "nodes" / f"{x}.key")
        rotation_began = time.monotonic()
        secure.kill_node(x, signal.SIGTERM)  # 1. stop the holder: it hands leadership over
        rotate_node_key(keys_dir, x)  # 2. its new pair, published in place of the old
        secure.restart_node(x)  # 3. start it with the new key
        time.sleep(2.5)
        rotation_ended = time.monotonic()
        others = [n for n in secure.node_ids if n.startswith("s0") and n != x]
        y = secure.leader_of(0)
        y = y if y != x else others[0]
        secure.kill_node(y, signal.SIGKILL)  # now x must be in every majority of shard 0
        killed = time.monotonic()
        time.sleep(3.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    secure.restart_node(y)
    during = [t for t in ack_times if rotation_began <= t <= rotation_ended]
    gaps = [b - a for a, b in zip([rotation_began, *during], [*during, rotation_ended],
                                  strict=True)]
    assert max(gaps) < 2.0, f"shard 0 acknowledged nothing for {max(gaps):.1f}s"
    after_kill = [t for t in ack_times if t > killed + 1.5]
    assert len(after_kill) > 10, (len(after_kill), errors[:3])  # x is in the majority
    with KVClient(secure.endpoints, timeout_s=10, keys=keys_dir / "client") as kv:
        lost = [k for k, v in acked.items() if kv.get(k) != v.encode()]
    assert lost == []
    trust = TrustStore(keys_dir)
    assert trust.lookup(old) is None, "the old key is still trusted"
    new = load_public(keys_dir / "public" / "nodes" / f"{x}.key")
    principal = trust.lookup(new)
    assert principal is not None and principal.role == NODE and principal.name == x


# ----------------------------------------------------------------------- roles


def _zkv(keys: Path | None, endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("ZKV_KEYS", None)
    argv = [sys.executable, "-m", "zkv.client.cli", "--endpoint", endpoint]
    if keys is not None:
        argv += ["--keys", str(keys)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=90, env=env)


def test_client_key_cannot_remove_a_shard_but_admin_key_can(secure: LocalCluster) -> None:
    denied = _zkv(secure.client_keys, secure.endpoint, "admin", "remove-shard", "1")
    assert denied.returncode == 1, denied.stderr
    assert "PERMISSION_DENIED" in denied.stderr
    assert sorted(secure.status()["ring"]["shards"]) == [0, 1]
    done = _zkv(secure.admin_keys, secure.endpoint, "admin", "remove-shard", "1")
    assert done.returncode == 0, done.stderr
    assert secure.status()["ring"]["shards"] == [0]
    with KVClient(secure.endpoints, timeout_s=10, keys=secure.client_keys) as kv:
        assert kv.get("guarded") == b"v1"  # moved to shard 0, still readable
