"""Memory per stored key (issue 14, target 5): 16 B keys, 100 B values, versions included.

Two measurements, both as resident-memory growth divided by the number of keys:

- ``--mode direct`` (default): a fresh child process builds a ``KVStateMachine`` and
  applies ``--keys`` PUT commands to it (no network, no log): the state machine's own
  cost per key. Also reports one snapshot's size and the RSS after taking it.
- ``--mode node``: a 1 x 1 ``LocalCluster`` (fsync never); ``--keys`` puts are sent
  pipelined through the broker; the node process's VmRSS (``/proc/<pid>/status``) is read
  before the load and after it, once the node has taken a snapshot and compacted its
  in-memory log (so the figure is the steady state, not a log in flight).

    python -m bench.memory [--mode direct|node] [--keys 1000000] [--json]

Redis's figure for the same shape is ~184 B per key (target <= 2x: 368 B).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REDIS_BYTES_PER_KEY = 184
TARGET_BYTES_PER_KEY = 2 * REDIS_BYTES_PER_KEY
KEY_BYTES = 16
VALUE_BYTES = 100
WINDOW = 256
LOAD_TIMEOUT_S = 600.0


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def key_of(i: int) -> bytes:
    return b"key-%012d" % i  # 16 bytes


def direct(keys: int) -> dict[str, Any]:
    """In this process (run it in a fresh one): the state machine alone."""
    import gc

    from zkv.storage_node.commands import PutCommand, encode_command
    from zkv.storage_node.state_machine import KVStateMachine

    value = os.urandom(VALUE_BYTES)
    sm = KVStateMachine()
    client = os.urandom(16)
    # a few warm-up entries so lazily created structures are counted in the baseline
    for i in range(1, 11):
        sm.apply(i, encode_command(PutCommand(client, i, i, 0, b"warm-%011d" % i, value)))
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    for i in range(11, keys + 11):
        # each entry as the log hands it: bytes decoded by apply, then dropped
        sm.apply(i, encode_command(PutCommand(client, i, i, 0, key_of(i), bytes(value))))
    load_s = time.perf_counter() - t0
    gc.collect()
    after = rss_bytes()
    snap = sm.snapshot_bytes()
    with_snapshot = rss_bytes()
    return {"mode": "direct", "keys": keys, "bytes_per_key": (after - before) / keys,
            "rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20,
            "snapshot_bytes_per_key": len(snap) / keys,
            "rss_while_holding_a_snapshot_mb": with_snapshot / 2**20,
            "apply_per_s": keys / load_s}


def node(keys: int) -> dict[str, Any]:
    import zmq

    from zkv.ops.bench import RequestCodec
    from zkv.ops.cluster import LocalCluster

    codec = RequestCodec()
    value = os.urandom(VALUE_BYTES)
    with tempfile.TemporaryDirectory(prefix="zkv-mem-") as tmp, LocalCluster(
        tmp, shards=1, replicas=1, port=0, fsync="never", log_level="INFO"
    ) as cluster:
        cluster.wait_ready(timeout=30.0)
        pid = cluster.node_pid(cluster.node_ids[0])
        assert pid is not None
        time.sleep(1.0)
        before = rss_bytes(pid)
        ctx: zmq.Context[Any] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cluster.endpoints[0])
        cid = os.urandom(16)
        sent = acked = errors = 0
        codes: dict[int, int] = {}
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        t0 = time.monotonic()
        try:
            while acked + errors < keys and time.monotonic() < deadline:
                while sent < keys and sent - acked - errors < WINDOW:
                    sent += 1
                    sock.send_multipart(codec.put(cid, sent, key_of(sent), sent, value))
                if sock.poll(1000):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        code = codec.parse_reply(frames)[1]
                        if code:
                            errors += 1
                            codes[code] = codes.get(code, 0) + 1
                        else:
                            acked += 1
        finally:
            sock.close(linger=0)
            ctx.term()
        load_s = time.monotonic() - t0
        snaps = Path(tmp) / cluster.node_ids[0] / "snap"
        # wait for the snapshot after the load (the log is compacted then)
        end = time.monotonic() + 60.0
        while time.monotonic() < end and not any(snaps.glob("*.snap")):
            time.sleep(0.5)
        time.sleep(3.0)
        after = rss_bytes(pid)
    return {"mode": "node", "keys": keys, "acked": acked, "errors": errors,
            "error_codes": {_code_name(c): n for c, n in codes.items()},
            "bytes_per_key": (after - before) / max(1, acked),
            "rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20,
            "puts_per_s": acked / load_s}


def _code_name(code: int) -> str:
    from zkv.protocol.errors import ErrorCode

    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("direct", "node"), default="direct")
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode == "direct" and not args.child:  # a fresh process: a clean baseline
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--child", "--json",
                              "--keys", str(args.keys)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent.parent)
        result = json.loads(out.stdout)
    else:
        result = direct(args.keys) if args.mode == "direct" else node(args.keys)
    result["target_bytes_per_key"] = TARGET_BYTES_PER_KEY
    result["ratio_to_redis"] = result["bytes_per_key"] / REDIS_BYTES_PER_KEY
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>34}: {v:,.1f}" if isinstance(v, float) else f"{k:>34}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
