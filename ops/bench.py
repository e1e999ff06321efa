"""``zkv bench``: a cheap pipelined zmq load generator, and its statistics.

Theory of operation: a few DEALER sockets in one thread (per process), each with a
window of outstanding requests; every reply immediately triggers the next request on
the same socket, so ``concurrency`` requests stay in flight. Requests are built by a
``RequestCodec`` straight into msgpack frames (the exact bytes ``zkv.protocol.codec.encode``
produces, checked by a unit test) and replies are parsed just enough to learn
``(request_id, error_code)``: the generator must cost far less than the server.

The run is ``warmup_s`` (replies not recorded) then ``duration_s`` (recorded), then the
sockets are closed with linger 0: every run stops by itself. A request unanswered for
``request_timeout_s`` counts as a ``TIMEOUT`` error and its window slot is refilled.
``processes > 1`` spreads the windows over spawned processes and merges their samples.

Several brokers (``A,B``, as ``zkv cluster up --brokers 2`` prints it, or a list): each
socket connects to one broker, round robin, with at least one socket per broker, so the
load is spread over them; every broker is pinged first.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import queue
import random
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zkv.protocol.codec import INLINE_BLOB_BYTES_MAX
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    PROTOCOL_VERSION,
    Consistency,
    ErrorReply,
    GetRequest,
    PutRequest,
)
from zkv.protocol.security import Curve

OP_GET = 0
OP_PUT = 1
OP_NAMES = ("get", "put")
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
REQUEST_TIMEOUT_S = 2.0
EXPIRY_SCAN_S = 0.1
PROGRESS_TICK_S = 0.25


# --------------------------------------------------------------------------- statistics


def percentile(sorted_samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted samples (None when empty)."""
    n = len(sorted_samples)
    if n == 0:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError("q must be within [0, 100]")
    # The epsilon keeps float noise (99.9 / 100 * 1000 = 999.0000000000001) off the rank.
    rank = max(1, math.ceil(q * n / 100.0 - 1e-9))
    return sorted_samples[min(rank, n) - 1]


def summarize(samples_us: Sequence[int], qs: Sequence[float] = PERCENTILES) -> dict[str, Any]:
    """Count, mean, max and the percentiles ``qs`` of latencies in µs, reported in ms."""
    data = sorted(samples_us)
    out: dict[str, Any] = {"count": len(data)}
    for q in qs:
        p = percentile(data, q)
        out[f"p{q:g}"] = None if p is None else p / 1000.0
    out["mean"] = (sum(data) / len(data) / 1000.0) if data else None
    out["max"] = (data[-1] / 1000.0) if data else None
    return out


@dataclass
class BenchResult:
    endpoint: str
    concurrency: int
    processes: int
    duration_s: float
    value_size: int
    read_ratio: float
    consistency: str
    ops: int
    ops_s: float
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"endpoint {self.endpoint}  concurrency {self.concurrency}  processes "
            f"{self.processes}  value {self.value_size} B  reads {self.read_ratio:.0%}  "
            f"consistency {self.consistency}",
            f"throughput: {self.ops_s:,.0f} ops/s ({self.ops:,} ops in {self.duration_s:.1f}s)",
            f"{'latency ms':<12}{'count':>10}" + "".join(f"{'p' + f'{q:g}':>10}" for q in PERCENTILES)
            + f"{'max':>10}",
        ]
        for name, s in self.latency_ms.items():
            cells = "".join(_ms(s.get(f"p{q:g}")) for q in PERCENTILES)
            lines.append(f"{name:<12}{s['count']:>10}{cells}{_ms(s.get('max'))}")
        if self.errors:
            errs = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()))
            lines.append(f"errors: {errs}")
        else:
            lines.append("errors: none")
        return "\n".join(lines)


def _ms(v: float | None) -> str:
    return f"{'-':>10}" if v is None else f"{v:>10.3f}"


# --------------------------------------------------------------------------- wire


