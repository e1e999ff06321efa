"""``make bench``: zkv against a bare pyzmq relay of the same shape, same load.

Starts a local zkv cluster (1 shard, 1 replica, 1 broker, fsync never) on free ports and
the relay baseline (``bench/relay_baseline.py``), then alternates ``zkv.ops.bench.run_bench``
runs against each (``--rounds``, same generator, value size, window and duration), and
prints the best of each and the ratio zkv / baseline (target >= 0.8). Alternating keeps
a noisy neighbour on the machine from favouring one side.

    python bench/compare.py [--duration 5] [--concurrency 64] [--json] [--min-ratio 0.8]

Exit 0, or 1 if a side failed or (with ``--min-ratio``) the ratio is below it. Every
phase is bounded in time and every process started is stopped, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.relay_baseline import Baseline, add_load_arguments
from zkv.ops.bench import BenchResult, run_bench
from zkv.ops.cluster import LocalCluster

TARGET_RATIO = 0.8
READY_TIMEOUT_S = 30.0


def _say(line: str) -> None:
    print(f"compare: {line}", file=sys.stderr, flush=True)


def _progress(name: str) -> Any:
    def show(elapsed: float, ok: int, err: int) -> None:
        _say(f"{name} [{elapsed:4.1f}s] ok {ok:,} errors {err:,}")
    return show


def _load(args: argparse.Namespace, endpoint: str, name: str, check: bool) -> BenchResult:
    return run_bench(endpoint, concurrency=args.concurrency, duration_s=args.duration,
                     keys=args.keys, value_size=args.value_size, read_ratio=args.read_ratio,
                     warmup_s=args.warmup, processes=args.processes, sockets=args.sockets,
                     check=check, progress=_progress(name))


def run_rounds(args: argparse.Namespace, data_dir: str,
               failures: list[str]) -> tuple[list[BenchResult], list[BenchResult]]:
    """Alternate zkv and baseline runs, so a noisy neighbour hurts both alike."""
    zkv: list[BenchResult] = []
    base: list[BenchResult] = []
    with contextlib.ExitStack() as stack:
        cluster = None
        try:
            cluster = stack.enter_context(LocalCluster(
                data_dir, shards=1, replicas=1, brokers=1, port=0, fsync="never",
                log_level="WARNING"))
            _say(f"zkv cluster starting in {data_dir} on {cluster.endpoint}")
            cluster.wait_ready(READY_TIMEOUT_S, progress=lambda s: _say(f"waiting: {s}"))
        except Exception as exc:  # report, and still measure the baseline
            failures.append(f"zkv: {type(exc).__name__}: {exc}")
            cluster = None
        relay = stack.enter_context(Baseline())
        for i in range(args.rounds):
            if cluster is not None:
                try:
                    zkv.append(_load(args, cluster.endpoint, f"zkv#{i + 1}", True))
                except Exception as exc:
                    failures.append(f"zkv: {type(exc).__name__}: {exc}")
                    cluster = None
            base.append(_load(args, relay.endpoint, f"baseline#{i + 1}", False))
    return zkv, base


def _best(results: list[BenchResult]) -> BenchResult | None:
    return max(results, key=lambda r: r.ops_s, default=None)


def _row(name: str, r: BenchResult | None) -> str:
    if r is None:
        return f"{name:<10}{'failed':>12}"
    lat = r.latency_ms["all"]
    cells = "".join(f"{'-' if lat.get(k) is None else f'{lat[k]:.3f}':>10}"
                    for k in ("p50", "p99", "p99.9"))
    errs = sum(r.errors.values())
    return f"{name:<10}{r.ops_s:>12,.0f}{cells}{errs:>8}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="zkv vs a bare zmq relay, same load")
    add_load_arguments(p)
    p.add_argument("--data-dir", default=None, help="cluster data (default: a temp dir)")
    p.add_argument("--rounds", type=int, default=2,
                   help="alternating zkv/baseline runs; the best of each is compared")
    p.add_argument("--min-ratio", type=float, default=None,
                   help=f"exit 1 below this ratio (target {TARGET_RATIO})")
    args = p.parse_args(argv)

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="zkv-bench-") as tmp:
        try:
            zkv_runs, base_runs = run_rounds(args, args.data_dir or tmp, failures)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            zkv_runs, base_runs = [], []
    zkv, base = _best(zkv_runs), _best(base_runs)
    ratio = zkv.ops_s / base.ops_s if zkv and base and base.ops_s > 0 else None

    if args.json:
        print(json.dumps({"zkv": zkv and zkv.to_dict(), "baseline": base and base.to_dict(),
                          "ratio": ratio, "target_ratio": TARGET_RATIO,
                          "rounds": {"zkv": [r.ops_s for r in zkv_runs],
                                     "baseline": [r.ops_s for r in base_runs]},
                          "failures": failures}))
    else:
        print(f"load: concurrency {args.concurrency}, {args.duration:g}s (+{args.warmup:g}s "
              f"warmup), value {args.value_size} B, reads {args.read_ratio:.0%}, "
              f"{args.keys} keys, {args.processes} generator process(es), best of "
              f"{args.rounds} alternating round(s)")
        print(f"{'':<10}{'ops/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'p99.9 ms':>10}{'errors':>8}")
        print(_row("zkv", zkv))
        print(_row("baseline", base))
        if ratio is not None:
            verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
            print(f"ratio zkv/baseline: {ratio:.2f} (target >= {TARGET_RATIO}: {verdict})")
        for f in failures:
            print(f"failed: {f}", file=sys.stderr)
    if failures:
        return 1
    if args.min_ratio is not None and (ratio is None or ratio < args.min_ratio):
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
