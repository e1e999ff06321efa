"""``zkv cluster up`` and ``LocalCluster``: a whole zkv cluster as local processes.

Layout (docs/internals.md): broker ``b`` listens on ``P+3b`` (frontend), ``P+3b+1``
(backend), ``P+3b+2`` (heartbeats); node ``s{shard}r{replica}`` keeps its data in
``DIR/s{shard}r{replica}`` and gets a free peer port at each ``start()`` (kept across
``restart_node`` so its peers can still reach it). ``DIR/cluster.json`` records the
shards, replicas, ring vnodes and node ids on first start and is reused after: the same
data dir brings back the same nodes and data, on any port. Every node gets the recorded
``--vnodes``, so a shard added later starts from the same epoch-1 ring as the others (a
file written before vnodes were recorded means the old default, 256). Logs go to ``DIR/logs/<name>.log``.

Children run in their own sessions (a Ctrl-C reaches only the supervisor, which then
stops them in order: SIGTERM, a grace period, SIGKILL) and, on Linux, die with the
thread that started them if the supervisor itself is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from zkv.client.sdk import KVClient
from zkv.protocol.errors import KVError
from zkv.protocol.ring import DEFAULT_VNODES

CLUSTER_FILE = "cluster.json"
CLUSTER_FORMAT = 1
GRACE_S = 5.0
READY_POLL_S = 0.2
#: The vnode default before it became 1024: what a cluster.json without "vnodes" used.
LEGACY_VNODES = 256


class ClusterError(Exception):
    """The local cluster cannot be started or does not become ready."""


# --------------------------------------------------------------------------- spec


def node_id(shard: int, replica: int) -> str:
    return f"s{shard}r{replica}"


def load_or_create_spec(
    data_dir: Path, shards: int | None, replicas: int | None, brokers: int,
    vnodes: int | None = None,
) -> dict[str, Any]:
    """Read ``cluster.json`` (checking it agrees with explicit arguments) or write one."""
    path = data_dir / CLUSTER_FILE
    if path.exists():
        try:
            spec = json.loads(path.read_text())
            n_shards, n_replicas = len(spec["shards"]), int(spec["replicas"])
            n_vnodes = int(spec.get("vnodes", LEGACY_VNODES))
        except (ValueError, KeyError, TypeError) as exc:
            raise ClusterError(f"{path} is not a valid cluster file: {exc}") from exc
        if shards is not None and shards != n_shards:
            raise ClusterError(f"{path} has {n_shards} shards, not {shards}: use another "
                               f"--data-dir or drop --shards")
        if replicas is not None and replicas != n_replicas:
            raise ClusterError(f"{path} has {n_replicas} replicas, not {replicas}: use "
                               f"another --data-dir or drop --replicas")
        if vnodes is not None and vnodes != n_vnodes:
            raise ClusterError(f"{path} has {n_vnodes} vnodes per shard, not {vnodes}: "
                               f"the ring is fixed at creation (drop --vnodes)")
        if spec.get("brokers") != brokers or "vnodes" not in spec:
            spec["brokers"] = brokers  # brokers are stateless: any count will do
            spec["vnodes"] = n_vnodes
            _write_json(path, spec)
        return spec  # type: ignore[no-any-return]
    shards = 2 if shards is None else shards
    replicas = 3 if replicas is None else replicas
    vnodes = DEFAULT_VNODES if vnodes is None else vnodes
    if shards < 1 or replicas < 1 or brokers < 1 or vnodes < 1:
        raise ClusterError("need at least one shard, one replica, one broker and one vnode")
    spec = {
        "format": CLUSTER_FORMAT,
        "shards": list(range(shards)),
        "initial_shards": list(range(shards)),  # the epoch-1 ring every node starts from
        "next_shard": shards,  # shard ids are never reused
        "replicas": replicas,
        "brokers": brokers,
        "vnodes": vnodes,
        "nodes": [{"id": node_id(s, r), "shard": s, "replica": r}
                  for s in range(shards) for r in range(replicas)],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, spec)
    return spec


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_block(count: int, host: str = "127.0.0.1", tries: int = 200) -> int:
    """A base port P with P .. P+count-1 all free right now."""
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(20000, 60000 - count)
        if all(_port_free(base + i, host) for i in range(count)):
            return base
    raise ClusterError(f"found no block of {count} free ports")


def _port_free(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------- processes


@dataclass
class Child:
    name: str
    kind: str  # "broker" | "node"
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    reported: bool = False
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalCluster:
    """Brokers and storage nodes as child processes of this one; see the module doc."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        shards: int | None = None,
        replicas: int | None = None,
        brokers: int = 1,
        vnodes: int | None = None,
        port: int = 5555,
        host: str = "127.0.0.1",
        fsync: str = "always",
        heartbeat_ms: int | None = None,
        election_timeout_ms: int | None = None,
        log_level: str = "INFO",
        node_args: tuple[str, ...] = (),
        broker_args: tuple[str, ...] = (),
        python: str = sys.executable,
        broker_module: str = "zkv.broker.main",
        node_module: str = "zkv.storage_node.main",
        grace_s: float = GRACE_S,
        metrics_port: int | None = None,
        secure: bool = False,
    ) -> None:
        """``port=0`` picks a free block of ports. ``shards``/``replicas`` None: from
        ``cluster.json`` if present, else 2 and 3; ``vnodes`` likewise (else 1024).
        ``secure``: Curve keys for every process under ``DIR/keys`` (``ops/keys.py``),
        generated on first start."""
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self.fsync = fsync
        self.heartbeat_ms = heartbeat_ms
        self.election_timeout_ms = election_timeout_ms
        self.log_level = log_level
        self.node_args = tuple(node_args)
        self.broker_args = tuple(broker_args)
        self.python = python
        self.broker_module = broker_module
        self.node_module = node_module
        self.grace_s = grace_s
        self.spec = load_or_create_spec(self.data_dir, shards, replicas, brokers, vnodes)
        self.port = port or free_port_block(3 * brokers, host)
        self.brokers: list[Child] = []
        self.nodes: dict[str, Child] = {}
        self.peer_ports: dict[str, int] = {}
        #: /metrics per process (name -> port): None off, 0 free ports, N from N upwards
        self.metrics_port = metrics_port
        self.metrics_ports: dict[str, int] = {}
        self._started = False
        self.keys_dir = self.data_dir / "keys" if secure else None

    # ------------------------------------------------------------------ layout

    @property
    def shard_ids(self) -> list[int]:
        return [int(s) for s in self.spec["shards"]]

    @property
    def initial_shards(self) -> list[int]:
        return [int(s) for s in self.spec.get("initial_shards", self.spec["shards"])]

    def spec_node_ids(self) -> list[str]:
        """Node ids ``cluster.json`` names now (``zkv admin ... --data-dir`` edits it)."""
        return [n["id"] for n in json.loads((self.data_dir / CLUSTER_FILE).read_text())["nodes"]]

    @property
    def node_ids(self) -> list[str]:
        return [n["id"] for n in self.spec["nodes"]]

    @property
    def endpoints(self) -> list[str]:
        """Client (frontend) endpoints of the brokers."""
        return [f"tcp://{self.host}:{self.port + 3 * b}" for b in range(self.spec["brokers"])]

    @property
    def endpoint(self) -> str:
        return ",".join(self.endpoints)

    def backend_endpoints(self) -> list[str]:
        return [f"tcp://{self.host}:{self.port + 3 * b + 1}" for b in range(self.spec["brokers"])]

    @property
    def client_keys(self) -> Path | None:
        """The client-role identity dir of a secure cluster (``KVClient(keys=...)``)."""
        return None if self.keys_dir is None else self.keys_dir / "client"

    @property
    def admin_keys(self) -> Path | None:
        return None if self.keys_dir is None else self.keys_dir / "admin"

    def _ensure_keys(self) -> None:
        """Secure: a pair for every node and broker (new ones only), the brokers'
        certificates naming the endpoints they serve now."""
        if self.keys_dir is None:
            return
        from zkv.ops.keys import generate

        endpoints = {f"b{b}": [f"tcp://{self.host}:{self.port + 3 * b + i}" for i in range(3)]
                     for b in range(self.spec["brokers"])}
        generate(self.keys_dir, self.node_ids, list(endpoints), broker_endpoints=endpoints)

    def _keys_args(self) -> list[str]:
        return [] if self.keys_dir is None else ["--keys", str(self.keys_dir)]

    def _broker_argv(self, b: int) -> list[str]:
        argv = [self.python, "-m", self.broker_module, "--host", self.host,
                "--port", str(self.port + 3 * b), "--broker-id", f"b{b}",
                "--log-level", self.log_level, *self._keys_args()]
        argv += self._timing_args() + self._metrics_args(f"b{b}")
        return argv + list(self.broker_args)

    def _node_argv(self, spec: dict[str, Any]) -> list[str]:
        nid, shard = spec["id"], int(spec["shard"])
        peers = ",".join(f"{n['id']}=tcp://{self.host}:{self.peer_ports[n['id']]}"
                         for n in self.spec["nodes"]
                         if int(n["shard"]) == shard and n["id"] != nid)
        argv = [self.python, "-m", self.node_module, "--node-id", nid, "--shard", str(shard),
                "--data-dir", str(self.data_dir / nid),
                "--listen", f"tcp://{self.host}:{self.peer_ports[nid]}",
                "--brokers", ",".join(self.backend_endpoints()),
                "--shards", ",".join(str(s) for s in self.initial_shards),
                "--vnodes", str(self.spec["vnodes"]),
                "--fsync", self.fsync, "--log-level", self.log_level, *self._keys_args()]
        if peers:
            argv += ["--peers", peers]
        argv += self._timing_args() + self._metrics_args(nid)
        if self._creates_data_dir(nid) and not spec.get("join"):
            # a new data dir founds its shard; kept on restarts like a compose file
            # would, where the node ignores it (its dir is no longer empty) or, if the
            # dir was wiped, learns from its peers that the shard exists
            argv.append("--bootstrap")
        return argv + list(self.node_args)

    def _creates_data_dir(self, nid: str) -> bool:
        d = self.data_dir / nid
        return not d.exists() or not any(d.iterdir())

    def _metrics_args(self, name: str) -> list[str]:
        if self.metrics_port is None:
            return []
        port = self.metrics_ports.get(name)
        if port is None:
            port = self.metrics_ports[name] = (
                free_port(self.host) if self.metrics_port == 0
                else self.metrics_port + len(self.metrics_ports))
        return ["--metrics-port", str(port), "--metrics-host", self.host]

    def metrics_urls(self) -> dict[str, str]:
        """Where each process serves /metrics (empty when metrics are off)."""
        return {name: f"http://{self.host}:{port}/metrics"
                for name, port in self.metrics_ports.items()}

    def _timing_args(self) -> list[str]:
        argv = []
        if self.heartbeat_ms is not None:
            argv += ["--heartbeat-ms", str(self.heartbeat_ms)]
        if self.election_timeout_ms is not None:
            argv += ["--election-timeout-ms", str(self.election_timeout_ms)]
        return argv

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalCluster:
        if self._started:
            return self
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._choose_peer_ports()
        self._ensure_keys()
        self.brokers = [Child(f"broker-b{b}", "broker", self._broker_argv(b),
                              logs / f"broker-b{b}.log") for b in range(self.spec["brokers"])]
        self.nodes = {n["id"]: Child(n["id"], "node", self._node_argv(n), logs / f"{n['id']}.log")
                      for n in self.spec["nodes"]}
        self._started = True
        try:
            for nid in self.nodes:
                (self.data_dir / nid).mkdir(exist_ok=True)
            for child in [*self.brokers, *self.nodes.values()]:
                self._spawn(child)
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------------ shards

    def add_shard(self, progress: Callable[[str], None] | None = None,
                  ready_timeout_s: float = 30.0, **rebalancer_kw: Any) -> int:
        """Start a new shard group, wait for its leader, and move its share of the keys
        to it online (``ops/rebalance.py``). Returns the new shard id."""
        from zkv.ops.rebalance import Rebalancer

        new_id = spec_add_shard(self.data_dir)
        self.spec = json.loads((self.data_dir / CLUSTER_FILE).read_text())
        self.sync_spec()
        self.leader_of(new_id, ready_timeout_s)
        with KVClient(self.endpoints, timeout_s=30, keys=self.admin_keys) as kv:
            Rebalancer(kv, progress, **rebalancer_kw).add_shard(new_id)
        return new_id

    def remove_shard(self, shard: int, progress: Callable[[str], None] | None = None,
                     **rebalancer_kw: Any) -> None:
        """Move the shard's keys to the others online, then stop its nodes."""
        from zkv.ops.rebalance import Rebalancer

        with KVClient(self.endpoints, timeout_s=30, keys=self.admin_keys) as kv:
            Rebalancer(kv, progress, **rebalancer_kw).remove_shard(shard)
        spec_remove_shard(self.data_dir, shard)
        self.spec = json.loads((self.data_dir / CLUSTER_FILE).read_text())
        self.sync_spec()

    def sync_spec(self) -> list[str]:
        """Start the nodes ``cluster.json`` names that do not run yet and stop the ones
        it no longer names (``zkv admin add-shard/remove-shard --data-dir`` edits it).
        Returns one line per change."""
        self.spec = json.loads((self.data_dir / CLUSTER_FILE).read_text())
        wanted = {n["id"]: n for n in self.spec["nodes"]}
        changes = []
        for nid in [n for n in self.nodes if n not in wanted]:
            c = self.nodes.pop(nid)
            _kill(c, signal.SIGTERM, self.grace_s)
            if c.log is not None:
                c.log.close()
            changes.append(f"stopped {nid} (its shard left the cluster)")
        new = [n for n in self.spec["nodes"] if n["id"] not in self.nodes]
        if new:
            self._choose_peer_ports([n["id"] for n in new])
            self._ensure_keys()
            logs = self.data_dir / "logs"
            for n in new:
                (self.data_dir / n["id"]).mkdir(exist_ok=True)
                child = Child(n["id"], "node", self._node_argv(n), logs / f"{n['id']}.log")
                self.nodes[n["id"]] = child
                self._spawn(child)
                changes.append(f"started {n['id']} for shard {n['shard']}")
        return changes

    def _choose_peer_ports(self, node_ids: list[str] | None = None) -> None:
        held = []
        try:
            fixed = {n["id"]: int(n["peer_port"]) for n in self.spec["nodes"] if n.get("peer_port")}
            for nid in node_ids if node_ids is not None else self.node_ids:
                if nid in fixed:  # chosen by `zkv admin add-replica --data-dir`
                    self.peer_ports[nid] = fixed[nid]
                    continue
                s = socket.socket()
                s.bind((self.host, 0))
                held.append(s)
                self.peer_ports[nid] = int(s.getsockname()[1])
        finally:
            for s in held:
                s.close()

    def _spawn(self, child: Child) -> None:
        if child.log is None or child.log.closed:
            child.log = open(child.log_path, "ab")  # noqa: SIM115 - owned by the child record
        child.log.write(f"--- {time.strftime('%H:%M:%S')} zkv cluster: starting "
                        f"{' '.join(child.argv)}\n".encode())
        child.log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        on_main = threading.current_thread() is threading.main_thread()
        child.proc = subprocess.Popen(
            child.argv, stdin=subprocess.DEVNULL, stdout=child.log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
            preexec_fn=_die_with_parent if on_main and sys.platform == "linux" else None,
        )
        child.started_at = time.monotonic()
        child.reported = False

    def stop(self) -> None:
        """SIGTERM every child, wait ``grace_s``, SIGKILL the rest; idempotent."""
        children = [c for c in [*self.nodes.values(), *self.brokers] if c.proc is not None]
        for c in children:
            if c.alive:
                _signal(c, signal.SIGCONT)  # a SIGSTOPped child cannot handle SIGTERM
                _signal(c, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for c in children:
            assert c.proc is not None
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(c, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=5)
        for c in [*self.nodes.values(), *self.brokers]:
            if c.log is not None:
                c.log.close()
                c.log = None
        self._started = False

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ readiness

    def status(self, timeout_s: float = 1.0) -> dict[str, Any]:
        with KVClient(self.endpoints, timeout_s=timeout_s, keys=self.admin_keys) as kv:
            return kv.status()

    def leaders(self, status: dict[str, Any] | None = None) -> dict[int, str | None]:
        """Shard -> leader node id (highest-term claimant) per the broker's status."""
        status = status if status is not None else self.status()
        best: dict[int, tuple[int, str]] = {}
        for n in status.get("nodes", []):
            if n.get("role") in (2, "leader", "LEADER"):
                sid, term = int(n.get("shard_id", -1)), int(n.get("term", 0))
                if sid not in best or term > best[sid][0]:
                    best[sid] = (term, str(n.get("node_id")))
        return {s: (best[s][1] if s in best else None) for s in self.shard_ids}

    def leader_of(self, shard: int, timeout_s: float = 10.0) -> str:
        """Wait for and return the current leader of ``shard``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(KVError):
                leader = self.leaders(self.status()).get(shard)
                if leader is not None:
                    return leader
            if time.monotonic() >= deadline:
                raise ClusterError(f"shard {shard} has no leader after {timeout_s:g}s")
            time.sleep(READY_POLL_S)

    def wait_ready(
        self, timeout: float = 30.0, progress: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """Block until every shard has a leader (per broker status); return that status.
        Raises ``ClusterError`` on timeout or if a child dies meanwhile."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            self._raise_if_dead()
            line, status = "no answer from the broker yet", None
            with contextlib.suppress(KVError):
                status = self.status(timeout_s=min(1.0, max(0.1, deadline - time.monotonic())))
                leaders = self.leaders(status)
                live = len(status.get("nodes", []))
                if all(leaders.values()):
                    return status
                line = (f"{live}/{len(self.nodes)} nodes heard; leaders: "
                        + ", ".join(f"shard {s}: {leaders[s] or '-'}" for s in leaders))
            if progress is not None and line != last:
                progress(line)
                last = line
            if time.monotonic() >= deadline:
                raise ClusterError(f"cluster not ready after {timeout:g}s ({line}); logs "
                                   f"in {self.data_dir / 'logs'}")
            time.sleep(READY_POLL_S)

    def _raise_if_dead(self) -> None:
        for c in [*self.brokers, *self.nodes.values()]:
            if c.proc is not None and c.proc.poll() is not None:
                raise ClusterError(f"{c.name} exited with code {c.proc.returncode} "
                                   f"(log {c.log_path}):\n{c.tail()}")

    def dead_children(self) -> list[Child]:
        """Children that exited and were not reported yet (marks them reported)."""
        out = []
        for c in [*self.brokers, *self.nodes.values()]:
            if c.proc is not None and c.proc.poll() is not None and not c.reported:
                c.reported = True
                out.append(c)
        return out

    # ------------------------------------------------------------------ faults

    def node_pid(self, node_id: str) -> int | None:
        c = self._node(node_id)
        return c.proc.pid if c.alive and c.proc is not None else None

    def broker_pid(self, i: int) -> int | None:
        c = self._broker(i)
        return c.proc.pid if c.alive and c.proc is not None else None

    def kill_node(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        _kill(self._node(node_id), sig, self.grace_s)

    def restart_node(self, node_id: str) -> None:
        """Kill (SIGKILL) the node if it runs, then start it again, same ports and data."""
        c = self._node(node_id)
        _kill(c, signal.SIGKILL, self.grace_s)
        self._spawn(c)

    def kill_broker(self, i: int, sig: int = signal.SIGKILL) -> None:
        _kill(self._broker(i), sig, self.grace_s)

    def restart_broker(self, i: int) -> None:
        c = self._broker(i)
        _kill(c, signal.SIGKILL, self.grace_s)
        self._spawn(c)

    def _node(self, node_id: str) -> Child:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise KeyError(f"no node {node_id!r} (have {', '.join(self.nodes)})") from None

    def _broker(self, i: int) -> Child:
        if not 0 <= i < len(self.brokers):
            raise IndexError(f"no broker {i} (have {len(self.brokers)})")
        return self.brokers[i]


def spec_add_shard(data_dir: Path) -> int:
    """Add a shard group (not yet in the ring) to ``cluster.json``; returns its id."""
    path = Path(data_dir) / CLUSTER_FILE
    spec = json.loads(path.read_text())
    spec.setdefault("initial_shards", list(spec["shards"]))
    new_id = int(spec.get("next_shard", max(spec["shards"]) + 1))
    spec["next_shard"] = new_id + 1
    spec["shards"].append(new_id)
    spec["nodes"] += [{"id": node_id(new_id, r), "shard": new_id, "replica": r}
                      for r in range(int(spec["replicas"]))]
    _write_json(path, spec)
    return new_id


def spec_add_replica(data_dir: Path, shard: int, new_id: str, peer_addr: str = "",
                     host: str = "127.0.0.1") -> str:
    """Name a node joining ``shard`` in ``cluster.json`` (the supervisor starts it, with
    no ``--bootstrap``: it joins as a learner); returns its peer address."""
    path = Path(data_dir) / CLUSTER_FILE
    spec = json.loads(path.read_text())
    if shard not in [int(s) for s in spec["shards"]]:
        raise ClusterError(f"{path} has no shard {shard}")
    old = next((n for n in spec["nodes"] if n["id"] == new_id), None)
    if old is not None:  # asked before: keep its port
        return f"tcp://{host}:{old['peer_port']}" if old.get("peer_port") else peer_addr
    port = int(peer_addr.rpartition(":")[2]) if peer_addr else free_port(host)
    replica = 1 + max(int(n["replica"]) for n in spec["nodes"] if int(n["shard"]) == shard)
    spec["nodes"].append({"id": new_id, "shard": shard, "replica": replica,
                          "peer_port": port, "join": True})
    _write_json(path, spec)
    return peer_addr or f"tcp://{host}:{port}"


def spec_remove_replica(data_dir: Path, node: str) -> None:
    """Drop a node from ``cluster.json`` once the shard removed it (the supervisor stops
    it; its data dir stays, for the operator to delete)."""
    path = Path(data_dir) / CLUSTER_FILE
    spec = json.loads(path.read_text())
    spec["nodes"] = [n for n in spec["nodes"] if n["id"] != node]
    _write_json(path, spec)


def spec_remove_shard(data_dir: Path, shard: int) -> None:
    """Drop a shard group from ``cluster.json`` (after its keys moved away)."""
    path = Path(data_dir) / CLUSTER_FILE
    spec = json.loads(path.read_text())
    spec.setdefault("initial_shards", list(spec["shards"]))
    spec["shards"] = [s for s in spec["shards"] if int(s) != shard]
    spec["nodes"] = [n for n in spec["nodes"] if int(n["shard"]) != shard]
    _write_json(path, spec)


def _signal(c: Child, sig: int) -> None:
    if c.proc is not None:
        with contextlib.suppress(ProcessLookupError):
            c.proc.send_signal(sig)


def _kill(c: Child, sig: int, grace_s: float) -> None:
    """Send ``sig``; for a terminating signal wait for the exit (SIGKILL after grace)."""
    if not c.alive:
        return
    assert c.proc is not None
    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        _signal(c, signal.SIGCONT)
    _signal(c, sig)
    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        try:
            c.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal(c, signal.SIGKILL)
            c.proc.wait(timeout=5)


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=int, default=None, help="shards (default 2)")
    p.add_argument("--replicas", type=int, default=None, help="replicas per shard (default 3)")
    p.add_argument("--brokers", type=int, default=1)
    p.add_argument("--vnodes", type=int, default=None,
                   help=f"ring vnodes per shard, fixed at creation (default {DEFAULT_VNODES})")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--port", type=int, default=5555, help="first broker port (0: free)")
    p.add_argument("--fsync", default="always", help="always | interval:<ms> | never")
    p.add_argument("--heartbeat-ms", type=int, default=None)
    p.add_argument("--election-timeout-ms", type=int, default=None)
    p.add_argument("--metrics-port-base", type=int, default=0,
                   help="/metrics of broker b0 on this port, the next processes on the "
                   "ports after it (default 0: free ports, printed)")
    p.add_argument("--no-metrics", action="store_true", help="serve no /metrics")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--secure", action="store_true",
                   help="Curve keys for every process, generated under DATA_DIR/keys")
    p.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds to wait for every shard to elect a leader")
    p.add_argument("--http-port", type=int, default=8000,
                   help="port of the HTTP gateway (REST API, /ui, /metrics; default 8000; "
                   "0: no gateway)")
    p.add_argument("--http-workers", type=int, default=1, help="gateway worker processes")


