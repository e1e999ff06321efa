"""Batches and scans on a local cluster: mget of N keys against N single gets, scan keys/s,
and the memory the sorted key index costs per key.

Starts a local cluster (default 2 shards x 3 replicas, 1 broker, fsync never: the
gets are reads, so the fsync policy does not matter), writes ``--keys`` keys of
``--value-size`` bytes, then alternates, ``--rounds`` times: ``--repeat`` calls of
``mget`` of ``--batch`` random keys, and ``--repeat`` x ``--batch`` single ``get`` calls
one after the other (what a client without batches does), both linearizable, from one
synchronous client. Prints the median time per batch of each and the ratio (target
>= 5x). Then times full scans (``scan_iter`` over every key, pages of ``--page``) for
scan keys/s, and measures the sorted index in this process (``tracemalloc`` around its
first build over ``--index-keys`` keys of 16 bytes): bytes per key.

    python -m bench.multikey [--keys 10000] [--batch 100] [--repeat 20] [--rounds 5]
        [--shards 2 --replicas 3] [--page 1000] [--index-keys 1000000] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zkv.client import KVClient
from zkv.ops.cluster import LocalCluster
from zkv.storage_node.state_machine import KeyTable


def index_bytes_per_key(n: int) -> float:
    """Bytes the sorted index adds per key: the table built first, then measured alone."""
    table = KeyTable()
    for i in range(n):
        table.put(b"key:%012d" % i, b"v", 1)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    next(iter(table.keys_from(b"")))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(1)
    keys = [f"bench:{i:07d}" for i in range(args.keys)]
    with tempfile.TemporaryDirectory(prefix="zkv-bench-multikey-") as tmp, LocalCluster(
            Path(tmp) / "data", shards=args.shards, replicas=args.replicas, port=0,
            fsync="never", log_level="WARNING") as cluster:
        cluster.wait_ready(60)
        with KVClient(cluster.endpoints, timeout_s=30) as kv:
            value = b"v" * args.value_size
            for i in range(0, len(keys), 500):
                kv.mset(dict.fromkeys(keys[i:i + 500], value))
            batch_s, single_s = [], []
            for _ in range(args.rounds):
                batches = [rng.sample(keys, args.batch) for _ in range(args.repeat)]
                t0 = time.perf_counter()
                for b in batches:
                    got = kv.mget(b)
                    assert len(got) == len(b)
                batch_s.append((time.perf_counter() - t0) / args.repeat)
                t0 = time.perf_counter()
                for b in batches:
                    for k in b:
                        kv.get(k)
                single_s.append((time.perf_counter() - t0) / args.repeat)
            scans = []
            for _ in range(max(1, args.rounds // 2)):
                t0 = time.perf_counter()
                n = sum(1 for _ in kv.scan_iter("bench:", page_size=args.page))
                scans.append(n / (time.perf_counter() - t0))
                assert n == len(keys)
    mget_ms = statistics.median(batch_s) * 1000
    gets_ms = statistics.median(single_s) * 1000
    return {
        "shape": f"{args.shards} shards x {args.replicas} replicas",
        "keys": args.keys, "batch": args.batch, "value_size": args.value_size,
        "mget_ms": round(mget_ms, 2), "single_gets_ms": round(gets_ms, 2),
        "speedup": round(gets_ms / mget_ms, 1),
        "scan_keys_per_s": round(statistics.median(scans)),
        "index_bytes_per_key": round(index_bytes_per_key(args.index_keys), 1),
        "index_keys": args.index_keys,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--page", type=int, default=1000)
    p.add_argument("--index-keys", type=int, default=1_000_000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['shape']}, {result['keys']} keys of {result['value_size']} B: "
              f"mget of {result['batch']} keys {result['mget_ms']} ms, "
              f"{result['batch']} single gets {result['single_gets_ms']} ms: "
              f"{result['speedup']}x (target >= 5x); full scan "
              f"{result['scan_keys_per_s']} keys/s; sorted index "
              f"{result['index_bytes_per_key']} B/key over {result['index_keys']} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
