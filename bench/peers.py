"""``make bench-peers``: zkv against PySyncObj on PySyncObj's own benchmark method.

The method (PySyncObj's ``benchmarks/``, reimplemented here, none of their code): three
nodes; every node (for zkv: one client process per node, through the broker) submits a
fixed number of 100 B writes at the start of every second for 25 s after a 4 s settle,
then waits 4 s for the last answers; a run passes when the mean share of writes that
succeeded is >= 90%. The total rate (all three submitters) is bisected between ``--low``
and ``--high`` for ``--steps`` runs, each on fresh processes and a fresh data dir; the
result is the highest passing rate. zkv runs 1 shard x 3 replicas, fsync never, one
broker (``LocalCluster``, as ``zkv cluster up`` starts it). PySyncObj runs from the
interpreter given by ``--peers-python`` (``make bench-peers`` builds ``.venv-peers`` with
``pysyncobj`` from PyPI; it is never a zkv dependency) with ``bench/peers_pso.py``.

zkv's submitter spreads a second's burst over several DEALER sockets (client ids): the
broker bounds each client's queue at 1,000 messages, and a burst of thousands on one
socket would be dropped by design; PySyncObj's submitter is the node itself.

    python -m bench.peers --peers-python .venv-peers/bin/python [--steps 5] [--json]

Every run is bounded in time (about 35 s) and stops its processes, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from zkv.ops.bench import RequestCodec
from zkv.ops.cluster import LocalCluster, free_port
from zkv.protocol.errors import ErrorCode

NODES = 3
VALUE_BYTES = 100
KEY_SPACE = 100_000
SETTLE_S = 4.0
DURATION_S = 25.0
DRAIN_S = 4.0
PASS_SHARE = 0.9
RUN_TIMEOUT_S = 120.0
#: Requests per socket per second's burst: well under the broker's per-client queue bound.
BURST_PER_SOCKET_MAX = 250
PSO_HARNESS = Path(__file__).resolve().parent / "peers_pso.py"


def _say(line: str) -> None:
    print(f"peers: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- zkv submitter


def zkv_submit(endpoint: str, rate: int, value_bytes: int = VALUE_BYTES,
               duration_s: float = DURATION_S, drain_s: float = DRAIN_S) -> dict[str, Any]:
    """Submit ``rate`` puts at the start of every second for ``duration_s``; count the
    acknowledged ones until ``drain_s`` after the last second. Requests are never
    retried, so each declares itself its client's lowest pending one."""
    codec = RequestCodec()
    rng = random.Random()
    ctx: zmq.Context[Any] = zmq.Context()
    socks = []
    for _ in range(max(4, math.ceil(rate / BURST_PER_SOCKET_MAX))):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.connect(endpoint)
        socks.append((s, os.urandom(16)))
    poller = zmq.Poller()
    for s, _ in socks:
        poller.register(s, zmq.POLLIN)
    counts = {"ok": 0, "err": 0}
    codes: dict[int, int] = {}

    def drain(timeout_ms: int) -> None:
        for sock, _ in poller.poll(timeout_ms):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)  # type: ignore[union-attr]
                except zmq.Again:
                    break
                code = codec.parse_reply(frames)[1]
                if code:
                    counts["err"] += 1
                    codes[code] = codes.get(code, 0) + 1
                else:
                    counts["ok"] += 1

    sent, overran, rid = 0, False, 0
    n_socks = len(socks)
    try:
        start = time.monotonic()
        while time.monotonic() - start < duration_s:
            t0 = time.monotonic()
            for i in range(rate):
                rid += 1
                sock, cid = socks[i % n_socks]
                key = b"k%015d" % rng.randrange(KEY_SPACE)
                try:
                    sock.send_multipart(codec.put(cid, rid, key, rid, rng.randbytes(value_bytes)),
                                        zmq.NOBLOCK)
                except zmq.Again:
                    counts["err"] += 1
                sent += 1
                if i % 256 == 255:
                    drain(0)
            if time.monotonic() - t0 > 1.0:
                overran = True
                break
            while (left := t0 + 1.0 - time.monotonic()) > 0:
                drain(max(1, int(left * 1000)))
        end = time.monotonic() + drain_s
        while (left := end - time.monotonic()) > 0:
            drain(max(1, int(left * 1000)))
    finally:
        for s, _ in socks:
            s.close(linger=0)
        ctx.term()
    success = 0.0 if overran or not sent else counts["ok"] / sent
    return {"sent": sent, **counts, "overran": overran, "success": success,
            "codes": {_code_name(c): n for c, n in codes.items()}}


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


