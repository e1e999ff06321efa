"""Online add/remove of a shard on real processes, Jepsen-style.

2 shards x 3 replicas and 2 brokers; 1,000 keys preloaded; 8 client threads put unique
values and read random keys while shard 2 (3 replicas) is added and then shard 0 removed
(by ``LocalCluster.add_shard`` / ``remove_shard``, the code ``zkv admin`` runs).

Faults, all during the add: SIGKILL a broker, the leader of source shard 0 or the leader
of target shard 2 after two batches of the bulk copy, and restart it 2 s later (the
coordinator retries through the other broker / the new leader); or run the coordinator
as a real ``zkv admin add-shard`` process, SIGKILL it on a progress line (during the
copy, or once the ranges are fenced) and finish the change with ``zkv admin resume``.
One variant runs with ``fsync="always"``.

Checks: the history is linearizable per key; every key's final value, read through the
broker from the shard the final ring names, is the last acknowledged write when nothing
raced it; the shards of the final ring hold exactly the 1,000 keys between them (each
is served by its owner, so none is left behind on a shard that does not own it; nodes
refuse keys they do not own); every replica of the final shards, a restarted one too,
is live at the final epoch with its leader's key count; and the remove step dropped
shard 0's keys before its nodes were stopped.
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

from tests.support import lincheck
from tests.support.cli import ZkvCli
from tests.support.history import History
from zkv.client import KVClient
from zkv.client.cli import EXIT_FAILPOINT, FAILPOINT_ADMIN_EXIT
from zkv.ops.cluster import LocalCluster
from zkv.protocol.admin import AdminInfo, AdminInfoReply
from zkv.protocol.errors import KVError

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
    reply = kv.admin(AdminInfo(b"", 0, shard), timeout=10)
    assert isinstance(reply, AdminInfoReply)
    return reply.keys


class Faults:
    """Crashes one process during the first migration's bulk copy, at its second
    ``batch1`` step (a batch relayed, or a progress poll that saw keys move), or at the
    ``fence`` step if the copy finished before that; restarts it 2 s later, same data and
    ports. ``fault``: "broker" (b0), "source" (the leader of shard 0, sending keys) or
    "target" (the leader of the new shard, receiving them)."""

    BATCH = 2

    def __init__(self, cluster: LocalCluster, fault: str | None) -> None:
        self.cluster = cluster
        self.fault = fault
        self.batches = 0
        self.injected: list[str] = []
        self.restarts: list[threading.Timer] = []

    def on_step(self, step: str) -> None:
        if self.fault is None or self.injected or step not in ("batch1", "fence"):
            return
        if step == "batch1":
            self.batches += 1
            if self.batches < self.BATCH:
                return
        cluster = self.cluster
        if self.fault == "broker":
            self.injected.append(f"SIGKILL broker b0 at {step} #{self.batches}")
            cluster.kill_broker(0, signal.SIGKILL)
            self.restarts.append(threading.Timer(2.0, cluster.restart_broker, (0,)))
        else:
            # during add-shard the new shard is the only target, and the highest id
            shard = 0 if self.fault == "source" else max(cluster.shard_ids)
            leader = cluster.leader_of(shard)
            self.injected.append(f"SIGKILL {self.fault} leader {leader} at {step} "
                                 f"#{self.batches}")
            cluster.kill_node(leader, signal.SIGKILL)
            self.restarts.append(threading.Timer(2.0, cluster.restart_node, (leader,)))
        self.restarts[-1].start()

    def join(self) -> None:
        for r in self.restarts:
            r.join()


def add_shard_by_cli(cluster: LocalCluster, kill_on: str, lines: list[str],
                     faults: Faults) -> int:
    """``zkv admin add-shard --data-dir`` as a subprocess, playing the ``zkv cluster up``
    supervisor (start the nodes it adds to cluster.json); it dies as if SIGKILLed right
    after its first progress line starting with ``kill_on`` (the CLI's failpoint: a kill
    sent on reading the line raced the coordinator, which could finish the small change
    first); then ``zkv admin resume``, which must finish the change. Returns the new
    shard id."""
    prefix = "zkv admin: "
    endpoint = ["--endpoint", cluster.endpoint]

    def on_line(line: str) -> bool:
        text = line.removeprefix(prefix)
        if text.startswith("shard ") and "waiting for its leader" in text:
            cluster.sync_spec()
        return text.startswith(kill_on)

    with ZkvCli("admin", "add-shard", "--data-dir", str(cluster.data_dir), *endpoint,
                env={FAILPOINT_ADMIN_EXIT: kill_on}) as cli:
        hit = cli.follow(on_line, timeout_s=60)
        code = cli.wait(10)
        lines += [f"add-shard: {line.removeprefix(prefix)}" for line in cli.lines]
    assert hit is not None, f"add-shard never printed {kill_on!r} (exit {code}): {cli.lines}"
    assert code == EXIT_FAILPOINT, (code, cli.lines)
    assert cli.lines[-1] == hit, cli.lines  # nothing after the line it died on
    faults.injected.append(f"SIGKILL coordinator after {hit.removeprefix(prefix)!r}")
    new = max(cluster.shard_ids)
    with ZkvCli("admin", "resume", *endpoint) as cli:
        code = cli.wait(90)
        lines += [f"resume: {line.removeprefix(prefix)}" for line in cli.lines]
    assert code == 0, f"resume failed with {code}: {cli.lines}"
    assert "resume: resuming the change to ring epoch 2" in lines, lines
    assert "resume: ring epoch 2 in force on every shard" in lines, lines
    return new


def sharding_run(tmp_path: Path, fault: str | None, fsync: str = "never") -> None:
    """``fault``: None, a ``Faults`` kind, or "coordinator:<progress line prefix>"."""
    history = History()
    errors: Counter[str] = Counter()
    with LocalCluster(tmp_path / "data", shards=2, replicas=3, brokers=2, port=0,
                      fsync=fsync, heartbeat_ms=100, election_timeout_ms=600) as cluster:
        cluster.wait_ready(60)
        with KVClient(cluster.endpoints, timeout_s=10) as kv:
            for key in KEYS:
                value = f"init-{key}".encode()
                op = history.invoke(LOADER, "put", key, value)
                history.ok(op, kv.put(key, value))
        coordinator = fault is not None and fault.startswith("coordinator:")
        faults = Faults(cluster, None if coordinator else fault)
        stop = threading.Event()
        threads = [threading.Thread(target=_worker, daemon=True,
                                    args=(stop, history, cluster.endpoints, i, errors))
                   for i in range(CLIENTS)]
        lines: list[str] = []
        removing: list[str] = []
        started = time.monotonic()
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            t0 = time.monotonic()
            if coordinator:
                assert fault is not None
                new = add_shard_by_cli(cluster, fault.partition(":")[2], lines, faults)
            else:
                new = cluster.add_shard(progress=lines.append, batch_keys=40,
                                        on_step=faults.on_step)
            add_s = time.monotonic() - t0
            time.sleep(1.0)
            t0 = time.monotonic()
            cluster.remove_shard(0, progress=removing.append, batch_keys=40)
            remove_s = time.monotonic() - t0
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(20)
            faults.join()
        assert not any(t.is_alive() for t in threads), "a client thread hung"
        assert fault is None or faults.injected, "the fault was never injected"
        finals: dict[str, tuple[bytes | None, int]] = {}
        with KVClient(cluster.endpoints, timeout_s=30) as kv:
            for key in KEYS:
                op = history.invoke(FINAL, "get", key)
                found = kv.get_versioned(key) or (None, 0)
                history.ok(op, found)
                finals[key] = found
            ring = kv.status()["ring"]
            counts = {s: _shard_keys(kv, s) for s in ring["shards"]}
        replicas = _replica_counts(cluster, ring, counts)
    ops = history.operations()
    statuses = Counter((op.op, op.status) for op in ops if op.process < LOADER)
    print(f"\n{fault or 'no fault'} (fsync {fsync}): {faults.injected}; add-shard {new} "
          f"{add_s:.1f}s, remove-shard 0 {remove_s:.1f}s; {len(ops)} ops in "
          f"{time.monotonic() - started:.1f}s: "
          + ", ".join(f"{o} {s} {n}" for (o, s), n in sorted(statuses.items()))
          + f"; errors {dict(errors)}; final ring {ring}; keys per shard {counts}")
    for line in [*lines, *removing]:
        print("  " + line)
    assert ring["shards"] == [1, new]
    assert any(line.startswith("shard 0: dropped") for line in removing), removing
    assert sum(counts.values()) == len(KEYS), counts
    for shard, nodes in replicas.items():  # a restarted node among them caught up
        assert set(nodes) == _members(cluster, shard), (shard, nodes)
        assert set(nodes.values()) == {counts[shard]}, (shard, nodes, counts)
    assert all(v is not None for v, _ in finals.values()), "an acknowledged key vanished"
    result = lincheck.check(history)
    assert result.ok, f"not linearizable ({result.status}): {result.explanation}"
    _check_last_writes(ops, finals)
    assert statuses[("put", "ok")] > 200


def _replica_counts(cluster: LocalCluster, ring: dict[str, Any], counts: dict[int, int],
                    timeout_s: float = 20.0) -> dict[int, dict[str, int]]:
    """Per shard of the final ring, node -> key count from the heartbeats, once every
    replica (a restarted one too) is live, at the final epoch and holds what its leader
    holds, or as they stand at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = cluster.status(timeout_s=5).get("nodes", [])
        out: dict[int, dict[str, int]] = {}
        for shard in ring["shards"]:
            out[shard] = {n["node_id"]: int(n["key_count"]) for n in rows
                          if n["shard_id"] == shard and n["live"]
                          and n["ring_epoch"] == ring["epoch"]}
        if all(set(out[s]) == _members(cluster, s) and set(out[s].values()) == {counts[s]}
               for s in ring["shards"]) or time.monotonic() >= deadline:
            return out
        time.sleep(0.2)


def _members(cluster: LocalCluster, shard: int) -> set[str]:
    return {n["id"] for n in cluster.spec["nodes"] if int(n["shard"]) == shard}


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
    sharding_run(tmp_path, "source")


def test_add_shard_with_target_leader_killed_mid_migration(tmp_path: Path) -> None:
    sharding_run(tmp_path, "target")


@pytest.mark.parametrize("kill_on", ["phase 1 ", "fenced"], ids=["copying", "fenced"])
def test_add_shard_cli_coordinator_killed_then_resumed(tmp_path: Path, kill_on: str) -> None:
    sharding_run(tmp_path, f"coordinator:{kill_on}")


def test_add_shard_with_source_leader_killed_fsync_always(tmp_path: Path) -> None:
    sharding_run(tmp_path, "source", fsync="always")
