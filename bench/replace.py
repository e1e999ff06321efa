"""``python -m bench.replace``: how long ``zkv admin replace-replica`` takes for a shard
holding ``--keys`` keys.

A local cluster (1 shard x 3, 1 broker, ``--fsync``, default snapshot every 50,000
entries) is loaded with ``--keys`` keys of ``--value-size`` bytes; then a follower is
replaced by a new node (started by the supervisor, as ``--data-dir`` does). Reported:
seconds from the request to the new node being a voter (it installs the leader's
snapshot and catches up as a learner) and to the old one being removed, and the new
node's key count. (The rolling-restart unavailability is measured by
``tests/process/test_membership_load.py``.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zkv.client import AsyncKVClient, KVClient
from zkv.ops.cluster import LocalCluster, spec_add_replica, spec_remove_replica
from zkv.ops.membership import members
from zkv.protocol.messages import AdminReplaceReplica


async def _load(endpoints: list[str], n: int, value: bytes) -> None:
    async with AsyncKVClient(endpoints, timeout_s=60) as kv:
        for i in range(0, n, 1000):  # bench.migration's batches: sessions keep up
            await asyncio.gather(*(kv.put(f"key-{j:08d}", value)
                                   for j in range(i, min(n, i + 1000))))


def replace_time(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    with LocalCluster(root / "replace", shards=1, replicas=3, brokers=1, port=0,
                      fsync=args.fsync, log_level="INFO") as cluster:
        cluster.wait_ready(60)
        started = time.monotonic()
        asyncio.run(_load(cluster.endpoints, args.keys, b"v" * args.value_size))
        load_s = time.monotonic() - started
        leader = cluster.leader_of(0)
        old = next(n for n in cluster.node_ids if n != leader)
        with KVClient(cluster.endpoints, timeout_s=30) as kv:
            t0 = time.monotonic()
            addr = spec_add_replica(cluster.data_dir, 0, "s0r9")
            cluster.sync_spec()
            kv.admin(AdminReplaceReplica(b"", 0, 0, old, "s0r9", addr))
            voter_s = removed_s = None
            while removed_s is None:
                m = members(kv, 0)
                now = time.monotonic() - t0
                if voter_s is None and "s0r9" in m.voters:
                    voter_s = now
                if "s0r9" in m.voters and old not in m.voters and not m.pending:
                    removed_s = now
                if now > args.timeout:
                    raise SystemExit(f"replacement not done after {args.timeout}s: {m}")
                time.sleep(0.05)
            spec_remove_replica(cluster.data_dir, old)
            cluster.sync_spec()
            keys = next(n["key_count"] for n in kv.status()["nodes"] if n["node_id"] == "s0r9")
    return {"keys": args.keys, "value_bytes": args.value_size, "fsync": args.fsync,
            "load_s": round(load_s, 1), "new_voter_s": round(voter_s or 0, 2),
            "replaced_s": round(removed_s, 2), "new_node_keys": keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--value-size", type=int, default=32)
    p.add_argument("--fsync", default="never")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zkv-bench-replace-") as tmp:
        print(json.dumps(replace_time(args, Path(tmp))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
