"""``make bench-failover``: how long a shard stays unwritable after its leader is SIGKILLed.

Starts a local cluster (default 2 shards x 3 replicas, 1 broker, heartbeat 100 ms,
election timeout 700 ms by default, fsync always) on free ports, keeps a background load of writes
on the target shard (``--load-threads`` SDK clients putting in a loop), then runs
``--trials`` times:

1. wait until the cluster has settled: every node heartbeats, every shard has one live
   leader, the target shard's followers have applied what its leader committed;
2. SIGKILL the target shard's leader;
3. from the kill on, a probe sends a fresh ``PutRequest`` for a key of that shard every
   ``--probe-interval-ms`` straight to the broker (no SDK backoff to blur the timing);
   the time from the kill to the first acknowledged probe is the trial's failover time
   (``None`` if nothing was acknowledged within ``--trial-timeout``);
4. restart the killed node on the same data and port.

Reports every trial, p50 / p99 / max (``--json``: one JSON object). Only probes sent
after the kill count, so a reply the old leader had already sent cannot be mistaken for
recovery.

``--no-fault-seconds N`` (0: skip) then runs ``zkv.ops.bench.run_bench`` at full load for
N seconds with no fault and reports how many elections happened meanwhile (the sum over
shards of the term increase seen in the broker's status), and the leader changes. The
target is zero: a healthy, busy cluster must not depose its leaders.

Every phase is bounded in time and every process started is stopped, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq

from zkv.client.sdk import KVClient
from zkv.ops.bench import run_bench
from zkv.ops.cluster import LocalCluster
from zkv.protocol import codec
from zkv.protocol.errors import KVError
from zkv.protocol.messages import PutReply, PutRequest
from zkv.protocol.ring import Ring, RingConfig
from zkv.protocol.timing import ELECTION_TIMEOUT_MS, HEARTBEAT_MS

READY_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 30.0
SETTLE_LAG_ENTRIES_MAX = 64


def _say(line: str) -> None:
    print(f"failover: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- cluster view


def _status(cluster: LocalCluster) -> dict[str, Any] | None:
    with contextlib.suppress(KVError):
        return cluster.status(timeout_s=1.0)
    return None


def live_leaders(status: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Shard -> (leader id, term): the highest-term live node claiming to lead."""
    out: dict[int, tuple[str, int]] = {}
    for n in status["nodes"]:
        if n["role"] == 2 and n.get("live", True):
            sid, term = int(n["shard_id"]), int(n["term"])
            if sid not in out or term > out[sid][1]:
                out[sid] = (str(n["node_id"]), term)
    return out


def max_terms(status: dict[str, Any]) -> dict[int, int]:
    terms: dict[int, int] = {}
    for n in status["nodes"]:
        sid = int(n["shard_id"])
        terms[sid] = max(terms.get(sid, 0), int(n["term"]))
    return terms


def settled(cluster: LocalCluster, status: dict[str, Any], shard: int, target: int) -> bool:
    """Every node heartbeats, every shard has a leader, and every replica of ``shard``
    has applied ``target`` (a commit index seen earlier: under load the commit index
    moves on while we look, so catching up with a fixed point is what counts)."""
    live = [n for n in status["nodes"] if n.get("live", True)
            and n["age_ms"] < 3 * (cluster.heartbeat_ms or 100)]
    if len(live) < len(cluster.node_ids):
        return False
    leaders = live_leaders(status)
    if set(leaders) != set(cluster.shard_ids):
        return False
    group = [n for n in live if int(n["shard_id"]) == shard]
    return all(int(n["applied_index"]) >= target for n in group)