class RequestCodec:
    """zkv framing, built without dataclasses: the bytes ``zkv.protocol.codec`` would send."""

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack

    def get(self, client_id: bytes, rid: int, key: bytes, consistency: int) -> list[bytes]:
        return [self._pack([PROTOCOL_VERSION, GetRequest.TYPE, client_id, rid, key,
                            consistency])]

    def put(self, client_id: bytes, rid: int, key: bytes, lowest: int,
            value: bytes) -> list[bytes]:
        if len(value) <= INLINE_BLOB_BYTES_MAX:  # small values ride in the header
            return [self._pack([PROTOCOL_VERSION, PutRequest.TYPE, client_id, rid, key, lowest,
                                value])]
        return [self._pack([PROTOCOL_VERSION, PutRequest.TYPE, client_id, rid, key, lowest]),
                value]

    def parse_reply(self, frames: list[bytes]) -> tuple[int, int]:
        """``(request_id, error_code or 0)``; ``(-1, 0)`` for frames we cannot read."""
        try:
            head = msgpack.unpackb(frames[0], raw=False)
            rid = head[2]
            code = head[3] if head[1] == ErrorReply.TYPE else 0
        except Exception:
            return -1, 0
        return (rid, code) if type(rid) is int else (-1, 0)


@dataclass(frozen=True)
class Workload:
    keys: int = 10_000
    value_size: int = 100
    read_ratio: float = 0.5
    consistency: int = int(Consistency.LINEARIZABLE)
    key_prefix: str = "bench-"


# --------------------------------------------------------------------------- generator


class _Window:
    """One DEALER socket and the requests outstanding on it (rid -> (t0, op), oldest first)."""

    __slots__ = ("sock", "client_id", "next_rid", "outstanding", "size")

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, size: int,
                 curve: Curve | None = None) -> None:
        # One endpoint per socket: a DEALER connected to several would queue requests
        # for a broker that is not (yet) connected instead of the live ones.
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        if curve is not None:
            curve.broker_client(self.sock, endpoint)
        self.sock.connect(endpoint)
        self.client_id = os.urandom(16)
        self.next_rid = 1
        self.outstanding: dict[int, tuple[float, int]] = {}
        self.size = size


