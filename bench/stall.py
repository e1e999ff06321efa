"""No stalls (issue 14, target 6): load 1,000,000 keys into 1 x 3 at full speed.

A ``LocalCluster`` of 1 shard x 3 replicas (fsync never: the disk is not what is
measured) is loaded with ``--keys`` distinct keys (16 B keys, 100 B values) through
pipelines of 1,000 single puts (a log entry each), as fast as it takes them, while a prober reads one key every
10 ms through the same broker. Snapshots fall due every 50,000 entries or 64 MiB, as by
default. Reported per snapshot mode (``--snapshot-mode``; ``inline`` serializes in the
node's loop, ``fork`` in a forked child), alternating when both are asked for:

- elections: how much the shard's term grew during the load (a leader whose loop
  stops for longer than an election timeout loses its shard);
- snapshots taken by the leader, and the longest time its loop stood still for one
  (``inline``: the log's snapshot time; ``fork``: the fork itself);
- the prober's slowest read, which a loop that stands still shows from outside.

``--install`` adds one more run: a follower is SIGKILLed before the load and restarted
after it, so it catches up by installing the leader's newest snapshot (the whole data
set); reported are the install's size, how long the follower took to catch up, the
longest turn its loop logged as standing still (``the loop stood still``: every turn
longer than one heartbeat interval is logged; 0 when none was), and the leader's
logged stalls over the whole run (the load included).

    python -m bench.stall [--keys 1000000] [--modes fork,inline] [--install] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from zkv.client.sdk import KVClient
from zkv.ops.cluster import LocalCluster

BATCH = 1000
PROBE_EVERY_S = 0.01
SNAPSHOT_LOG_RE = re.compile(r"snapshot at index (\d+) \((\d+) bytes, (\d+) ms")
FORK_LOG_RE = re.compile(r"forked in (\d+(?:\.\d+)?) ms")
STALL_LOG_RE = re.compile(r"the loop stood still for (\d+) ms")
INSTALL_LOG_RE = re.compile(r"installed snapshot at index (\d+)")


def _term(kv: KVClient) -> int:
    return max(int(n.get("term", 0)) for n in kv.status()["nodes"])


def _prober(endpoint: str, stop: threading.Event, worst: list[float]) -> None:
    with KVClient(endpoint, timeout_s=10) as kv:
        kv.put("probe", "x")
        while not stop.is_set():
            t = time.perf_counter()
            kv.get("probe")
            worst[0] = max(worst[0], time.perf_counter() - t)
            time.sleep(PROBE_EVERY_S)


def _load(kv: KVClient, keys: int) -> float:
    """Put ``keys`` keys through pipelines of single puts; the seconds it took."""
    started = time.perf_counter()
    value = b"v" * 100
    for first in range(0, keys, BATCH):
        with kv.pipeline() as pipe:  # single puts: one log entry each
            for i in range(first, min(keys, first + BATCH)):
                pipe.put(b"key-%012d" % i, value)
    return time.perf_counter() - started


def run_install(keys: int, timeout_s: float = 300.0) -> dict[str, Any]:
    """A follower down for the whole load comes back and installs the leader's snapshot."""
    with tempfile.TemporaryDirectory(prefix="zkv-stall-install-") as tmp:
        cluster = LocalCluster(Path(tmp) / "data", shards=1, replicas=3, port=0,
                               fsync="never")
        with cluster:
            cluster.wait_ready(60)
            leader = cluster.leader_of(0)
            follower = next(n for n in cluster.node_ids if n != leader)
            with KVClient(cluster.endpoint, timeout_s=30) as kv:
                cluster.kill_node(follower)
                took = _load(kv, keys)
                term0 = _term(kv)
                stop, worst = threading.Event(), [0.0]
                probe = threading.Thread(target=_prober, args=(cluster.endpoint, stop, worst),
                                         daemon=True)
                probe.start()
                cluster.restart_node(follower)
                back = time.perf_counter()
                caught_up = None
                while time.perf_counter() - back < timeout_s:
                    rows = {n["node_id"]: n for n in kv.status()["nodes"]}
                    row, lead = rows.get(follower), rows.get(leader)
                    if (row and lead and row.get("live")
                            and row["applied_index"] >= lead["commit_index"] > 0
                            and INSTALL_LOG_RE.search(cluster.nodes[follower].tail(100_000))):
                        caught_up = time.perf_counter() - back
                        break
                    time.sleep(0.05)
                time.sleep(1.0)  # a stall after catching up would show here too
                stop.set()
                probe.join(timeout=30)
                term1 = _term(kv)
            follower_log = cluster.nodes[follower].tail(100_000)
            leader_log = cluster.nodes[leader].tail(100_000)
            leader_logs = "\n".join(c.tail(100_000) for c in cluster.nodes.values())
    snaps = [int(b) for _i, b, _ms in SNAPSHOT_LOG_RE.findall(leader_logs)]
    stalls = [int(ms) for ms in STALL_LOG_RE.findall(follower_log)]
    return {
        "mode": "install", "keys": keys, "load_s": round(took, 2),
        "keys_per_s": round(keys / took), "elections": term1 - term0,
        "installs": len(INSTALL_LOG_RE.findall(follower_log)),
        "largest_snapshot_bytes": max(snaps, default=0),
        "caught_up_s": None if caught_up is None else round(caught_up, 2),
        "follower_stalls": len(stalls),
        "longest_loop_stop_ms": max(stalls, default=0),
        "leader_stalls_ms": [int(ms) for ms in STALL_LOG_RE.findall(leader_log)],
        "slowest_probe_ms": round(worst[0] * 1000, 1),
    }