def run_cli(args: argparse.Namespace) -> int:
    """Start, wait until serving, supervise until SIGINT/SIGTERM, stop; 0 on a clean stop."""

    def say(line: str) -> None:
        print(f"zkv cluster up: {line}", file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        cluster = LocalCluster(
            args.data_dir, shards=args.shards, replicas=args.replicas, brokers=args.brokers,
            vnodes=args.vnodes,
            port=args.port, fsync=args.fsync, heartbeat_ms=args.heartbeat_ms,
            election_timeout_ms=args.election_timeout_ms, log_level=args.log_level,
            metrics_port=None if args.no_metrics else args.metrics_port_base,
            secure=args.secure,
        )
    except ClusterError as exc:
        print(f"zkv: error: {exc}", file=sys.stderr)
        return 1
    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    gateway = None
    try:
        say(f"{len(cluster.shard_ids)} shard(s) x {cluster.spec['replicas']} replica(s), "
            f"{cluster.spec['brokers']} broker(s), data in {cluster.data_dir}")
        cluster.start()
        cluster.wait_ready(args.ready_timeout, progress=lambda s: say(f"waiting: {s}"))
        print(f"zkv cluster up: serving on {cluster.endpoint}", flush=True)
        if cluster.keys_dir is not None:
            print(f"zkv cluster up: client key {cluster.client_keys} (zkv --keys DIR, "
                  f"env ZKV_KEYS)\nzkv cluster up: admin key {cluster.admin_keys}", flush=True)
        for name, url in cluster.metrics_urls().items():
            say(f"metrics of {name} on {url}")
        gateway = _start_gateway(cluster, args, say)
        spec_path = cluster.data_dir / CLUSTER_FILE
        spec_mtime = spec_path.stat().st_mtime_ns
        while True:
            time.sleep(0.5)
            mtime = spec_path.stat().st_mtime_ns
            if mtime != spec_mtime:  # `zkv admin add-shard/add-replica/... --data-dir`
                spec_mtime = mtime
                for line in cluster.sync_spec():
                    say(line)
            for c in cluster.dead_children():
                say(f"{c.name} exited with code {c.proc.returncode if c.proc else '?'} "
                    f"(not restarted; log {c.log_path})")
            if gateway is not None and not gateway.alive:
                say(f"the gateway exited (not restarted; log {gateway.log_path})")
                gateway = None
    except KeyboardInterrupt:
        say("stopping")
        return 0
    except ClusterError as exc:
        print(f"zkv: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        if gateway is not None:
            gateway.stop()
        cluster.stop()
        for s, h in old.items():
            signal.signal(s, h)


def _start_gateway(cluster: LocalCluster, args: argparse.Namespace,
                   say: Callable[[str], None]) -> Any:
    """The HTTP gateway as one more child (``--http-port``, 0: none); when it cannot run
    (no http extra, port taken) say why and carry on without it."""
    if not args.http_port:
        return None
    from zkv.gateway.process import GatewayProcess

    gw = GatewayProcess(cluster.endpoint, args.http_port, host=cluster.host,
                        workers=args.http_workers,
                        log_path=cluster.data_dir / "logs" / "gateway.log")
    why = gw.start()
    if why is None and not gw.wait_healthy():
        gw.stop()
        why = f"it did not answer /health (log {gw.log_path})"
    if why is not None:
        say(f"no HTTP gateway: {why}; running without it")
        return None
    print(f"zkv cluster up: HTTP gateway on {gw.url} (docs {gw.url}/docs, live page "
          f"{gw.url}/ui)", flush=True)
    return gw
