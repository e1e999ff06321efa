"""``make bench``'s round trips (issue 14, target 3): one request at a time, measured
against the wire and the disk in the same run.

Alternating ``--rounds`` times (the lowest p50 of each side is kept, so a noisy
neighbour does not pick the winner):

- **relay**: one request at a time through the bare pyzmq ROUTER relay of
  ``bench/relay_baseline.py`` (the shape of a broker hop, a worker answering from a
  dict with zkv's codec): the wire's floor for a round trip;
- **fdatasync**: ``write`` + ``fdatasync`` of one 128-byte record, ``--syncs`` times, in
  a file next to the cluster's data dirs (the same filesystem): what one durable write
  costs on this disk;
- **fdatasync, 3 at once** (informational, not in a target): the same from three
  threads, each its own file, starting together each time. A 1 x 3 cluster's leader and
  followers sync at the same moment on this one disk, so this is what each of them
  pays; the printout adds the put's ratio with it in the bound, to tell the disk's share
  of the put from the processes';
- **put**: one put at a time on 1 shard x 3 replicas, fsync always;
- **get**: one linearizable get at a time on 1 shard x 1 replica;
- **put floor** (informational, not in a target): one put at a time through
  ``bench/put_floor.py``, the put's path in bare pyzmq (the relay, a leader and two
  followers that only write, fdatasync and ack): what the path costs with no Raft on it;
- **put floor, unsynced** (informational): the same path without its fdatasyncs. With
  the floor beside it, it is both sides of the put's bound in every run: what the hops
  alone leave of the bound, and what syncing on a majority of this one disk adds.

Targets: put p50 <= 2 x relay p50 + fdatasync p50 (two hops out and back, one fsync on
the critical path: the leader's and the followers' overlap); get p50 <= 1.2 x relay
p50. The verdicts are printed, never asserted: this is a benchmark, not a test.

    python -m bench.round_trips [--duration 3] [--rounds 3] [--syncs 200] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.put_floor import Floor
from bench.relay_baseline import Baseline
from zkv.ops.bench import BenchResult, run_bench
from zkv.ops.cluster import LocalCluster

PUT_FACTOR = 2.0  # put p50 <= PUT_FACTOR x relay p50 + fdatasync p50
SHARED_DISK_WRITERS = 3  # a 1 x 3 cluster's replicas, syncing on one disk at once
GET_FACTOR = 1.2  # get p50 <= GET_FACTOR x relay p50
READY_TIMEOUT_S = 60.0
RECORD = b"r" * 128


def _say(line: str) -> None:
    print(f"round_trips: {line}", file=sys.stderr, flush=True)


def fdatasync_ms(directory: Path, count: int,
                 before_each: Callable[[], object] | None = None) -> list[float]:
    """Milliseconds of each ``write`` + ``fdatasync`` of one record appended to a file
    in ``directory`` (removed afterwards); ``before_each`` is called untimed before
    each one (``concurrent_fdatasync_ms``: a barrier)."""
    fd, name = tempfile.mkstemp(prefix="fdatasync-", dir=directory)
    try:
        times = []
        for _ in range(count):
            if before_each is not None:
                before_each()
            started = time.perf_counter()
            os.write(fd, RECORD)
            os.fdatasync(fd)
            times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        os.close(fd)
        os.unlink(name)


def concurrent_fdatasync_ms(directory: Path, writers: int, count: int) -> list[float]:
    """``fdatasync_ms`` from ``writers`` threads at once (each its own file; a barrier
    starts every round together; the GIL is released in the syscalls): every sync's
    milliseconds, all threads' together."""
    barrier = threading.Barrier(writers)
    times: list[list[float]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []

    def writer(mine: list[float]) -> None:
        try:
            mine.extend(fdatasync_ms(directory, count, barrier.wait))
        except BaseException as exc:  # raised below, after the join
            errors.append(exc)
            barrier.abort()  # the others stop waiting for this one

    threads = [threading.Thread(target=writer, args=(mine,)) for mine in times]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                   errors[0])
    return [ms for mine in times for ms in mine]


def _p50(result: BenchResult, op: str) -> float | None:
    lat = result.latency_ms.get(op) or {}
    value = lat.get("p50")
    return None if value is None else float(value)


def _one_at_a_time(endpoint: str, args: argparse.Namespace, read_ratio: float,
                   check: bool) -> BenchResult:
    return run_bench(endpoint, concurrency=1, duration_s=args.duration, keys=1_000,
                     value_size=100, read_ratio=read_ratio, warmup_s=args.warmup,
                     check=check)


