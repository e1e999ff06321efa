"""``zkv bench`` and ``run_bench``: a bounded load test against zkv brokers.

``run_bench`` pings every broker, then drives the load generator
(``ops/bench_load.py``: pipelined DEALER windows, the theory of operation is there) for
``warmup_s`` + ``duration_s`` and merges the samples into a ``BenchResult``
(``ops/bench_stats.py``). ``processes > 1`` spreads the windows over spawned processes,
each starting on another broker, and merges their samples; a process that does not
report by the deadline fails the run.

Several brokers (``A,B``, as ``zkv cluster up --brokers 2`` prints it, or a list): each
socket connects to one broker, round robin, with at least one socket per broker, so the
load is spread over them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from zkv.ops.bench_load import (
    OP_GET,
    OP_NAMES,
    OP_PUT,
    REQUEST_TIMEOUT_S,
    RequestCodec,
    Workload,
    generate,
    spread,
)
from zkv.ops.bench_stats import PERCENTILES, BenchResult, merge, percentile, summarize
from zkv.protocol.messages import Consistency

__all__ = [
    "OP_GET", "OP_NAMES", "OP_PUT", "PERCENTILES", "REQUEST_TIMEOUT_S", "BenchResult",
    "RequestCodec", "Workload", "add_arguments", "percentile", "run_bench", "run_cli",
    "spread", "summarize",
]


# --------------------------------------------------------------------------- processes


def _child(args: tuple[Any, ...], counters: Any, index: int, results: Any) -> None:
    endpoints, concurrency, duration_s, warmup_s, workload, sockets, seed, codec, key_dir = args

    def tick(ok: int, err: int) -> None:
        counters[2 * index] = ok
        counters[2 * index + 1] = err

    raw = generate(endpoints, concurrency, duration_s, warmup_s, workload, sockets=sockets,
                   seed=seed, codec=codec, tick=tick, key_dir=key_dir)
    raw["lat"] = [a.tobytes() for a in raw["lat"]]
    results.put(raw)


def _run_processes(
    processes: int, args: tuple[Any, ...], concurrency: int, deadline_s: float,
    progress: Callable[[float, int, int], None] | None,
) -> list[dict[str, Any]]:
    mp = multiprocessing.get_context("spawn")
    counters = mp.Array("q", 2 * processes, lock=False)
    results = mp.Queue()
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0)
              for i in range(processes)]
    procs = []
    endpoints = list(args[0])
    for i, share in enumerate(shares):
        first = i % len(endpoints)  # each process starts on another broker
        child_args = (endpoints[first:] + endpoints[:first], share, *args[2:6],
                      None if args[6] is None else args[6] + i, *args[7:])
        procs.append(mp.Process(target=_child, args=(child_args, counters, i, results),
                                daemon=True))
    for p in procs:
        p.start()
    start = time.monotonic()
    raws: list[dict[str, Any]] = []
    next_print = start + 1.0
    try:
        while len(raws) < processes and time.monotonic() < start + deadline_s:
            try:
                raws.append(results.get(timeout=0.1))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # every child ended; what they sent is already in `raws`
            if progress is not None and time.monotonic() >= next_print:
                next_print += 1.0
                progress(time.monotonic() - start, sum(counters[0::2]), sum(counters[1::2]))
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
    if len(raws) < processes:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"{processes - len(raws)} generator process(es) failed "
                           f"(exit codes {codes})")
    for raw in raws:
        raw["lat"] = [_array_from(b) for b in raw["lat"]]
    return raws


def _array_from(data: bytes) -> array[int]:
    a = array("q")
    a.frombytes(data)
    return a


# --------------------------------------------------------------------------- API


def run_bench(
    endpoint: str | Sequence[str],
    *,
    concurrency: int = 64,
    duration_s: float = 10.0,
    keys: int = 10_000,
    value_size: int = 100,
    read_ratio: float = 0.5,
    consistency: Consistency | int = Consistency.LINEARIZABLE,
    warmup_s: float = 1.0,
    processes: int = 1,
    sockets: int = 0,
    seed: int | None = None,
    codec: RequestCodec | None = None,
    check: bool = True,
    progress: Callable[[float, int, int], None] | None = None,
    key_dir: str | None = None,
) -> BenchResult:
    """Run a bounded load test against ``endpoint`` (zkv brokers: one, a comma-separated
    string or a list) and summarize it.

    ``progress(elapsed_s, ok, errors)`` is called about once per second. ``check`` pings
    every broker first so a dead one fails fast instead of timing out for a whole run.
    """
    from zkv.client.sdk import KVClient, parse_endpoints

    endpoints = parse_endpoints(endpoint)
    if concurrency < 1 or duration_s <= 0 or keys < 1 or not 0.0 <= read_ratio <= 1.0:
        raise ValueError("need concurrency >= 1, duration > 0, keys >= 1, 0 <= read_ratio <= 1")
    if check:
        for one in endpoints:
            with KVClient(one, timeout_s=3.0, keys=key_dir) as kv:
                kv.ping()
    level = Consistency(consistency)
    workload = Workload(keys, value_size, read_ratio, int(level))
    processes = max(1, min(processes, concurrency))
    if processes == 1:
        raws = [generate(endpoints, concurrency, duration_s, warmup_s, workload,
                         sockets=sockets, seed=seed, codec=codec,
                         tick=_progress_ticker(progress), key_dir=key_dir)]
    else:
        args = (endpoints, concurrency, duration_s, warmup_s, workload, sockets, seed, codec,
                key_dir)
        raws = _run_processes(processes, args, concurrency, warmup_s + duration_s + 30, progress)
    return merge(raws, ",".join(endpoints), concurrency, processes, duration_s, workload,
                 level)


def _progress_ticker(
    progress: Callable[[float, int, int], None] | None,
) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    start = time.monotonic()
    state = {"next": start + 1.0}

    def tick(ok: int, err: int) -> None:
        now = time.monotonic()
        if now >= state["next"]:
            state["next"] += 1.0
            progress(now - start, ok, err)

    return tick


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=64, help="requests kept in flight")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds first")
    p.add_argument("--keys", type=int, default=10_000, help="distinct keys (uniform)")
    p.add_argument("--value-size", type=int, default=100, help="bytes per value")
    p.add_argument("--read-ratio", type=float, default=0.5, help="fraction of gets")
    p.add_argument("--consistency", choices=["linearizable", "leader", "stale"],
                   default="linearizable")
    p.add_argument("--processes", type=int, default=1, help="generator processes")
    p.add_argument("--sockets", type=int, default=0, help="DEALER sockets per process")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_cli(args: argparse.Namespace, endpoint: str) -> int:
    def progress(elapsed: float, ok: int, err: int) -> None:
        rate = ok / max(elapsed - args.warmup, 1e-9) if elapsed > args.warmup else 0.0
        phase = "warmup" if elapsed <= args.warmup else f"{rate:,.0f} ops/s"
        print(f"[{elapsed:5.1f}s] {phase}  ok {ok:,}  errors {err:,}", file=sys.stderr,
              flush=True)

    result = run_bench(
        endpoint, concurrency=args.concurrency, duration_s=args.duration, keys=args.keys,
        value_size=args.value_size, read_ratio=args.read_ratio,
        consistency=Consistency[args.consistency.upper()], warmup_s=args.warmup,
        processes=args.processes, sockets=args.sockets, seed=args.seed, progress=progress,
        key_dir=getattr(args, "keys_dir", None),
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.format())
    return 0
