"""``python -m bench.watch_fanout``: watch fan-out, events/s delivered to 100 watchers.

One local cluster (default 1 shard x 3 replicas, 1 broker, fsync never) and three
phases of ``--duration`` seconds, each on a fresh prefix, with the same writers:
0 watchers (the writers' baseline), 1 watcher (the delivery baseline) and
``--watchers`` (default 100), all on the phase's prefix. ``--writers`` asyncio tasks
in this process, on one ``AsyncKVClient``, put fresh keys of ``--value-size`` bytes at
``--rate`` writes/s in total (0: as fast as they go), one put in flight each.

Why the watchers look like this (``watch_fanout_watchers.py``): each is
``AsyncKVClient.watch(prefix)`` on a client of its own (its own connection and client
id), as 100 separate applications would be, so the broker and the shard leader carry
one poll per watcher and shard, as in production: a shared client would not change
what the server does per poll, but sync watchers would need 100 threads fighting for
one GIL. The asyncio watchers share the event loops of ``--procs`` spawned processes
(default 2): on a machine of few cores more processes only take CPU from the cluster,
and one process would cap delivery at what one core decodes. All of it runs on the
same cores as the cluster, so the watcher processes run at ``--nice`` 10: when both
want the CPU the cluster gets it first, as if the watchers were other machines, and
the writers' figures show what serving 100 watchers costs the cluster, not what
decoding the events costs 100 clients on the same two cores. The watchers' CPU is
reported beside the cluster's: when they fall behind (lag growing through the phase),
events/s is what the cores left over decode, a floor of what the server delivers.

Exactness: every watcher starts from one token (taken by a probe watcher once it has
seen an event from every shard), so none misses a write however late it connected;
the writers start once every watcher has seen a marker written after that token; after
they stop, each watcher is given the acknowledged writes and has ``--drain`` s to
receive the ones it has not got yet. Reported per phase: writes/s acknowledged and
their latency; events/s delivered in total and per watcher during the writing window;
watch polls/s the broker received (its /metrics) and events per poll; delivery lag
(from a write's acknowledgement to a watcher's receipt, on every ``--lag-every``-th
write; slightly negative when the watch reply overtook the writer's ack); missing
events (acknowledged writes a watcher never got), duplicates, unacknowledged writes
delivered (a timed-out put may still have committed: not an error); CPU in cores of
the cluster (brokers, leaders, followers), the watcher processes and the writers.
Exit status 1 if any watcher missed an event, got one twice, or failed.

    python -m bench.watch_fanout [--watchers 100] [--writers 16] [--rate 500]
        [--duration 15] [--shards 1] [--replicas 3] [--procs 2] [--json]

Every process it starts is stopped, even on failure; each step has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.watch_fanout_watchers import BIN_S, HELLO, READY_S, watchers_proc, writer_key
from zkv.client.aio import AsyncKVClient
from zkv.ops.cluster import LocalCluster
from zkv.protocol.errors import KVError

RESULT_S = 60.0  # a watcher process's report after the drain


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (Linux /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def watch_polls(cluster: LocalCluster) -> float:
    """Watch polls the brokers received so far (their /metrics, published each
    heartbeat: a figure exact to one heartbeat)."""
    total = 0.0
    for name, url in cluster.metrics_urls().items():
        if name.startswith("b"):
            with urllib.request.urlopen(url, timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith('zkv_broker_requests_total{op="watch"}'):
                        total += float(line.split()[-1])
    return total


def quantile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)


# ---------------------------------------------------------------- one phase


async def start_token(endpoint: str, prefix: bytes, shards: int) -> str:
    """A token after which nothing was written on ``prefix``: a probe watcher's, once
    it has seen a probe put on every shard (so the token names every shard)."""
    async with AsyncKVClient(endpoint, timeout_s=10) as kv:
        it = kv.watch(prefix)

        async def probe() -> None:
            for i in range(1_000_000):
                await kv.put(prefix + b"probe-%03d" % (i % 256), b"")
                if i % 64 == 63:
                    await asyncio.sleep(0.05)

        task = asyncio.create_task(probe())
        seen: set[int] = set()
        try:
            async with asyncio.timeout(READY_S):
                async for ev in it:
                    seen.add(ev.shard)
                    if len(seen) >= shards:
                        return ev.token
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await it.aclose()  # type: ignore[attr-defined]
    raise RuntimeError("the probe watcher stopped")


@dataclass
class Writes:
    acks: list[list[float]]  # per writer, per seq: the ack's monotonic time, NaN if failed
    latencies: list[float]
    start: float
    end: float


async def write(endpoint: str, prefix: bytes, args: argparse.Namespace) -> Writes:
    value = b"v" * args.value_size
    acks: list[list[float]] = [[] for _ in range(args.writers)]
    latencies: list[float] = []
    async with AsyncKVClient(endpoint, timeout_s=10) as kv:
        start = time.monotonic()
        stop = start + args.duration
        per_s = args.rate / args.writers

        async def writer(w: int) -> None:
            seq = 0
            while (now := time.monotonic()) < stop:
                if per_s:  # paced: the writers' puts interleave evenly
                    due = start + (seq + w / args.writers) / per_s
                    if due > now:
                        await asyncio.sleep(due - now)
                        if time.monotonic() >= stop:
                            break
                t0 = time.monotonic()
                try:
                    await kv.put(writer_key(prefix, w, seq), value)
                    t1 = time.monotonic()
                    acks[w].append(t1)
                    latencies.append(t1 - t0)
                except KVError:
                    acks[w].append(math.nan)
                seq += 1

        await asyncio.gather(*(writer(w) for w in range(args.writers)))
        return Writes(acks, latencies, start, time.monotonic())


async def recv(conn: Connection, timeout_s: float) -> tuple[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not conn.poll():
        if time.monotonic() > deadline:
            raise TimeoutError("a watcher process did not answer")
        await asyncio.sleep(0.02)
    kind, body = conn.recv()
    if kind == "error":
        raise RuntimeError(f"watcher process failed: {body}")
    return str(kind), body


Proc = tuple[multiprocessing.process.BaseProcess, Connection]


def cluster_pids(cluster: LocalCluster) -> dict[str, list[int]]:
    leaders = set(cluster.leaders().values())
    groups: dict[str, list[int]] = {"brokers": [], "leaders": [], "followers": []}
    for b in range(len(cluster.brokers)):
        groups["brokers"].append(cluster.broker_pid(b) or 0)
    for n in cluster.node_ids:
        groups["leaders" if n in leaders else "followers"].append(cluster.node_pid(n) or 0)
    return groups


async def start_watchers(cluster: LocalCluster, args: argparse.Namespace, prefix: bytes,
                         watchers: int, origin: float, procs: list[Proc]) -> None:
    """``watchers`` spread over ``--procs`` processes (appended to ``procs`` as they
    start), all from one token; returns once every one has seen the marker."""
    endpoint = cluster.endpoint
    token = await start_token(endpoint, prefix, len(cluster.shard_ids))
    horizon_s = args.duration + READY_S + 2 * args.drain + 30
    mp = multiprocessing.get_context("spawn")
    n_procs = min(args.procs, watchers)
    for i in range(n_procs):
        count = watchers // n_procs + (i < watchers % n_procs)
        parent, child = mp.Pipe()
        p = mp.Process(target=watchers_proc, daemon=True, args=(
            child, args.nice, endpoint, prefix, token, count, args.writers, args.lag_every, origin,
            horizon_s))
        p.start()
        procs.append((p, parent))
    async with AsyncKVClient(endpoint, timeout_s=10) as kv:
        waiting = [c for _, c in procs]
        deadline = time.monotonic() + READY_S
        while waiting:  # the marker again until every watcher has seen one
            await kv.put(prefix + HELLO, b"")
            for _ in range(10):
                waiting = [c for c in waiting if not c.poll()]
                await asyncio.sleep(0.02)
            if time.monotonic() > deadline:
                raise TimeoutError("watchers not ready")
    for _, c in procs:
        await recv(c, 1)


async def phase(cluster: LocalCluster, args: argparse.Namespace, index: int,
                watchers: int) -> dict[str, Any]:
    """One phase: start the watchers, write for ``--duration``, collect the reports."""
    prefix = b"fan%d-%d/" % (index, watchers)
    groups = cluster_pids(cluster)
    origin = time.monotonic()
    procs: list[Proc] = []
    try:
        if watchers:
            await start_watchers(cluster, args, prefix, watchers, origin, procs)
        pids = {**groups, "watchers": [p.pid or 0 for p, _ in procs]}
        cpu0 = {g: cpu_s(p) for g, p in pids.items()}
        own0, polls0 = time.process_time(), watch_polls(cluster)
        writes = await write(cluster.endpoint, prefix, args)
        span = writes.end - writes.start
        polls = watch_polls(cluster) - polls0
        cpu = {g: round((cpu_s(p) - cpu0[g]) / span, 2) for g, p in pids.items()}
        cpu["writers"] = round((time.process_time() - own0) / span, 2)
        cpu["cluster"] = round(sum(cpu[g] for g in groups), 2)
        acked = [bytes(0 if math.isnan(t) else 1 for t in a) for a in writes.acks]
        for _, c in procs:
            c.send((acked, args.drain))
        results = [(await recv(c, args.drain + RESULT_S))[1] for _, c in procs]
    finally:
        for p, _ in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    out = summarize(watchers, writes, acked, results, origin, cpu)
    out["polls_s"] = round(polls / span, 1)
    out["events_per_poll"] = round(out["events_in_window"] / polls, 2) if polls else None
    return out


def summarize(watchers: int, writes: Writes, acked: list[bytes],
              results: list[dict[str, Any]], origin: float,
              cpu: dict[str, float]) -> dict[str, Any]:
    span = writes.end - writes.start
    n_acked = sum(sum(a) for a in acked)
    per = [w for r in results for w in r["watchers"]]
    b0, b1 = int((writes.start - origin) / BIN_S), int((writes.end - origin) / BIN_S)
    delivered = sum(sum(r["bins"][b0:b1]) for r in results)
    window_s = (b1 - b0) * BIN_S
    lags = [t - writes.acks[w][s] for r in results for w, s, t in r["samples"]
            if not math.isnan(writes.acks[w][s])]
    return {
        "watchers": watchers, "seconds": round(span, 2), "writes_acked": n_acked,
        "writes_failed": sum(len(a) for a in writes.acks) - n_acked,
        "writes_s": round(n_acked / span, 1),
        "write_p50_ms": quantile_ms(writes.latencies, 0.5),
        "write_p99_ms": quantile_ms(writes.latencies, 0.99),
        "events_in_window": delivered,
        "events_s": round(delivered / window_s, 1) if watchers else None,
        "events_s_per_watcher": round(delivered / window_s / watchers, 1) if watchers else None,
        "events_total": sum(w["events"] for w in per),
        "lag_p50_ms": quantile_ms(lags, 0.5), "lag_p99_ms": quantile_ms(lags, 0.99),
        "lag_samples": len(lags),
        "watchers_complete": sum(1 for w in per if not (w["missing"] or w["duplicates"]
                                                          or w["error"])),
        "missing": sum(w["missing"] for w in per),
        "duplicates": sum(w["duplicates"] for w in per),
        "unacked_delivered": sum(w["unacked_delivered"] for w in per),
        "errors": sorted({w["error"] for w in per if w["error"]}),
        "poll_resends": sum(r["resends"] for r in results),
        "cpu_cores": cpu,
    }


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    counts = [args.watchers] if args.skip_baselines else [0, 1, args.watchers]
    out: dict[str, Any] = {
        "shape": f"{args.shards} shards x {args.replicas} replicas, fsync never",
        "writers": args.writers, "rate": args.rate or "max", "value_size": args.value_size,
        "watcher_nice": args.nice, "watcher_procs": args.procs,
        "load_average": [round(x, 2) for x in os.getloadavg()], "phases": []}
    with tempfile.TemporaryDirectory(prefix="zkv-bench-fanout-") as tmp, LocalCluster(
            Path(tmp) / "data", shards=args.shards, replicas=args.replicas, port=0,
            fsync="never", log_level="WARNING", metrics_port=0) as cluster:
        cluster.wait_ready(60)
        for i, n in enumerate(counts):
            r = asyncio.run(phase(cluster, args, i, n))
            print(f"watch_fanout: {json.dumps(r)}", file=sys.stderr, flush=True)
            out["phases"].append(r)
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    by = {r["watchers"]: r for r in out["phases"]}
    for r in out["phases"]:
        if r["watchers"] and r["polls_s"]:
            r["watcher_cpu_us_per_poll"] = round(
                r["cpu_cores"]["watchers"] / r["polls_s"] * 1e6, 1)
    if 1 in by and args.watchers in by and args.watchers > 1 and by[1]["events_s"]:
        out["events_s_ratio"] = round(by[args.watchers]["events_s"] / by[1]["events_s"], 1)
    if 0 in by and args.watchers in by and by[0]["writes_s"]:
        out["writes_s_ratio"] = round(by[args.watchers]["writes_s"] / by[0]["writes_s"], 3)
    return out


def table(result: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:,}" if isinstance(v, (int, float)) else str(v)

    lines = ["| watchers | writes/s | write p50 / p99 ms | events/s total | events/s per "
             "watcher | polls/s (events per poll) | lag p50 / p99 ms | missing / dup "
             "| CPU cores: broker / leader / followers / watchers |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["phases"]:
        c = r["cpu_cores"]
        lines.append(
            f"| {r['watchers']} | {f(r['writes_s'])} | {f(r['write_p50_ms'])} / "
            f"{f(r['write_p99_ms'])} | {f(r['events_s'])} | {f(r['events_s_per_watcher'])} "
            f"| {f(r['polls_s'])} ({f(r['events_per_poll'])}) | {f(r['lag_p50_ms'])} / "
            f"{f(r['lag_p99_ms'])} | {r['missing']} / {r['duplicates']} | "
            f"{c['brokers']} / {c['leaders']} / {c['followers']} / {c['watchers']} |")
    lines.append("")
    lines.append(f"{result['shape']}; {result['writers']} writers, rate {result['rate']} "
                 f"writes/s, {result['value_size']} B values; watchers in "
                 f"{result['watcher_procs']} processes at nice {result['watcher_nice']}; "
                 f"load average "
                 f"{result['load_average']} before, {result['load_average_after']} after")
    if "events_s_ratio" in result:
        lines.append(f"events/s at {result['phases'][-1]['watchers']} watchers vs 1: "
                     f"{result['events_s_ratio']}x")
    if "writes_s_ratio" in result:
        lines.append(f"writes/s with {result['phases'][-1]['watchers']} watchers vs none: "
                     f"{result['writes_s_ratio']}x")
    for r in result["phases"]:
        if r["errors"] or r["unacked_delivered"] or r["writes_failed"] or r["poll_resends"]:
            lines.append(f"{r['watchers']} watchers: errors {r['errors']}, failed writes "
                         f"{r['writes_failed']}, unacknowledged writes delivered "
                         f"{r['unacked_delivered']}, polls resent {r['poll_resends']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--writers", type=int, default=16)
    p.add_argument("--rate", type=float, default=500.0,
                   help="writes/s in total; 0: as fast as the writers go")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of writes per phase")
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--procs", type=int, default=2, help="processes the watchers share")
    p.add_argument("--nice", type=int, default=10,
                   help="niceness of the watcher processes (0: same as the cluster)")
    p.add_argument("--lag-every", type=int, default=10, help="sample the lag of every Nth write")
    p.add_argument("--drain", type=float, default=30.0,
                   help="seconds a watcher may take to catch up after the writes")
    p.add_argument("--skip-baselines", action="store_true",
                   help="only the --watchers phase (no 0- and 1-watcher runs)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.writers < 1 or args.writers > 999 or args.procs < 1 or args.lag_every < 1:
        p.error("--writers 1..999, --procs and --lag-every >= 1")
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    bad = [r for r in result["phases"] if r["missing"] or r["duplicates"] or r["errors"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