# --------------------------------------------------------------------------- one run each


def _collect(procs: list[subprocess.Popen[str]], deadline: float) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            out.append({"success": 0.0, "error": "timeout"})
            continue
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        out.append(json.loads(lines[-1]) if lines else {"success": 0.0, "error": "no result"})
    return out


def _verdict(name: str, rate: int, results: list[dict[str, Any]]) -> bool:
    mean = sum(r["success"] for r in results) / len(results)
    _say(f"{name} at {rate}/s: success {mean:.3f} "
         + " ".join(f"[{r.get('ok', 0)}/{r.get('sent', 0)}"
                    + (" overran" if r.get("overran") else "")
                    + "".join(f" {k}:{v}" for k, v in r.get("codes", {}).items()) + "]"
                    for r in results))
    return mean >= PASS_SHARE


def run_pysyncobj(python: str, rate: int) -> bool:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(NODES)]
    procs = []
    try:
        for i in range(NODES):
            others = [a for j, a in enumerate(addrs) if j != i]
            procs.append(subprocess.Popen(
                [python, str(PSO_HARNESS), str(rate // NODES), str(VALUE_BYTES), addrs[i], *others],
                stdout=subprocess.PIPE, text=True))
        results = _collect(procs, time.monotonic() + RUN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return _verdict("pysyncobj", rate, results)


def run_zkv(rate: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="zkv-peers-") as tmp, LocalCluster(
        tmp, shards=1, replicas=NODES, port=0, fsync="never", log_level="WARNING"
    ) as cluster:
        cluster.wait_ready(timeout=30.0)
        time.sleep(SETTLE_S)
        procs = [subprocess.Popen(
            [sys.executable, "-m", "bench.peers", "--zkv-submit", cluster.endpoints[0],
             "--rate", str(rate // NODES)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
            for _ in range(NODES)]
        try:
            results = _collect(procs, time.monotonic() + RUN_TIMEOUT_S)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return _verdict("zkv", rate, results)


def bisect(run: Callable[[int], bool], low: int, high: int, steps: int) -> int:
    """The highest passing rate found in ``steps`` runs between ``low`` and ``high``,
    as PySyncObj's harness bisects; ``low`` is run only if nothing above it passed
    (0 if it fails too)."""
    a, b = low, high
    for _ in range(steps):
        c = (a + b) // 2
        if run(c):
            a = c
        else:
            b = c
    if a == low and not run(low):
        return 0
    return a


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers-python", default=".venv-peers/bin/python")
    p.add_argument("--low", type=int, default=3_000, help="total writes/s assumed to pass")
    p.add_argument("--high", type=int, default=43_000, help="total writes/s assumed to fail")
    p.add_argument("--steps", type=int, default=5, help="bisection runs per system (~35 s each)")
    p.add_argument("--only", choices=("zkv", "pysyncobj"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--zkv-submit", metavar="ENDPOINT", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.zkv_submit:
        print(json.dumps(zkv_submit(args.zkv_submit, args.rate)), flush=True)
        return 0
    t0 = time.monotonic()
    best: dict[str, int] = {}
    if args.only != "zkv":
        best["pysyncobj"] = bisect(lambda r: run_pysyncobj(args.peers_python, r),
                                   args.low, args.high, args.steps)
    if args.only != "pysyncobj":
        best["zkv"] = bisect(run_zkv, args.low, args.high, args.steps)
    ratio = best["zkv"] / best["pysyncobj"] if len(best) == 2 and best["pysyncobj"] else None
    if args.json:
        print(json.dumps({"best_rate": best, "ratio": ratio, "elapsed_s": time.monotonic() - t0}))
    else:
        print(f"{'system':<12} {'highest passing writes/s':>26}")
        for name, rate in best.items():
            print(f"{name:<12} {rate:>26,}")
        if ratio is not None:
            print(f"ratio zkv / pysyncobj: {ratio:.2f} (target >= 1.3); "
                  f"resolution {(args.high - args.low) / 2**args.steps:,.0f}/s; "
                  f"{time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