def wait_settled(cluster: LocalCluster, shard: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    target: int | None = None
    while True:
        status = _status(cluster)
        if status is not None and target is None and shard in live_leaders(status):
            group = [n for n in status["nodes"] if int(n["shard_id"]) == shard]
            target = max(int(n["commit_index"]) for n in group) - SETTLE_LAG_ENTRIES_MAX
        if status is not None and target is not None and settled(cluster, status, shard, target):
            return status
        if time.monotonic() >= deadline:
            rows = [] if status is None else [
                (n["node_id"], n.get("role"), n["age_ms"], n["commit_index"], n["applied_index"])
                for n in status["nodes"]
            ]
            raise TimeoutError(f"the cluster did not settle within {timeout_s:g}s: {rows}")
        time.sleep(0.1)


def keys_of_shard(status: dict[str, Any], shard: int, count: int) -> list[bytes]:
    ring_info = status["ring"]
    ring = Ring(RingConfig(int(ring_info["epoch"]), tuple(int(s) for s in ring_info["shards"]),
                           int(ring_info["vnodes"])))
    keys = []
    for i in itertools.count():
        key = f"failover-{i}".encode()
        if ring.shard_for(key) == shard:
            keys.append(key)
            if len(keys) == count:
                return keys
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- load, probe


class BackgroundLoad:
    """``threads`` SDK clients putting to ``keys`` in a loop until ``stop``."""

    def __init__(self, endpoints: list[str], keys: list[bytes], threads: int) -> None:
        self.endpoints, self.keys = endpoints, keys
        self.acked = 0
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> BackgroundLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def _run(self, index: int) -> None:
        with KVClient(self.endpoints, timeout_s=5.0, attempt_timeout_s=0.5) as kv:
            for n in itertools.count():
                if self._stop.is_set():
                    return
                try:
                    kv.put(self.keys[(index + n) % len(self.keys)], f"load-{index}-{n}")
                    ok = True
                except KVError:
                    ok = False
                with self._lock:
                    self.acked += ok
                    self.errors += not ok


def probe_until_acked(endpoint: str, keys: list[bytes], since: float, timeout_s: float,
                      interval_s: float) -> float | None:
    """Send a fresh put every ``interval_s``; seconds from ``since`` to the first ack."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    client_id = os.urandom(16)
    deadline = since + timeout_s
    rid = 0
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            rid += 1
            req = PutRequest(client_id, rid, keys[rid % len(keys)], rid, b"probe")
            sock.send_multipart(codec.encode(req), zmq.NOBLOCK)
            until = min(deadline, now + interval_s)
            while (left := until - time.monotonic()) > 0:
                if not sock.poll(max(1, math.ceil(left * 1000))):
                    break
                reply = codec.decode(sock.recv_multipart())
                if isinstance(reply, PutReply):
                    return time.monotonic() - since
    finally:
        sock.close(linger=0)


# --------------------------------------------------------------------------- phases


def percentile(samples: list[float], q: float) -> float | None:
    data = sorted(samples)
    if not data:
        return None
    rank = max(1, math.ceil(q * len(data) / 100.0 - 1e-9))
    return data[min(rank, len(data)) - 1]


def run_trials(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    shard = args.shard
    status = wait_settled(cluster, shard, SETTLE_TIMEOUT_S)
    keys = keys_of_shard(status, shard, 64)
    trials: list[dict[str, Any]] = []
    with BackgroundLoad(cluster.endpoints, keys, args.load_threads) as load:
        for i in range(args.trials):
            status = wait_settled(cluster, shard, SETTLE_TIMEOUT_S)
            time.sleep(args.settle_s)
            status = wait_settled(cluster, shard, SETTLE_TIMEOUT_S)
            leader, term = live_leaders(status)[shard]
            acked_before = load.acked
            killed_at = time.monotonic()
            cluster.kill_node(leader, signal.SIGKILL)
            took = probe_until_acked(cluster.endpoints[0], keys, killed_at, args.trial_timeout,
                                     args.probe_interval_ms / 1000)
            after = _status(cluster)
            new = live_leaders(after).get(shard) if after else None
            cluster.restart_node(leader)
            trial = {"trial": i + 1, "killed": leader, "term": term,
                     "new_leader": new[0] if new else None, "new_term": new[1] if new else None,
                     "failover_ms": None if took is None else round(took * 1000, 1),
                     "load_acked_during": load.acked - acked_before}
            trials.append(trial)
            shown = "TIMEOUT" if took is None else f"{took * 1000:.0f} ms"
            _say(f"trial {i + 1}/{args.trials}: killed {leader} (term {term}) -> first ack "
                 f"after {shown}; new leader {trial['new_leader']} (term {trial['new_term']})")
        load_summary = {"acked": load.acked, "errors": load.errors}
    samples = [t["failover_ms"] for t in trials if t["failover_ms"] is not None]
    return {
        "trials": trials,
        "timeouts": sum(1 for t in trials if t["failover_ms"] is None),
        "p50_ms": percentile(samples, 50),
        "p99_ms": percentile(samples, 99),
        "max_ms": max(samples) if samples else None,
        "mean_ms": round(sum(samples) / len(samples), 1) if samples else None,
        "background_load": load_summary,
    }


def run_no_fault(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    before_status = wait_settled(cluster, args.shard, SETTLE_TIMEOUT_S)
    before, leaders_before = max_terms(before_status), live_leaders(before_status)
    _say(f"no-fault load for {args.no_fault_seconds:g}s; terms {before}")
    result = run_bench(cluster.endpoints[0], concurrency=args.concurrency,
                       duration_s=args.no_fault_seconds, warmup_s=1.0, read_ratio=0.5,
                       progress=lambda e, ok, err: _say(f"[{e:5.1f}s] ok {ok:,} errors {err:,}"))
    after_status = wait_settled(cluster, args.shard, SETTLE_TIMEOUT_S)
    after, leaders_after = max_terms(after_status), live_leaders(after_status)
    elections = sum(after.get(s, 0) - before.get(s, 0) for s in after)
    changes = sum(1 for s in leaders_after if leaders_after[s][0] != leaders_before.get(s, ("",))[0])
    return {"seconds": args.no_fault_seconds, "terms_before": before, "terms_after": after,
            "elections": elections, "leader_changes": changes, "ops_s": round(result.ops_s),
            "errors": result.errors}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"cluster: {report['cluster']}"]
    tr = report.get("failover")
    if tr is not None:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f} ms"
        lines.append(f"failover after SIGKILL of the shard leader, {len(tr['trials'])} trials: "
                     f"p50 {ms(tr['p50_ms'])}, p99 {ms(tr['p99_ms'])}, max {ms(tr['max_ms'])}, "
                     f"mean {ms(tr['mean_ms'])}, timeouts {tr['timeouts']}")
        lines.append("  per trial (ms): " + ", ".join(
            "timeout" if t["failover_ms"] is None else f"{t['failover_ms']:.0f}"
            for t in tr["trials"]))
    nf = report.get("no_fault")
    if nf is not None:
        lines.append(f"no fault, {nf['seconds']:g}s of full load ({nf['ops_s']:,} ops/s): "
                     f"{nf['elections']} election(s), {nf['leader_changes']} leader change(s) "
                     f"(terms {nf['terms_before']} -> {nf['terms_after']}; target 0)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--trial-timeout", type=float, default=10.0, help="seconds per trial")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--shard", type=int, default=0, help="the shard whose leader is killed")
    p.add_argument("--heartbeat-ms", type=int, default=HEARTBEAT_MS)
    p.add_argument("--election-timeout-ms", type=int, default=ELECTION_TIMEOUT_MS)
    p.add_argument("--fsync", default="always")
    p.add_argument("--load-threads", type=int, default=4, help="background writers")
    p.add_argument("--probe-interval-ms", type=float, default=10.0)
    p.add_argument("--settle-s", type=float, default=1.0, help="pause before each kill")
    p.add_argument("--no-fault-seconds", type=float, default=0.0,
                   help="then run full load this long with no fault and count elections")
    p.add_argument("--concurrency", type=int, default=64, help="no-fault load window")
    p.add_argument("--data-dir", default=None, help="default: a temporary directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.trials < 0 or args.trial_timeout <= 0 or args.no_fault_seconds < 0:
        p.error("--trials and --no-fault-seconds must be >= 0, --trial-timeout > 0")
    if not 0 <= args.shard < args.shards:
        p.error("--shard must name one of the shards")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        data_dir = args.data_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="zkv-failover-"))
        cluster = stack.enter_context(LocalCluster(
            Path(data_dir) / "cluster", shards=args.shards, replicas=args.replicas, brokers=1,
            port=0, fsync=args.fsync, heartbeat_ms=args.heartbeat_ms,
            election_timeout_ms=args.election_timeout_ms, log_level="INFO"))
        _say(f"cluster starting in {data_dir} on {cluster.endpoint}")
        cluster.wait_ready(READY_TIMEOUT_S, progress=lambda s: _say(f"waiting: {s}"))
        report: dict[str, Any] = {"cluster": {
            "shards": args.shards, "replicas": args.replicas, "heartbeat_ms": args.heartbeat_ms,
            "election_timeout_ms": args.election_timeout_ms, "fsync": args.fsync}}
        if args.trials:
            report["failover"] = run_trials(cluster, args)
        if args.no_fault_seconds:
            report["no_fault"] = run_no_fault(cluster, args)
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
