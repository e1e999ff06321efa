"""Online add/remove of a shard on real processes, Jepsen-style (issue 4).

2 shards x 3 replicas and 2 brokers; 1,000 keys preloaded; 8 client threads put unique
values and read random keys while shard 2 is added and then shard 0 removed (by
``LocalCluster.add_shard`` / ``remove_shard``, the code ``zkv admin`` runs). Variants
SIGKILL a broker, or the leader of source shard 0, in the middle of the first
migration's bulk copy (the coordinator retries through the other broker / the new
leader). Checks: the history is linearizable per key; every key's final value, read
through the broker from the shard the final ring names, is the last acknowledged write
when nothing raced it; the shards of the final ring hold exactly the 1,000 keys between
them (each is served by its owner, so none is left behind on a shard that does not own
it; nodes refuse keys they do not own), and shard 0 dropped every key it held before
its nodes were stopped.
"""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client import KVClient
from client.cluster import LocalCluster
from protocol.errors import KVError
from tests.support import lincheck
from tests.support.history import History

pytestmark = [pytest.mark.process, pytest.mark.timeout(150)]

CLIENTS = 8
KEYS = [f"key-{i}" for i in range(1000)]
LOADER = 5000
FINAL = 10_000


def _worker(stop: threading.Event, history: History, endpoints: list[str], index: int,
            errors: Counter[str]) -> None:
    rng = random.Random(index)
    process = index
    with KVClient(endpoints[index % 2:] + endpoints[: index % 2], timeout_s=8,
                  attempt_timeout_s=0.5, seed=index) as kv:
        for n in itertools.count():
            if stop.is_set():
                return
            key = rng.choice(KEYS)
            if rng.random() < 0.5:
                value = f"w{index}-{n}".encode()
                op = history.invoke(process, "put", key, value)
                call: Callable[[], Any] = lambda k=key, v=value: kv.put(k, v)  # noqa: E731
            else:
                op = history.invoke(process, "get", key)
                call = lambda k=key: kv.get_versioned(k) or (None, 0)  # noqa: E731
            try:
                history.ok(op, call())
            except KVError as exc:
                errors[type(exc).__name__] += 1
                history.info(op)
                process += CLIENTS
            time.sleep(0.002)


def _shard_keys(kv: KVClient, shard: int) -> int:
    return int(kv.admin(shard, "info", timeout=10)[0]["keys"])


def sharding_run(tmp_path: Path, fault: str | None) -> None:
    history = History()
    errors: Counter[str] = Counter()
    with LocalCluster(tmp_path / "data", shards=2, replicas=3, brokers=2, port=0,
                      fsync="never", heartbeat_ms=100, election_timeout_ms=600) as cluster:
        cluster.wait_ready(60)
        with KVClient(cluster.endpoints, timeout_s=10) as kv:
            for key in KEYS:
                value = f"init-{key}".encode()
                op = history.invoke(LOADER, "put", key, value)
                history.ok(op, kv.put(key, value))
        injected: list[str] = []
        restarts: list[threading.Timer] = []

        def on_step(step: str) -> None:
            if fault is None or injected or step != "batch1":
                return
            if len(injected) == 0 and getattr(on_step, "batches", 0) < 2:
                on_step.batches = getattr(on_step, "batches", 0) + 1  # type: ignore[attr-defined]
                return
            if fault == "broker":
                injected.append("SIGKILL broker b0")
                cluster.kill_broker(0, signal.SIGKILL)
                restarts.append(threading.Timer(2.0, cluster.restart_broker, (0,)))
            else:
                leader = cluster.leader_of(0)
                injected.append(f"SIGKILL source leader {leader}")
                cluster.kill_node(leader, signal.SIGKILL)
                restarts.append(threading.Timer(2.0, cluster.restart_node, (leader,)))
            restarts[-1].start()

        stop = threading.Event()
        threads = [threading.Thread(target=_worker, daemon=True,
                                    args=(stop, history, cluster.endpoints, i, errors))
                   for i in range(CLIENTS)]
        lines: list[str] = []
        started = time.monotonic()
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            t0 = time.monotonic()
            new = cluster.add_shard(progress=lines.append, batch_keys=40, on_step=on_step)
            add_s = time.monotonic() - t0
            time.sleep(1.0)
            t0 = time.monotonic()
            cluster.remove_shard(0, progress=lines.append, batch_keys=40)
            remove_s = time.monotonic() - t0
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(20)
            for r in restarts:
                r.join()
        assert not any(t.is_alive() for t in threads), "a client thread hung"
        assert fault is None or injected, "the fault was never injected"
        finals: dict[str, tuple[bytes | None, int]] = {}
        with KVClient(cluster.endpoints, timeout_s=30) as kv:
            for key in KEYS:
                op = history.invoke(FINAL, "get", key)
                found = kv.get_versioned(key) or (None, 0)
                history.ok(op, found)
                finals[key] = found
            ring = kv.status()["ring"]
            counts = {s: _shard_keys(kv, s) for s in ring["shards"]}
    ops = history.operations()
    statuses = Counter((op.op, op.status) for op in ops if op.process < LOADER)
    print(f"\n{fault or 'no fault'}: {injected}; add-shard {new} {add_s:.1f}s, remove-shard 0 "
          f"{remove_s:.1f}s; {len(ops)} ops in {time.monotonic() - started:.1f}s: "
          + ", ".join(f"{o} {s} {n}" for (o, s), n in sorted(statuses.items()))
          + f"; errors {dict(errors)}; final ring {ring}; keys per shard {counts}")
    for line in lines:
        print("  " + line)
    assert ring["shards"] == [1, new]
    assert any(line.startswith("shard 0: dropped") for line in lines), lines
    assert sum(counts.values()) == len(KEYS), counts
    assert all(v is not None for v, _ in finals.values()), "an acknowledged key vanished"
    result = lincheck.check(history)
    assert result.ok, f"not linearizable ({result.status}): {result.explanation}"
    _check_last_writes(ops, finals)
    assert statuses[("put", "ok")] > 200


def _check_last_writes(ops: list[Any], finals: dict[str, tuple[bytes | None, int]]) -> None:
    by_key: dict[str, list[Any]] = {}
    for op in ops:
        if op.op == "put" and op.process != FINAL:
            by_key.setdefault(op.key, []).append(op)
    for key, (value, _) in finals.items():
        writes = by_key[key]
        assert value in {op.value for op in writes}, f"{key}: {value!r} never written"
        acked = [op for op in writes if op.status == "ok"]
        last = max(acked, key=lambda op: op.complete_seq)
        rivals = [op for op in writes if op is not last
                  and (op.complete_seq is None or op.complete_seq > last.invoke_seq)]
        if not rivals:
            assert value == last.value, f"{key}: lost the last acknowledged write"


def test_add_then_remove_shard_under_load(tmp_path: Path) -> None:
    sharding_run(tmp_path, None)


def test_add_shard_with_broker_killed_mid_migration(tmp_path: Path) -> None:
    sharding_run(tmp_path, "broker")


def test_add_shard_with_source_leader_killed_mid_migration(tmp_path: Path) -> None:
    sharding_run(tmp_path, "leader")
