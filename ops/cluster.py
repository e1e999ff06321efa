"""``LocalCluster``: a whole zkv cluster as child processes of this one.

Layout (docs/internals.md): broker ``b`` listens on ``P+3b`` (frontend), ``P+3b+1``
(backend), ``P+3b+2`` (heartbeats); node ``s{shard}r{replica}`` keeps its data in
``DIR/s{shard}r{replica}`` and gets a free peer port at each ``start()`` (kept across
``restart_node`` so its peers can still reach it). ``DIR/cluster.json``
(``ops/cluster_spec.py``) names the nodes: the same data dir brings back the same nodes
and data, on any port. Every node gets the recorded ``--vnodes``, so a shard added later
starts from the same epoch-1 ring as the others. Logs go to ``DIR/logs/<name>.log``.
Children run in their own sessions and are stopped in order (``ops/child.py``); the
``zkv cluster up`` command around this class is ``ops/cluster_cli.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zkv.client.sdk import KVClient
from zkv.ops.child import Child, kill, spawn, stop_all
from zkv.ops.cluster_procs import ClusterProcesses
from zkv.ops.cluster_spec import (  # re-exported: callers import them from here
    CLUSTER_FILE,
    CLUSTER_FORMAT,
    LEGACY_VNODES,
    ClusterError,
    choose_peer_ports,
    free_port,
    free_port_block,
    load_or_create_spec,
    node_id,
    spec_add_replica,
    spec_add_shard,
    spec_remove_replica,
    spec_remove_shard,
)
from zkv.protocol.errors import KVError

__all__ = [
    "CLUSTER_FILE", "CLUSTER_FORMAT", "GRACE_S", "LEGACY_VNODES", "READY_POLL_S", "Child",
    "ClusterError", "LocalCluster", "free_port", "free_port_block", "load_or_create_spec",
    "node_id", "spec_add_replica", "spec_add_shard", "spec_remove_replica",
    "spec_remove_shard",
]

GRACE_S = 5.0
READY_POLL_S = 0.2
GATEWAY_IDENTITY = "gateway"  # the HTTP gateway's key and tokens under DATA_DIR/keys/


class LocalCluster(ClusterProcesses):
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

    @property
    def gateway_keys(self) -> Path | None:
        """The HTTP gateway's own client-role identity dir of a secure cluster."""
        return None if self.keys_dir is None else self.keys_dir / GATEWAY_IDENTITY

    @property
    def gateway_tokens(self) -> Path | None:
        """The gateway's bearer tokens file (``<role> <token>`` lines) of a secure cluster."""
        return None if self.keys_dir is None else self.keys_dir / GATEWAY_IDENTITY / "tokens"

    def _ensure_keys(self) -> None:
        """Secure: a pair for every node and broker (new ones only), the brokers'
        certificates naming the endpoints they serve now."""
        if self.keys_dir is None:
            return
        from zkv.ops.keys import generate

        endpoints = {f"b{b}": [f"tcp://{self.host}:{self.port + 3 * b + i}" for i in range(3)]
                     for b in range(self.spec["brokers"])}
        generate(self.keys_dir, self.node_ids, list(endpoints), broker_endpoints=endpoints,
                 gateway=GATEWAY_IDENTITY)

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
                spawn(child)
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
            kill(c, signal.SIGTERM, self.grace_s)
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
                spawn(child)
                changes.append(f"started {n['id']} for shard {n['shard']}")
        return changes

    def _choose_peer_ports(self, node_ids: list[str] | None = None) -> None:
        ids = node_ids if node_ids is not None else self.node_ids
        self.peer_ports.update(choose_peer_ports(self.spec, ids, self.host))

    def stop(self) -> None:
        """SIGTERM every child, wait ``grace_s``, SIGKILL the rest; idempotent."""
        stop_all([*self.nodes.values(), *self.brokers], self.grace_s)
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
