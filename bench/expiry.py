"""``python -m bench.expiry``: how fast expired keys are removed, and what a TTL costs.

Three figures (the README's "Keys that expire" quotes them):

- ``index``: memory of the deadline index per key with a TTL (``ExpiryIndex``: the
  dict slot, the deadline and the heap's ``(deadline, key)`` pair; keys are shared
  with the table), measured with tracemalloc over ``--core-keys`` keys.
- ``core``: the sweep in one process, no network: ``--core-keys`` keys all due at
  once, removed by ``SweepCommand`` entries as the leader builds them (``due`` +
  encode + decode + apply), i.e. the upper bound of one replica's CPU.
- ``cluster``: a local 1-shard x 3-replica cluster (fsync never): ``--keys`` keys
  put with TTLs chosen so that they all expire at the same wall-clock instant; then
  the leader's key count (its heartbeat, every 50 ms) is watched until every replica
  holds none. Reported: keys/s removed from that instant until the leader's table is
  empty, and until every replica's is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from zkv.client.aio import AsyncKVClient
from zkv.ops.cluster import LocalCluster
from zkv.storage_node.commands import decode_command, encode_command
from zkv.storage_node.expiry import ExpiryIndex
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.ttl_commands import PutTtlCommand
from zkv.storage_node.ttl_requests import sweep_command

T0 = 1_700_000_000_000


def index_bytes_per_key(n: int) -> float:
    keys = [b"key-%010d" % i for i in range(n)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    idx = ExpiryIndex()
    for i, k in enumerate(keys):
        idx.set(k, T0 + 60_000 + i)
    per_key = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    return per_key


def core_sweep(n: int) -> dict[str, float]:
    sm = KVStateMachine()
    for i in range(n):
        sm.apply_command(i + 1, PutTtlCommand(b"c%d" % (i % 1000), i // 1000 + 1, 1, T0,
                                              b"key-%010d" % i, b"v" * 16, T0 + 1000 + i % 7))
    index = n
    entries = 0
    start = time.perf_counter()
    while True:
        cmd = sweep_command(sm, T0 + 2000)
        if cmd is None:
            break
        index += 1
        entries += 1
        sm.apply(index, encode_command(cmd))
        assert isinstance(decode_command(encode_command(cmd)), type(cmd))
    elapsed = time.perf_counter() - start
    assert sm.key_count == 0
    return {"keys": n, "entries": entries, "seconds": round(elapsed, 3),
            "keys_per_s": round(n / elapsed)}


async def _load(endpoint: str, n: int, expire_at: float) -> float:
    async with AsyncKVClient(endpoint, timeout_s=30) as kv:
        start = time.time()
        for i in range(0, n, 1000):
            await asyncio.gather(*(kv.put(f"key-{j:010d}", "v" * 16,
                                          ttl=max(0.001, expire_at - time.time()))
                                   for j in range(i, min(n, i + 1000))))
        return time.time() - start


def _counts(cluster: LocalCluster) -> tuple[int, dict[str, int]]:
    nodes = [n for n in cluster.status()["nodes"] if n.get("live")]
    leader = max((n["key_count"] for n in nodes if n.get("role") in (2, "leader", "LEADER")),
                 default=-1)
    return leader, {n["node_id"]: n["key_count"] for n in nodes}


def cluster_sweep(n: int, lead_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(
            Path(tmp) / "data", shards=1, replicas=3, brokers=1, port=0, fsync="never",
            heartbeat_ms=50, election_timeout_ms=1000) as cluster:
        cluster.wait_ready(30)
        expire_at = time.time() + lead_s
        load_s = asyncio.run(_load(cluster.endpoint, n, expire_at))
        if time.time() >= expire_at:
            raise SystemExit(f"loading took {load_s:.1f}s, over --lead-s {lead_s}: raise it")
        leader_count, _ = _counts(cluster)
        time.sleep(max(0.0, expire_at - time.time()))
        leader_empty = all_empty = 0.0
        deadline = expire_at + 120
        while time.time() < deadline:
            leader_count, counts = _counts(cluster)
            now = time.time()
            if leader_count == 0 and not leader_empty:
                leader_empty = now
            if counts and not any(counts.values()):
                all_empty = now
                break
            time.sleep(0.02)
        if not all_empty:
            raise SystemExit(f"keys left after 120 s: {counts}")
        leader_s = leader_empty - expire_at
        all_s = all_empty - expire_at
        return {"keys": n, "load_s": round(load_s, 2), "leader_empty_s": round(leader_s, 3),
                "all_replicas_empty_s": round(all_s, 3),
                "keys_per_s_leader": round(n / leader_s),
                "keys_per_s_all_replicas": round(n / all_s),
                "note": "times include up to one 50 ms heartbeat of observation delay"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.expiry", description=__doc__)
    p.add_argument("--keys", type=int, default=200_000, help="keys in the cluster run")
    p.add_argument("--core-keys", type=int, default=200_000)
    p.add_argument("--lead-s", type=float, default=40.0,
                   help="the keys expire this long after loading starts")
    p.add_argument("--skip-cluster", action="store_true")
    args = p.parse_args(argv)
    out: dict[str, Any] = {"index_bytes_per_key": round(index_bytes_per_key(args.core_keys))}
    print(json.dumps(out), flush=True)
    out["core"] = core_sweep(args.core_keys)
    print(json.dumps({"core": out["core"]}), flush=True)
    if not args.skip_cluster:
        out["cluster"] = cluster_sweep(args.keys, args.lead_s)
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
