"""Restart speed (issue 14, target 5): a node holding 1,000,000 keys back to serving.

Builds a data directory with the project's own writers (fast path, no cluster needed):
a snapshot of ``--keys`` keys (16 B keys, 100 B values) written by ``save_snapshot`` from
a ``KVStateMachine``, then ``--wal`` PUT entries after it appended by ``WriteAheadLog``
(overwriting some of those keys) and a hard state. Then two measurements:

- ``phases``: in this process, the recovery path a node runs (``startup.recover``:
  snapshot read + checksum + decode, WAL read) and the apply of the replayed entries,
  each timed, as records/s;
- ``exec``: a 1 x 1 ``LocalCluster`` started on that directory; the time from spawning
  the processes to the first GET that returns the newest value of a key the WAL wrote
  (so the snapshot is loaded, the WAL replayed, a leader elected and the log applied).

    python -m bench.restart [--keys 1000000] [--wal 50000] [--json]

Target: <= 5 s to serving, and >= 200,000 records/s for snapshot load + WAL replay
(records = keys in the snapshot + WAL entries).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from zkv.client.sdk import KVClient
from zkv.ops.cluster import LocalCluster, node_id
from zkv.protocol.messages import Entry
from zkv.protocol.ring import DEFAULT_VNODES, RingConfig
from zkv.storage_node import durable_state
from zkv.storage_node.commands import PutCommand, encode_command
from zkv.storage_node.fsync_policy import FsyncPolicy
from zkv.storage_node.snapshot import save_snapshot
from zkv.storage_node.startup import recover
from zkv.storage_node.state_machine import KeyTable, KVStateMachine
from zkv.storage_node.wal import WAL_DIR, WriteAheadLog

VALUE_BYTES = 100
TERM = 1
SERVE_TIMEOUT_S = 120.0
TARGET_S = 5.0
TARGET_RECORDS_PER_S = 200_000


def key_of(i: int) -> bytes:
    return b"key-%012d" % i  # 16 bytes


def _ring() -> RingConfig:
    return RingConfig(1, (0,), DEFAULT_VNODES)


def build(node_dir: Path, keys: int, wal_entries: int) -> bytes:
    """The data dir of node ``s0r0`` of a 1 x 1 cluster; returns the newest value of
    ``key_of(0)``, which the last WAL entry wrote."""
    node_dir.mkdir(parents=True, exist_ok=True)
    ring = _ring()
    durable_state.save_ring(node_dir, ring)
    durable_state.save_hard_state(node_dir, durable_state.HardState(TERM, "s0r0"))
    value = os.urandom(VALUE_BYTES)
    sm = KVStateMachine(shard_id=0, ring=ring)
    pack = (1).to_bytes(8, "little")
    # the fast path: the table as a snapshot holds it, every key at version 1
    names = [key_of(i) for i in range(keys)]
    if hasattr(KeyTable, "from_packed"):
        sm._data = KeyTable.from_packed(names, [value + pack] * keys)
    else:  # the tuple table before format 3: lets this script time the old code too
        sm._data = KeyTable(zip(names, [(value, 1)] * keys, strict=True))
    sm._applied_index = keys
    save_snapshot(node_dir, keys, TERM, sm.snapshot_bytes())
    wal, _ = WriteAheadLog.open(node_dir / WAL_DIR, FsyncPolicy.parse("never"))
    wal.reset(keys + 1)
    client = os.urandom(16)
    last = b""
    batch: list[Entry] = []
    for n in range(wal_entries):
        index = keys + 1 + n
        k = (n * 7919) % keys if n < wal_entries - 1 else 0
        last = os.urandom(VALUE_BYTES)
        batch.append(Entry(TERM, index, encode_command(
            PutCommand(client, n + 1, n + 1, 0, key_of(k), last))))
        if len(batch) == 1000:
            wal.append(batch)
            batch = []
    if batch:
        wal.append(batch)
    wal.sync(0.0, force=True)
    wal.close()
    return last


def phases(node_dir: Path, keys: int) -> dict[str, Any]:
    ring = _ring()
    sm = KVStateMachine(shard_id=0, ring=ring)
    t0 = time.perf_counter()
    found = recover(node_dir, FsyncPolicy.parse("never"), sm)
    t1 = time.perf_counter()
    for e in found.entries:
        sm.apply(e.index, e.data)
    t2 = time.perf_counter()
    found.wal.close()
    records = keys + len(found.entries)
    return {"recover_s": t1 - t0, "apply_s": t2 - t1, "wal_entries": len(found.entries),
            "records_per_s": records / (t2 - t0)}


def exec_to_serving(data_dir: Path, key: bytes, expected: bytes,
                    log_level: str = "WARNING") -> float:
    cluster = LocalCluster(data_dir, shards=1, replicas=1, port=0, fsync="never",
                           log_level=log_level)
    t0 = time.monotonic()
    with cluster:
        deadline = t0 + SERVE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with KVClient(cluster.endpoint, timeout_s=0.5) as c:
                    got = c.get(key)
                if got == expected:
                    return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not serving yet: any error means retry
                pass
            time.sleep(0.02)
    raise RuntimeError("the node did not serve in time")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--wal", type=int, default=50_000,
                   help="WAL entries after the snapshot (default: the most a node keeps "
                        "after its newest snapshot with the default --snapshot-entries)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zkv-restart-") as tmp:
        data_dir = Path(tmp)
        LocalCluster(data_dir, shards=1, replicas=1, port=0)  # writes cluster.json
        t0 = time.perf_counter()
        newest = build(data_dir / node_id(0, 0), args.keys, args.wal)
        result: dict[str, Any] = {"keys": args.keys, "build_s": time.perf_counter() - t0}
        result.update(phases(data_dir / node_id(0, 0), args.keys))
        result["exec_to_serving_s"] = exec_to_serving(data_dir, key_of(0), newest)
    result["target_s"] = TARGET_S
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v:,.2f}" if isinstance(v, float) else f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
