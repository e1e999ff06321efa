"""``python -m bench.ring``: what the ring costs at its largest planned size.

Measures, for ``--shards`` shards x ``--vnodes`` vnodes (default 64 x 1024, 65,536
tokens):

- cold build: ``Ring(config)`` with no shard's tokens memoised yet (a process's first
  ring: one blake3 per token, then one sort);
- next-epoch build: the same shards plus one, as a broker or node builds after a shard
  is added (only the new shard's tokens are hashed; the sort is the rest);
- ``shard_for(key)``: one blake3 of the key and one bisect (what the broker and the SDK
  do per request), and ``owner_of_position`` alone (the bisect);
- ``plan_moves`` for that shard addition (the coordinator, once per ring change).

Each figure is the best of ``--repeat`` runs (on a shared machine other load only adds
time), in this process: compare figures from the same machine only. ``--json``: one object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from zkv.protocol.ring import DEFAULT_VNODES, Ring, RingConfig, plan_moves, position, shard_tokens


def _best_s(fn: Callable[[], object], repeat: int, before: Callable[[], None] = lambda: None) -> float:
    runs = []
    for _ in range(repeat):
        before()
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return min(runs)  # other load only adds time: the best run is the ring's own cost


def measure(shards: int, vnodes: int, keys: int, repeat: int) -> dict[str, float | int]:
    cfg = RingConfig(1, tuple(range(shards)), vnodes)
    grown = RingConfig(2, tuple(range(shards + 1)), vnodes)
    cold_s = _best_s(lambda: Ring(cfg), repeat, before=shard_tokens.cache_clear)
    Ring(cfg)  # memoise the shards for the next-epoch figure
    next_s = _best_s(lambda: Ring(grown), repeat)
    ring, bigger = Ring(cfg), Ring(grown)
    sample = [f"key-{i}".encode() for i in range(keys)]
    positions = [position(k) for k in sample]

    def lookups() -> None:
        for k in sample:
            ring.shard_for(k)

    def bisects() -> None:
        for p in positions:
            ring.owner_of_position(p)

    return {
        "shards": shards,
        "vnodes": vnodes,
        "tokens": shards * vnodes,
        "build_cold_ms": cold_s * 1e3,
        "build_next_epoch_ms": next_s * 1e3,
        "shard_for_us": _best_s(lookups, repeat) / keys * 1e6,
        "owner_of_position_us": _best_s(bisects, repeat) / keys * 1e6,
        "plan_moves_ms": _best_s(lambda: plan_moves(ring, bigger), repeat) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ring", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--vnodes", type=int, default=DEFAULT_VNODES)
    p.add_argument("--keys", type=int, default=100_000, help="keys per lookup run")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = measure(args.shards, args.vnodes, args.keys, args.repeat)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"ring {r['shards']} shards x {r['vnodes']} vnodes = {r['tokens']:,} tokens "
          f"(best of {args.repeat})")
    print(f"  build, cold                 {r['build_cold_ms']:8.1f} ms")
    print(f"  build, next epoch (+1 shard) {r['build_next_epoch_ms']:7.1f} ms")
    print(f"  shard_for(key)              {r['shard_for_us']:8.2f} us")
    print(f"  owner_of_position(pos)      {r['owner_of_position_us']:8.2f} us")
    print(f"  plan_moves (+1 shard)       {r['plan_moves_ms']:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
