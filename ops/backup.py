"""Backup and restore (etcd's ``snapshot save`` / ``snapshot restore``).

``zkv admin snapshot save DIR``: asks each shard's leader (through the broker) for its
whole state once it has applied everything it committed, so each shard's file holds
every write acknowledged before the request reached it; writes DIR/shard-<id>.snap
(the state machine's snapshot bytes) and DIR/manifest.json (the ring, and per shard its
log index, term and key count). Shards are saved one after the other, not at one
instant; a ring change in progress is refused (its keys may be in two places).

``zkv cluster restore DIR --data-dir NEW [--replicas R]``: builds a new cluster's data
dirs from a backup: per shard, R nodes (``s<shard>r<i>``, as ``zkv cluster up`` names
them) whose data dir holds the snapshot (with a configuration naming them as the
voters), its term, the ring, and an identity recording them as voters of a new
cluster. Then ``zkv cluster up --data-dir NEW`` starts it; the old cluster is untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from zkv.client.sdk import KVClient
from zkv.ops import cluster
from zkv.protocol.messages import AdminSnapshotReply, AdminSnapshotSave
from zkv.protocol.ring import RingConfig
from zkv.storage_node import durable_state, identity
from zkv.storage_node import membership as mship
from zkv.storage_node.snapshot import save_snapshot

MANIFEST = "manifest.json"
FORMAT = 1


def save(kv: KVClient, out: Path, say: Any) -> dict[str, Any]:
    from zkv.ops.rebalance import Rebalancer

    r = Rebalancer(kv, say)
    ring = r.current_ring()
    if r.pending() is not None:
        raise ValueError("a ring change is unfinished: run `zkv admin resume` first")
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[str, Any] = {}
    for sid in ring.shards:
        reply = kv.admin(AdminSnapshotSave(b"", 0, sid), timeout=120)
        if not isinstance(reply, AdminSnapshotReply):
            raise ValueError(f"shard {sid}: unexpected answer {type(reply).__name__}")
        data = reply.data
        name = f"shard-{sid}.snap"
        tmp = out / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out / name)
        shards[str(sid)] = {"file": name, "index": reply.index, "term": reply.term,
                            "keys": reply.keys, "sha256": hashlib.sha256(data).hexdigest()}
        say(f"shard {sid}: {reply.keys} keys at index {reply.index} (from {reply.node})")
    manifest = {"format": FORMAT, "ring": ring.as_dict(), "shards": shards,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def restore(backup: Path, data_dir: Path, replicas: int, cluster_id: str) -> list[str]:
    """Write a new cluster's data dirs under ``data_dir``; returns the node ids."""
    manifest = json.loads((backup / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{backup}: unknown backup format {manifest.get('format')!r}")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise ValueError(f"{data_dir} is not empty: restore into a new data dir")
    ring = RingConfig(int(manifest["ring"]["epoch"]), tuple(manifest["ring"]["shards"]),
                      int(manifest["ring"]["vnodes"]))
    nodes = []
    for sid_text, shard in sorted(manifest["shards"].items(), key=lambda kv: int(kv[0])):
        sid = int(sid_text)
        data = (backup / shard["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise ValueError(f"{backup / shard['file']}: checksum mismatch")
        ids = [cluster.node_id(sid, r) for r in range(replicas)]
        conf = mship.Membership(tuple(ids))
        for nid in ids:
            d = data_dir / nid
            d.mkdir(parents=True)
            durable_state.save_ring(d, ring)
            durable_state.save_hard_state(d, durable_state.HardState(int(shard["term"]), ""))
            save_snapshot(d, int(shard["index"]), int(shard["term"]),
                          mship.wrap_snapshot(conf, data))
            identity.save(d, identity.Identity(cluster_id, sid, nid, identity.new_incarnation(),
                                               identity.IdentityState.VOTER))
            nodes.append({"id": nid, "shard": sid, "replica": int(nid.rpartition("r")[2])})
    spec = {"format": cluster.CLUSTER_FORMAT, "shards": list(ring.shards),
            "initial_shards": list(ring.shards), "next_shard": max(ring.shards) + 1,
            "replicas": replicas, "brokers": 1, "nodes": nodes,
            "restored_from": str(backup.absolute()),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (data_dir / cluster.CLUSTER_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return [str(n["id"]) for n in nodes]


def add_restore_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("backup_dir", metavar="DIR", help="made by `zkv admin snapshot save`")
    p.add_argument("--data-dir", required=True, help="new, empty: the restored cluster's dir")
    p.add_argument("--replicas", type=int, default=3)


def run_restore(args: argparse.Namespace) -> int:
    ids = restore(Path(args.backup_dir), Path(args.data_dir), args.replicas,
                  identity.DEFAULT_CLUSTER_ID)
    print(f"zkv cluster restore: {len(ids)} nodes written under {args.data_dir}; start "
          f"them with `zkv cluster up --data-dir {args.data_dir}`")
    return 0
