"""``python -m bench.migration``: how fast a shard is added online, and what it costs the
traffic that keeps running meanwhile.

Starts a local cluster (default 2 shards x 3 replicas, 1 broker, fsync never) on free
ports, loads ``--keys`` keys of ``--value-size`` bytes, then keeps a background load
(``--concurrency`` requests in flight from one ``AsyncKVClient``, half gets, half puts
over the same keys) and, after ``--settle-s`` seconds of baseline, runs
``LocalCluster.add_shard`` (the code behind ``zkv admin add-shard``). Reports:

- migration speed: keys moved per second and MB/s of key+value payload, from the
  coordinator's first step (``begin``) to the end of ``drop`` (bulk copy, fence, delta,
  sessions, flip, drop); starting the new group's processes is reported apart;
- the throughput dip, for two halves of the traffic kept apart: requests for keys that
  stay where they are, and requests for keys that move. Each half has its own workers,
  so keys waiting on the fence cannot starve the others of senders. Per half: ops/s
  in 250 ms windows before, during and after the move (mean and the worst window
  during the move), the slowest request during the move, and how long the moving
  ranges were fenced.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from zkv.client.aio import AsyncKVClient
from zkv.ops.cluster import LocalCluster
from zkv.protocol.ring import Ring

WINDOW_S = 0.25
PHASE1_DONE = re.compile(r"phase 1 \d+->\d+: (\d+) keys$")


async def _load(endpoint: str, keys: list[bytes], value: bytes, concurrency: int) -> None:
    async with AsyncKVClient(endpoint, timeout_s=30) as kv:
        for i in range(0, len(keys), 1000):
            await asyncio.gather(*(kv.put(k, value) for k in keys[i:i + 1000]))


async def _traffic(endpoint: str, pools: dict[str, list[bytes]], value: bytes,
                   concurrency: int, stop: threading.Event,
                   done: dict[str, list[tuple[float, float]]]) -> None:
    """``concurrency`` workers per pool, each a get or a put at a time on its pool's
    keys; ``done[pool]`` gets (finish time, latency) per request."""
    async with AsyncKVClient(endpoint, timeout_s=30) as kv:
        rng = random.Random(1)

        async def one(pool: str) -> None:
            keys, out = pools[pool], done[pool]
            while not stop.is_set():
                k = rng.choice(keys)
                t0 = time.monotonic()
                if rng.random() < 0.5:
                    await kv.get(k)
                else:
                    await kv.put(k, value)
                t1 = time.monotonic()
                out.append((t1, t1 - t0))

        await asyncio.gather(*(one(p) for p in pools for _ in range(concurrency)))


def _rate(done: list[tuple[float, float]], t0: float, t1: float) -> float:
    return sum(1 for t, _ in done if t0 <= t < t1) / max(t1 - t0, 1e-9)


def _pool_figures(done: list[tuple[float, float]], t_start: float, t_end: float,
                  settle_s: float) -> dict[str, Any]:
    windows = []
    t = t_start
    while t < t_end:
        windows.append(_rate(done, t, min(t + WINDOW_S, t_end)))
        t += WINDOW_S
    during = sorted(lat for t, lat in done if t_start <= t < t_end)
    before = sorted(lat for t, lat in done if t_start - settle_s <= t < t_start)

    def pct(xs: list[float], q: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1) if xs else None

    return {
        "ops_per_s_before": round(_rate(done, t_start - settle_s, t_start)),
        "ops_per_s_during": round(_rate(done, t_start, t_end)),
        "ops_per_s_after": round(_rate(done, t_end, t_end + settle_s)),
        "worst_window_ops_per_s": round(min(windows)) if windows else None,
        "p99_ms_before": pct(before, 0.99), "p99_ms_during": pct(during, 0.99),
        "max_ms_before": pct(before, 1.0), "max_ms_during": pct(during, 1.0),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    keys = [f"bench:{i}".encode() for i in range(args.keys)]
    value = b"x" * args.value_size
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(
        Path(tmp) / "data", shards=args.shards, replicas=args.replicas, brokers=1, port=0,
        fsync=args.fsync, log_level="WARNING",
    ) as cluster:
        cluster.wait_ready(60)
        t = time.monotonic()
        asyncio.run(_load(cluster.endpoint, keys, value, args.concurrency))
        load_s = time.monotonic() - t
        old = Ring.of(range(args.shards))
        new = Ring.of(range(args.shards + 1))
        pools = {"staying": [k for k in keys if old.shard_for(k) == new.shard_for(k)],
                 "moving": [k for k in keys if old.shard_for(k) != new.shard_for(k)]}
        stop = threading.Event()
        done: dict[str, list[tuple[float, float]]] = {p: [] for p in pools}
        loader = threading.Thread(target=lambda: asyncio.run(
            _traffic(cluster.endpoint, pools, value, args.concurrency // 2, stop, done)),
            daemon=True)
        loader.start()
        time.sleep(args.settle_s)
        lines: list[str] = []
        moved = {"keys": 0}

        def progress(line: str) -> None:
            lines.append(line)
            done_line = PHASE1_DONE.match(line)  # "phase 1 0->2: 325 keys"
            if done_line:
                moved["keys"] += int(done_line.group(1))

        fence: dict[str, float] = {}

        def on_step(step: str) -> None:
            if step in ("begin", "fence", "ring_set", "drop") and step not in fence:
                fence[step] = time.monotonic()

        t_start = time.monotonic()
        cluster.add_shard(progress=progress, on_step=on_step,
                          rate_bytes_s=int(args.max_rate * 1e6))
        t_end = time.monotonic()
        time.sleep(args.settle_s)
        stop.set()
        loader.join(35)
    # the shard add includes starting 3 processes and electing a leader; the copy
    # starts at "ring epoch" (the first progress line)
    spawn_s = fence.get("begin", t_start) - t_start
    migration_s = t_end - fence.get("begin", t_start)
    payload_bytes = moved["keys"] * (args.value_size + len(keys[0]) + 12)
    result = {
        "keys": args.keys, "value_size": args.value_size, "shards": args.shards,
        "replicas": args.replicas, "fsync": args.fsync, "max_rate_mb_s": args.max_rate,
        "load_s": round(load_s, 2),
        "moved_keys": moved["keys"],
        "add_shard_s": round(t_end - t_start, 2),
        "new_group_start_s": round(spawn_s, 2),
        "migration_s": round(migration_s, 2),
        "moved_keys_per_s": round(moved["keys"] / migration_s),
        "moved_mb_per_s": round(payload_bytes / migration_s / 1e6, 2),
        "fenced_s": round(fence["drop"] - fence["fence"], 3) if "drop" in fence else None,
        **{f"{pool}_{k}": v for pool in pools
           for k, v in _pool_figures(done[pool], t_start, t_end, args.settle_s).items()},
        "progress": lines,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.migration", description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=50_000)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--fsync", default="never")
    p.add_argument("--concurrency", type=int, default=32,
                   help="requests in flight, half on staying keys, half on moving keys")
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--max-rate", type=float, default=0.0, metavar="MB/S",
                   help="bound the streams (zkv admin add-shard --max-rate); 0: none")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = run(args)
    if args.json:
        print(json.dumps(r))
        return 0
    for line in r.pop("progress"):
        print("  " + line)
    for k, v in r.items():
        print(f"{k:>24}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
