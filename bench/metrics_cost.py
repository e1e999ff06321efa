"""The throughput cost of /metrics: the same cluster with and without ``--metrics-port``.

Starts two local clusters of the same shape on free ports (default as ``make bench``:
1 shard, 1 replica, 1 broker, fsync never: the shape where the per-request Python cost
shows most), one with metrics on and every process's ``/metrics`` scraped once a second
(Prometheus scrapes every 15 s by default: this is harsher), one with metrics off. Then
alternates ``zkv.ops.bench.run_bench`` runs against each (``--rounds``), and prints the
best of each and the cost, 1 - on / off (target < 5%). Alternating keeps a noisy
neighbour from favouring one side; the idle cluster only heartbeats meanwhile.

On a shared machine the throughput of one run swings by 2x with the neighbours' load,
so it also prints the CPU the cluster's processes spent per request (user + system from
/proc, over the run and its warmup): that is what metrics add to, and it barely depends
on what else runs. The median over the rounds is the figure to quote.

    python -m bench.metrics_cost [--rounds 3] [--duration 5] [--concurrency 64]
        [--shards 1 --replicas 1 --fsync never] [--json]
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
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import READY_TIMEOUT_S, _best, _load, _row, _say
from bench.relay_baseline import add_load_arguments
from zkv.ops.bench import BenchResult
from zkv.ops.cluster import LocalCluster

TARGET_COST = 0.05
SCRAPE_INTERVAL_S = 1.0
#: CPU microseconds of the cluster's processes per request, per round
CPU_US: dict[str, list[float]] = {"on": [], "off": []}


def _scrape_forever(urls: list[str], stop: threading.Event, counts: list[int]) -> None:
    while not stop.wait(SCRAPE_INTERVAL_S):
        for url in urls:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                r.read()
                counts[0] += 1


def _cpu_s(cluster: LocalCluster) -> float:
    """User + system CPU seconds of the cluster's running processes (Linux /proc)."""
    ticks = 0
    for child in [*cluster.brokers, *cluster.nodes.values()]:
        if child.proc is not None:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{child.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def run_rounds(args: argparse.Namespace, tmp: str) -> tuple[list[BenchResult], list[BenchResult], int]:
    on: list[BenchResult] = []
    off: list[BenchResult] = []
    scrapes = [0]
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        clusters = {}
        for name, port in (("on", 0), ("off", None)):
            c = stack.enter_context(LocalCluster(
                Path(tmp) / name, shards=args.shards, replicas=args.replicas, brokers=1,
                port=0, fsync=args.fsync, log_level="WARNING", metrics_port=port))
            c.wait_ready(READY_TIMEOUT_S, progress=lambda s: _say(f"waiting: {s}"))
            clusters[name] = c
        urls = list(clusters["on"].metrics_urls().values())
        _say(f"metrics on {len(urls)} processes, scraped every {SCRAPE_INTERVAL_S:g} s")
        scraper = threading.Thread(target=_scrape_forever, args=(urls, stop, scrapes),
                                   daemon=True)
        scraper.start()
        stack.callback(stop.set)
        for i in range(args.rounds):
            # swap who goes first each round: neither side always runs on a warmer machine
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for name in order:
                cpu0 = _cpu_s(clusters[name])
                result = _load(args, clusters[name].endpoint, f"{name}#{i + 1}", True)
                requests = result.ops_s * (args.duration + args.warmup)
                CPU_US[name].append((_cpu_s(clusters[name]) - cpu0) / max(1.0, requests) * 1e6)
                (on if name == "on" else off).append(result)
    return on, off, scrapes[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="throughput with /metrics on vs off")
    add_load_arguments(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--fsync", default="never")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zkv-metrics-bench-") as tmp:
        on_runs, off_runs, scrapes = run_rounds(args, tmp)
    on, off = _best(on_runs), _best(off_runs)
    cost = 1 - on.ops_s / off.ops_s if on and off and off.ops_s > 0 else None
    if args.json:
        print(json.dumps({"on": on and on.to_dict(), "off": off and off.to_dict(),
                          "cost": cost, "target_cost": TARGET_COST, "scrapes": scrapes,
                          "cpu_us_per_request": CPU_US,
                          "rounds": {"on": [r.ops_s for r in on_runs],
                                     "off": [r.ops_s for r in off_runs]}}))
        return 0
    print(f"cluster: {args.shards} shard(s) x {args.replicas} replica(s), fsync "
          f"{args.fsync}; load: concurrency {args.concurrency}, {args.duration:g}s, value "
          f"{args.value_size} B, reads {args.read_ratio:.0%}; best of {args.rounds} "
          f"alternating round(s); {scrapes} scrapes")
    print(f"{'':<10}{'ops/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'p99.9 ms':>10}{'errors':>8}")
    print(_row("metrics", on))
    print(_row("none", off))
    print("rounds ops/s: on " + ", ".join(f"{r.ops_s:,.0f}" for r in on_runs)
          + "; off " + ", ".join(f"{r.ops_s:,.0f}" for r in off_runs))
    cpu_on, cpu_off = statistics.median(CPU_US["on"]), statistics.median(CPU_US["off"])
    print(f"cluster CPU per request, median of rounds: on {cpu_on:.1f} us, off "
          f"{cpu_off:.1f} us: {cpu_on / cpu_off - 1:+.1%} with metrics")
    print("rounds CPU us/request: on " + ", ".join(f"{c:.1f}" for c in CPU_US["on"])
          + "; off " + ", ".join(f"{c:.1f}" for c in CPU_US["off"]))
    if cost is not None:
        verdict = "ok" if cost < TARGET_COST else "OVER TARGET"
        print(f"cost of metrics: {cost:+.1%} (target < {TARGET_COST:.0%}: {verdict})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