def spread(endpoints: Sequence[str], concurrency: int, sockets: int = 0) -> list[tuple[str, int]]:
    """``(endpoint, window size)`` per socket: ``sockets`` sockets (0: one per 16
    requests, 1..16), at least one per broker while ``concurrency`` allows, brokers
    assigned round robin and the window sizes differing by at most one."""
    n_socks = sockets or max(1, min(16, concurrency // 16))
    n_socks = min(max(n_socks, len(endpoints)), concurrency)
    return [(endpoints[i % len(endpoints)],
             concurrency // n_socks + (1 if i < concurrency % n_socks else 0))
            for i in range(n_socks)]


def _generate(
    endpoints: Sequence[str],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    workload: Workload,
    *,
    sockets: int = 0,
    seed: int | None = None,
    codec: RequestCodec | None = None,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    tick: Callable[[int, int], None] | None = None,
    key_dir: str | None = None,
) -> dict[str, Any]:
    """Drive the load; return raw samples ``{"lat": [array per op], "errors": {...}, "ops"}``."""
    codec = codec or RequestCodec()
    rng = random.Random(seed)
    keys = [f"{workload.key_prefix}{i:08d}".encode() for i in range(workload.keys)]
    value = rng.randbytes(workload.value_size)
    ctx: zmq.Context[Any] = zmq.Context()
    curve = None if key_dir is None else Curve.for_identity(Path(key_dir))
    windows: list[_Window] = []
    try:
        for endpoint, size in spread(endpoints, concurrency, sockets):
            windows.append(_Window(ctx, endpoint, size, curve))
    except BaseException:
        for w in windows:
            w.sock.close(linger=0)
        ctx.term()
        raise
    by_sock = {w.sock: w for w in windows}
    poller = zmq.Poller()
    for w in windows:
        poller.register(w.sock, zmq.POLLIN)
    lat: list[array[int]] = [array("q"), array("q")]
    errors: dict[str, int] = {}
    read_ratio, consistency = workload.read_ratio, workload.consistency
    n_keys = len(keys)
    perf = time.perf_counter
    ok = 0
    err = 0

    def send(w: _Window, now: float) -> None:
        rid = w.next_rid
        w.next_rid = rid + 1
        key = keys[rng.randrange(n_keys)]
        if rng.random() < read_ratio:
            frames = codec.get(w.client_id, rid, key, consistency)
            op = OP_GET
        else:
            low = next(iter(w.outstanding), rid)
            frames = codec.put(w.client_id, rid, key, low, value)
            op = OP_PUT
        w.outstanding[rid] = (now, op)
        w.sock.send_multipart(frames, copy=False) if len(frames[-1]) > 65536 else \
            w.sock.send_multipart(frames)

    start = perf()
    measure_from = start + warmup_s
    end = measure_from + duration_s
    try:
        for w in windows:
            for _ in range(w.size):
                send(w, perf())
        next_scan = next_tick = start
        now = start
        while now < end:
            timeout_ms = max(0, min(100, int((end - now) * 1000) + 1))
            for sock, _ in poller.poll(timeout_ms):
                w = by_sock[sock]
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    rid, code = codec.parse_reply(frames)
                    entry = w.outstanding.pop(rid, None)
                    if entry is None:
                        continue  # stale (already expired) or unreadable
                    now = perf()
                    if now >= end:
                        break
                    if now >= measure_from:
                        if code:
                            err += 1
                            name = _code_name(code)
                            errors[name] = errors.get(name, 0) + 1
                        else:
                            ok += 1
                            lat[entry[1]].append(int((now - entry[0]) * 1e6))
                    send(w, now)
            now = perf()
            if now >= next_scan:
                next_scan = now + EXPIRY_SCAN_S
                expired = _expire(windows, now - request_timeout_s)
                if expired and now >= measure_from:
                    err += expired
                    errors["TIMEOUT(client)"] = errors.get("TIMEOUT(client)", 0) + expired
                for w in windows:
                    while len(w.outstanding) < w.size:
                        send(w, now)
            if tick is not None and now >= next_tick:
                next_tick = now + PROGRESS_TICK_S
                tick(ok, err)
    finally:
        for w in windows:
            w.sock.close(linger=0)
        ctx.term()
    if tick is not None:
        tick(ok, err)
    return {"lat": lat, "errors": errors, "ops": ok, "elapsed_s": min(perf(), end) - measure_from}


def _expire(windows: list[_Window], cutoff: float) -> int:
    """Forget requests sent before ``cutoff`` (oldest first); return how many."""
    n = 0
    for w in windows:
        out = w.outstanding
        while out:
            rid = next(iter(out))
            if out[rid][0] >= cutoff:
                break
            del out[rid]
            n += 1
    return n


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"CODE_{code}"


# --------------------------------------------------------------------------- processes


def _child(args: tuple[Any, ...], counters: Any, index: int, results: Any) -> None:
    endpoints, concurrency, duration_s, warmup_s, workload, sockets, seed, codec, key_dir = args

    def tick(ok: int, err: int) -> None:
        counters[2 * index] = ok
        counters[2 * index + 1] = err

    raw = _generate(endpoints, concurrency, duration_s, warmup_s, workload, sockets=sockets,
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
        raws = [_generate(endpoints, concurrency, duration_s, warmup_s, workload,
                          sockets=sockets, seed=seed, codec=codec,
                          tick=_progress_ticker(progress), key_dir=key_dir)]
    else:
        args = (endpoints, concurrency, duration_s, warmup_s, workload, sockets, seed, codec,
                key_dir)
        raws = _run_processes(processes, args, concurrency, warmup_s + duration_s + 30, progress)
    return _merge(raws, ",".join(endpoints), concurrency, processes, duration_s, workload,
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


def _merge(raws: list[dict[str, Any]], endpoint: str, concurrency: int, processes: int,
           duration_s: float, workload: Workload, level: Consistency) -> BenchResult:
    per_op: list[array[int]] = [array("q"), array("q")]
    errors: dict[str, int] = {}
    ops = 0
    elapsed = max([r["elapsed_s"] for r in raws] or [duration_s]) or duration_s
    for raw in raws:
        ops += raw["ops"]
        for op, a in enumerate(raw["lat"]):
            per_op[op].extend(a)
        for name, n in raw["errors"].items():
            errors[name] = errors.get(name, 0) + n
    everything = per_op[OP_GET] + per_op[OP_PUT]
    latency = {"all": summarize(everything)}
    for op, name in enumerate(OP_NAMES):
        if per_op[op]:
            latency[name] = summarize(per_op[op])
    return BenchResult(
        endpoint=endpoint, concurrency=concurrency, processes=processes,
        duration_s=round(elapsed, 3), value_size=workload.value_size,
        read_ratio=workload.read_ratio, consistency=level.name.lower(), ops=ops,
        ops_s=ops / elapsed if elapsed > 0 else 0.0, errors=errors, latency_ms=latency,
    )


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