def measure(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """Every side, alternating; the per-round p50s and the lowest of each."""
    rounds: dict[str, list[float]] = {"relay": [], "fdatasync": [], "put": [], "get": [],
                                      "put_floor": [], "put_floor_unsynced": []}
    syncs: list[float] = []
    shared: list[float] = []  # each round's p50 of SHARED_DISK_WRITERS syncs at once
    with contextlib.ExitStack() as stack:
        three = stack.enter_context(LocalCluster(
            data_dir / "1x3", shards=1, replicas=3, brokers=1, port=0, fsync="always",
            log_level="WARNING"))
        one = stack.enter_context(LocalCluster(
            data_dir / "1x1", shards=1, replicas=1, brokers=1, port=0, fsync="never",
            log_level="WARNING"))
        relay = stack.enter_context(Baseline())
        floor = stack.enter_context(Floor(data_dir))
        unsynced = stack.enter_context(Floor(data_dir, sync=False))
        for cluster in (three, one):
            cluster.wait_ready(READY_TIMEOUT_S)
        for i in range(args.rounds):
            _say(f"round {i + 1}/{args.rounds}")
            r = _one_at_a_time(relay.endpoint, args, 0.5, check=False)
            rounds["relay"].append(_p50(r, "all") or float("nan"))
            times = fdatasync_ms(data_dir, args.syncs)
            syncs.extend(times)
            rounds["fdatasync"].append(statistics.median(times))
            shared.append(statistics.median(
                concurrent_fdatasync_ms(data_dir, SHARED_DISK_WRITERS, args.syncs)))
            r = _one_at_a_time(three.endpoint, args, 0.0, check=True)
            rounds["put"].append(_p50(r, "put") or float("nan"))
            r = _one_at_a_time(one.endpoint, args, 1.0, check=True)
            rounds["get"].append(_p50(r, "get") or float("nan"))
            r = _one_at_a_time(floor.endpoint, args, 0.0, check=False)
            rounds["put_floor"].append(_p50(r, "put") or float("nan"))
            r = _one_at_a_time(unsynced.endpoint, args, 0.0, check=False)
            rounds["put_floor_unsynced"].append(_p50(r, "put") or float("nan"))
    best = {k: min(v) for k, v in rounds.items()}
    put_bound = PUT_FACTOR * best["relay"] + best["fdatasync"]
    get_bound = GET_FACTOR * best["relay"]
    syncs.sort()
    return {
        "rounds": rounds,
        "best_p50_ms": best,
        "fdatasync_p99_ms": syncs[int(0.99 * (len(syncs) - 1))] if syncs else None,
        # informational: the disk's share of the put (module docstring)
        "fdatasync_shared_p50_ms": min(shared),
        "put_ratio_shared_disk": best["put"] / (PUT_FACTOR * best["relay"] + min(shared)),
        "put_bound_ms": put_bound,
        "get_bound_ms": get_bound,
        "put_ratio": best["put"] / put_bound,
        # informational: the path's own floor, against the bound and against zkv's put
        "put_floor_ratio": best["put_floor"] / put_bound,
        "put_over_floor": best["put"] / best["put_floor"],
        "put_floor_unsynced_ratio": best["put_floor_unsynced"] / put_bound,
        "get_ratio": best["get"] / best["relay"],
        "put_ok": best["put"] <= put_bound,
        "get_ok": best["get"] <= get_bound,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one request at a time vs the wire and the disk")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--syncs", type=int, default=200, help="fdatasyncs per round")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the clusters and the fdatasync file go (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zkv-rtt-") as tmp:
        out = measure(args, args.data_dir or Path(tmp))
    if args.json:
        print(json.dumps(out))
        return 0
    best = out["best_p50_ms"]
    print(f"one request at a time, best p50 of {args.rounds} alternating round(s) of "
          f"{args.duration:g}s")
    print(f"  relay req/rep p50      {best['relay']:.3f} ms")
    print(f"  fdatasync p50 (p99)    {best['fdatasync']:.3f} ms ({out['fdatasync_p99_ms']:.3f})")
    print(f"  put 1 x 3, fsync always p50  {best['put']:.3f} ms  bound 2 x relay + fdatasync "
          f"= {out['put_bound_ms']:.3f} ms: {out['put_ratio']:.2f} of it "
          f"({'ok' if out['put_ok'] else 'ABOVE TARGET'})")
    print(f"  fdatasync p50, {SHARED_DISK_WRITERS} at once  {out['fdatasync_shared_p50_ms']:.3f} ms "
          f"(informational: 1 x 3's replicas sync together on this disk; put with it in "
          f"the bound: {out['put_ratio_shared_disk']:.2f} of it)")
    print(f"  put floor p50          {best['put_floor']:.3f} ms (informational: the put's path in "
          f"bare pyzmq, only write + fdatasync + ack on it: {out['put_floor_ratio']:.2f} of the "
          f"bound; zkv's put is {out['put_over_floor']:.2f} x it)")
    print(f"  put floor, unsynced p50  {best['put_floor_unsynced']:.3f} ms (informational: the "
          f"same path without its fdatasyncs: {out['put_floor_unsynced_ratio']:.2f} of the "
          f"bound; syncing on a majority of this disk adds "
          f"{best['put_floor'] - best['put_floor_unsynced']:.3f} ms)")
    print(f"  get 1 x 1, linearizable p50  {best['get']:.3f} ms  = {out['get_ratio']:.2f} x relay "
          f"(target <= {GET_FACTOR}: {'ok' if out['get_ok'] else 'ABOVE TARGET'})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
