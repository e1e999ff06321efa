"""Jepsen-style runs on real processes: 1 shard x 3 replicas, 2 brokers, 8 clients.

Each run drives 8 client threads (a ``KVClient`` each, both brokers' endpoints, half of
them starting on each broker) doing put / get / cas on 10 keys with unique values for
about 12 s, while one nemesis acts:

(a) SIGKILL the shard leader, restart it a little later; twice;
(b) SIGSTOP the leader for 3 s, then SIGCONT; twice;
(c) SIGKILL a broker, restart it later; each broker once.

Every operation is recorded in ``tests.support.history.History``. Outcomes: a reply is
``ok``; ``TooLarge`` / ``BadRequest`` / ``TypeError`` (refused before anything could be
proposed) are ``fail``; anything else (``Timeout`` after the SDK's own retries, which
may hide an attempt that was applied; ``SessionExpired``; an internal error) is
``info``: unknown outcome, for reads as for writes (the checker drops info reads).

After the run the faults are healed, a final read of every key is recorded, and the
history must be linearizable (``tests.support.lincheck``). On top of that, explicitly:
each key's final value was written by an operation that did not fail, and a key whose
last acknowledged write has no concurrent or later write holds exactly that write.
The unavailability window of each fault (fault -> first acknowledged write invoked
after it) is printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import lincheck
from tests.support.history import History, Operation
from zkv.client import KVClient
from zkv.ops.cluster import LocalCluster
from zkv.protocol.errors import BadRequest, KVError, TooLarge

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]

SEED = int(os.environ.get("JEPSEN_SEED", "7"))
CLIENTS = 8
KEYS = [f"k{i}" for i in range(10)]
HEARTBEAT_MS = 100
ELECTION_TIMEOUT_MS = 600
OP_TIMEOUT_S = 5.0
ATTEMPT_TIMEOUT_S = 0.5
OP_PAUSE_S = 0.005
FINAL_PROCESS = 10_000

check_linearizable = getattr(lincheck, "check_linearizable", None) or lincheck.check


# --------------------------------------------------------------------------- workload


@dataclass
class Run:
    history: History = field(default_factory=History)
    errors: Counter[str] = field(default_factory=Counter)
    faults: list[tuple[str, int]] = field(default_factory=list)  # (what, monotonic ns)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fault(self, what: str) -> None:
        self.faults.append((what, time.monotonic_ns()))

    def error(self, exc: BaseException) -> None:
        with self.lock:
            self.errors[type(exc).__name__] += 1


def _definitely_not_applied(exc: BaseException) -> bool:
    """Refused before it reached the log: the client checks sizes and types locally,
    and a TOO_LARGE / BAD_REQUEST reply is final (never retried by the SDK)."""
    return isinstance(exc, TooLarge | BadRequest | TypeError | ValueError)


def _worker(run: Run, cluster: LocalCluster, index: int) -> None:
    rng = random.Random(SEED * 1000 + index)
    eps = cluster.endpoints[index % 2:] + cluster.endpoints[: index % 2]
    known: dict[str, int] = {}  # key -> latest version this client saw
    process = index
    with KVClient(eps, timeout_s=OP_TIMEOUT_S, attempt_timeout_s=ATTEMPT_TIMEOUT_S,
                  seed=index) as kv:
        for n in itertools.count():
            if run.stop.is_set():
                return
            key = rng.choice(KEYS)
            value = f"p{index}-{n}".encode()
            r = rng.random()
            if r < 0.4:
                op = run.history.invoke(process, "get", key)
                call: Callable[[], Any] = lambda k=key: kv.get_versioned(k)  # noqa: E731
            elif r < 0.75:
                op = run.history.invoke(process, "put", key, value)
                call = lambda k=key, v=value: kv.put(k, v)  # noqa: E731
            else:
                expected = known.get(key, 0) if rng.random() < 0.8 else rng.randint(0, 50)
                op = run.history.invoke(process, "cas", key, value, expected)
                call = lambda k=key, e=expected, v=value: kv.cas_versioned(k, e, v)  # noqa: E731
            try:
                result = call()
            except (KVError, TypeError, ValueError) as exc:
                run.error(exc)
                if _definitely_not_applied(exc):
                    run.history.fail(op)
                else:
                    run.history.info(op)
                    process += CLIENTS  # Jepsen: a process with an open op is gone
                continue
            if r < 0.4:
                result = result if result is not None else (None, 0)
                known[key] = result[1]
            elif r < 0.75:
                known[key] = result
            else:
                known[key] = result[1]
            run.history.ok(op, result)
            time.sleep(OP_PAUSE_S)


# --------------------------------------------------------------------------- cluster


def _live_leader(cluster: LocalCluster) -> tuple[str, int] | None:
    with contextlib.suppress(KVError):
        rows = [n for n in cluster.status(timeout_s=1.0)["nodes"]
                if n["role"] == 2 and n.get("live", True)]
        if rows:
            best = max(rows, key=lambda n: n["term"])
            return str(best["node_id"]), int(best["term"])
    return None


def wait_leader(cluster: LocalCluster, timeout_s: float = 30.0,
                not_in: tuple[str, ...] = ()) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        found = _live_leader(cluster)
        if found is not None and found[0] not in not_in:
            return found[0]
        assert time.monotonic() < deadline, "no live leader"
        time.sleep(0.05)


def heal(cluster: LocalCluster) -> None:
    for c in [*cluster.nodes.values(), *cluster.brokers]:
        if c.proc is not None and c.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGCONT)
    for nid, c in cluster.nodes.items():
        if not c.alive:
            cluster.restart_node(nid)
    for i, c in enumerate(cluster.brokers):
        if not c.alive:
            cluster.restart_broker(i)


# --------------------------------------------------------------------------- nemeses


def _pause(run: Run, seconds: float) -> None:
    run.stop.wait(seconds)


def nemesis_kill_leader(run: Run, cluster: LocalCluster) -> None:
    for _ in range(2):
        _pause(run, 2.0)
        leader = wait_leader(cluster)
        run.fault(f"SIGKILL leader {leader}")
        cluster.kill_node(leader, signal.SIGKILL)
        _pause(run, 2.5)
        cluster.restart_node(leader)
    _pause(run, 2.0)


def nemesis_pause_leader(run: Run, cluster: LocalCluster) -> None:
    for _ in range(2):
        _pause(run, 2.0)
        leader = wait_leader(cluster)
        run.fault(f"SIGSTOP leader {leader} for 3 s")
        cluster.kill_node(leader, signal.SIGSTOP)
        try:
            _pause(run, 3.0)
        finally:
            cluster.kill_node(leader, signal.SIGCONT)
    _pause(run, 2.0)


def nemesis_kill_broker(run: Run, cluster: LocalCluster) -> None:
    for b in (0, 1):
        _pause(run, 2.0)
        run.fault(f"SIGKILL broker b{b}")
        cluster.kill_broker(b, signal.SIGKILL)
        _pause(run, 3.0)
        cluster.restart_broker(b)
    _pause(run, 2.0)


# --------------------------------------------------------------------------- checks


def _writes(ops: list[Operation]) -> list[Operation]:
    return [op for op in ops if op.op in ("put", "cas")]


def _took_effect_possibly(op: Operation) -> bool:
    if op.status == "fail":
        return False
    if op.op == "cas" and op.status == "ok":
        return bool(op.result[0])
    return True


def unavailability_ms(run: Run) -> list[tuple[str, float | None]]:
    ops = run.history.operations()
    acked = [op for op in _writes(ops) if op.status == "ok" and op.complete_ns is not None]
    out = []
    for what, t_ns in run.faults:
        after = [op.complete_ns for op in acked if op.invoke_ns >= t_ns]
        out.append((what, (min(after) - t_ns) / 1e6 if after else None))
    return out


def final_reads(run: Run, cluster: LocalCluster) -> dict[str, tuple[bytes | None, int]]:
    finals: dict[str, tuple[bytes | None, int]] = {}
    with KVClient(cluster.endpoints, timeout_s=30) as kv:
        for key in KEYS:
            op = run.history.invoke(FINAL_PROCESS, "get", key)
            found = kv.get_versioned(key)
            result = found if found is not None else (None, 0)
            run.history.ok(op, result)
            finals[key] = result
    return finals


def check_final_values(run: Run, finals: dict[str, tuple[bytes | None, int]]) -> None:
    ops = [op for op in run.history.operations() if op.process != FINAL_PROCESS]
    for key, (value, _) in finals.items():
        writes = [op for op in _writes(ops) if op.key == key]
        candidates = {op.value for op in writes if _took_effect_possibly(op)}
        if value is None:
            assert not [op for op in writes if op.status == "ok" and _took_effect_possibly(op)], (
                f"{key}: acknowledged writes exist but the key is absent")
            continue
        assert value in candidates, f"{key}: final value {value!r} was never (possibly) written"
        acked = [op for op in writes if op.status == "ok" and _took_effect_possibly(op)]
        if not acked:
            continue
        last = max(acked, key=lambda op: op.complete_seq or 0)
        rivals = [op for op in writes if op is not last and _took_effect_possibly(op)
                  and (op.complete_seq is None or op.complete_seq > last.invoke_seq)]
        if not rivals:
            assert value == last.value, (
                f"{key}: last acknowledged write {last.value!r} (no concurrent or later "
                f"write) but the key holds {value!r}")


def assert_checker_not_vacuous(ops: list[Operation]) -> None:
    """The same history with one final read made impossible must be refused."""
    i = next(i for i, op in enumerate(ops) if op.process == FINAL_PROCESS)
    bad = list(ops)
    bad[i] = dataclasses.replace(ops[i], result=(b"never-written", 1))
    assert not check_linearizable(bad).ok, "the checker accepted an impossible read"


def jepsen_run(tmp_path: Path, nemesis: Callable[[Run, LocalCluster], None]) -> None:
    run = Run()
    with LocalCluster(tmp_path / "data", shards=1, replicas=3, brokers=2, port=0,
                      fsync="always", heartbeat_ms=HEARTBEAT_MS,
                      election_timeout_ms=ELECTION_TIMEOUT_MS, log_level="INFO") as cluster:
        cluster.wait_ready(60)
        wait_leader(cluster)
        threads = [threading.Thread(target=_worker, args=(run, cluster, i), daemon=True,
                                    name=f"client-{i}") for i in range(CLIENTS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        try:
            nemesis(run, cluster)
        finally:
            run.stop.set()
            for t in threads:
                t.join(OP_TIMEOUT_S + 10)
            heal(cluster)
        assert not any(t.is_alive() for t in threads), "a client thread hung"
        duration_s = time.monotonic() - started
        wait_leader(cluster, 30)
        finals = final_reads(run, cluster)
    ops = run.history.operations()
    statuses = Counter((op.op, op.status) for op in ops)
    windows = unavailability_ms(run)
    print(f"\n{len(ops)} ops in {duration_s:.1f}s: "
          + ", ".join(f"{o} {s} {n}" for (o, s), n in sorted(statuses.items()))
          + f"; client errors: {dict(run.errors)}")
    for what, ms in windows:
        shown = "never recovered" if ms is None else f"{ms:.0f} ms"
        print(f"  unavailability after {what}: {shown}")
    checked_at = time.monotonic()
    result = check_linearizable(run.history)
    print(f"  linearizability: {result.status} ({result.ops_checked} ops, "
          f"{time.monotonic() - checked_at:.1f}s)")
    if not result.ok:
        dump = tmp_path / "history.json"
        run.history.dump(str(dump))
        pytest.fail(f"history not linearizable ({result.status}); dump in {dump}\n"
                    f"{result.explanation}")
    assert_checker_not_vacuous(run.history.operations())
    check_final_values(run, finals)
    assert statuses[("put", "ok")] + statuses[("cas", "ok")] > 100, "too few writes to mean much"
    assert all(ms is not None for _, ms in windows), windows


def test_jepsen_kill_leader(tmp_path: Path) -> None:
    jepsen_run(tmp_path, nemesis_kill_leader)


def test_jepsen_pause_leader(tmp_path: Path) -> None:
    jepsen_run(tmp_path, nemesis_pause_leader)


def test_jepsen_kill_broker(tmp_path: Path) -> None:
    jepsen_run(tmp_path, nemesis_kill_broker)