def run(mode: str, keys: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"zkv-stall-{mode}-") as tmp:
        cluster = LocalCluster(Path(tmp) / "data", shards=1, replicas=3, port=0,
                               fsync="never", node_args=("--snapshot-mode", mode))
        with cluster:
            cluster.wait_ready(60)
            with KVClient(cluster.endpoint, timeout_s=30) as kv:
                term0 = _term(kv)
                stop, worst = threading.Event(), [0.0]
                probe = threading.Thread(target=_prober, args=(cluster.endpoint, stop, worst),
                                         daemon=True)
                probe.start()
                took = _load(kv, keys)
                stop.set()
                probe.join(timeout=30)
                term1 = _term(kv)
            leader_logs = "\n".join(c.tail(100_000) for c in cluster.nodes.values())
    snaps = [(int(i), int(b), int(ms)) for i, b, ms in SNAPSHOT_LOG_RE.findall(leader_logs)]
    forks = [float(ms) for ms in FORK_LOG_RE.findall(leader_logs)]
    return {
        "mode": mode, "keys": keys, "load_s": round(took, 2),
        "keys_per_s": round(keys / took), "elections": term1 - term0,
        "snapshots": len(snaps), "largest_snapshot_bytes": max((b for _, b, _ in snaps), default=0),
        "longest_snapshot_ms": max((ms for *_, ms in snaps), default=0),
        "longest_loop_stop_ms": (max(forks, default=0.0) if mode == "fork"
                                 else max((ms for *_, ms in snaps), default=0)),
        "slowest_probe_ms": round(worst[0] * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--modes", default="fork,inline")
    p.add_argument("--install", action="store_true",
                   help="also time a follower that catches up by installing a snapshot")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    results = [run(mode, args.keys) for mode in modes]
    if args.install:
        results.append(run_install(args.keys))
    if args.json:
        print(json.dumps(results))
        return 0
    cols = ["mode", "keys_per_s", "elections", "snapshots", "largest_snapshot_bytes",
            "longest_snapshot_ms", "longest_loop_stop_ms", "slowest_probe_ms"]
    install_cols = ["mode", "keys_per_s", "elections", "installs", "largest_snapshot_bytes",
                    "caught_up_s", "follower_stalls", "longest_loop_stop_ms",
                    "leader_stalls_ms", "slowest_probe_ms"]
    for wanted in (cols, install_cols):
        rows = [r for r in results if (r["mode"] == "install") == (wanted is install_cols)]
        if rows:
            print(" | ".join(wanted))
            for r in rows:
                print(" | ".join(str(r.get(c)) for c in wanted))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
