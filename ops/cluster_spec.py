"""``cluster.json``: what a local cluster is made of, and the free ports it runs on.

The file (``DIR/cluster.json``) records the shards, replicas, brokers, ring vnodes and
node ids on first start and is reused after; ``zkv admin ... --data-dir`` edits it
through ``spec_add_shard``/``spec_remove_shard``/``spec_add_replica``/
``spec_remove_replica`` and the running supervisor (``ops/cluster.py``) follows it. Every
write goes to a temporary file first and is renamed over the old one, so a reader never
sees half a file. Shard ids are never reused (``next_shard``); ``initial_shards`` is the
epoch-1 ring every node starts from.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

from zkv.protocol.ring import DEFAULT_VNODES

CLUSTER_FILE = "cluster.json"
CLUSTER_FORMAT = 1
#: The vnode default before it became 1024: what a cluster.json without "vnodes" used.
LEGACY_VNODES = 256


class ClusterError(Exception):
    """The local cluster cannot be started or does not become ready."""


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


#: Listening ports are chosen below the kernel's ephemeral range: a port the kernel
#: handed out as "free" (bind to 0) comes from that range, so any outgoing connection
#: may take it as its source port between our choice and the process's bind (a node
#: then died with "Address already in use"; seen in CI). Below it only listeners live.
LISTEN_PORT_MIN = 20000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, below the ephemeral range (see ``LISTEN_PORT_MIN``)."""
    s = _hold_free_port(host)
    port = int(s.getsockname()[1])
    s.close()
    return port


#: Ports this process has handed out: a port chosen for one child is free until that
#: child binds it, and choosing again meanwhile (a metrics port after the peer ports:
#: 24 nodes of `zkv cluster up --shards 8`) could pick it a second time (a node then
#: died with "Address already in use"; seen in CI). Never handed out twice.
_HANDED_OUT: set[int] = set()


def _hold_free_port(host: str, tries: int = 200) -> socket.socket:
    """A socket bound to a free port below the ephemeral range, never one this process
    handed out before (the caller closes it)."""
    rng = random.Random()
    high = max(LISTEN_PORT_MIN + 1000, _ephemeral_low())
    for _ in range(tries):
        port = rng.randrange(LISTEN_PORT_MIN, high)
        if port in _HANDED_OUT:
            continue
        s = socket.socket()
        try:
            s.bind((host, port))
        except OSError:
            s.close()
            continue
        _HANDED_OUT.add(port)
        return s
    s = socket.socket()  # crowded: fall back to any port the kernel gives
    s.bind((host, 0))
    _HANDED_OUT.add(int(s.getsockname()[1]))
    return s


def choose_peer_ports(spec: dict[str, Any], node_ids: list[str], host: str) -> dict[str, int]:
    """A peer port per node: the one ``cluster.json`` fixes (``zkv admin add-replica
    --data-dir`` chose it), else one free now (all held open until all are picked, so no
    two nodes get the same)."""
    ports: dict[str, int] = {}
    held = []
    try:
        fixed = {n["id"]: int(n["peer_port"]) for n in spec["nodes"] if n.get("peer_port")}
        for nid in node_ids:
            if nid in fixed:  # chosen by `zkv admin add-replica --data-dir`
                ports[nid] = fixed[nid]
                continue
            s = _hold_free_port(host)
            held.append(s)
            ports[nid] = int(s.getsockname()[1])
    finally:
        for s in held:
            s.close()
    return ports


def free_port_block(count: int, host: str = "127.0.0.1", tries: int = 200) -> int:
    """A base port P with P .. P+count-1 all free right now."""
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(LISTEN_PORT_MIN, max(LISTEN_PORT_MIN + 1000, _ephemeral_low()) - count)
        block = range(base, base + count)
        if not _HANDED_OUT.intersection(block) and all(_port_free(p, host) for p in block):
            _HANDED_OUT.update(block)
            return base
    raise ClusterError(f"found no block of {count} free ports")


def _port_free(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


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
