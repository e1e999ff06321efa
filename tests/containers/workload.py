"""Client load for the container tests: worker threads driving KVClients from the host,
every operation recorded in a ``tests.support.history.History``.

Outcome rules (sound for the linearizability checker):
- a write that raised anything is ``info`` (unknown outcome: it may apply later), since
  the SDK retries the same request id across brokers and an earlier attempt may have
  landed;
- a read that raised is ``fail`` (a read changes nothing);
- every error is counted by type, so a test can say which errors clients may see.

``Sequencer`` is the blunt "no acknowledged write lost" check: one writer puts 1, 2,
3, ... on one key, each only after the previous was acknowledged; at the end the key
must hold at least the last acknowledged number.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.containers.cluster import close_client
from zkv.protocol.ring import DEFAULT_VNODES, Ring, RingConfig

log = logging.getLogger("zkv.containers")

ClientFactory = Callable[[], Any]


def keys_for_shard(shard: int, count: int, ring: Ring, prefix: str = "k") -> list[str]:
    keys = []
    for i in itertools.count():
        key = f"{prefix}{i}"
        if ring.shard_for(key.encode()) == shard:
            keys.append(key)
            if len(keys) == count:
                return keys
    raise AssertionError("unreachable")


def ring_from_status(status: dict[str, Any], shards: int) -> Ring:
    ring = status.get("ring") or {}
    if ring.get("shards"):
        return Ring(
            RingConfig(
                epoch=int(ring.get("epoch", 1)),
                shards=tuple(int(s) for s in ring["shards"]),
                vnodes=int(ring.get("vnodes", DEFAULT_VNODES)),
            )
        )
    return Ring.of(range(shards))


def check_history(history: Any) -> Any:
    from tests.support import lincheck

    checker = lincheck.check
    return checker(history)


@dataclass
class Acked:
    key: str
    value: bytes
    invoked: float
    completed: float


@dataclass
class LoadStats:
    ops: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    acked_writes: list[Acked] = field(default_factory=list)
    invoked_writes: list[tuple[str, bytes, float]] = field(default_factory=list)

    def first_ack_after(self, t: float, keys: Iterable[str] | None = None) -> float | None:
        wanted = set(keys) if keys is not None else None
        times = [
            a.completed
            for a in self.acked_writes
            if a.completed >= t and (wanted is None or a.key in wanted)
        ]
        return min(times) if times else None


class Load:
    """``processes`` threads, each with its own client from ``factory``, each looping
    put/get over ``keys`` until ``stop()``."""

    _process_ids = itertools.count(1)

    def __init__(
        self,
        history: Any,
        factory: ClientFactory,
        keys: list[str],
        *,
        processes: int = 2,
        write_every: int = 2,
        pause_s: float = 0.01,
        name: str = "load",
    ) -> None:
        self.history = history
        self.factory = factory
        self.keys = keys
        self.write_every = write_every
        self.pause_s = pause_s
        self.name = name
        self.stats = LoadStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(next(self._process_ids),), daemon=True)
            for _ in range(processes)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> LoadStats:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
            if t.is_alive():
                raise TimeoutError(f"{self.name}: a worker did not stop in {timeout_s}s")
        return self.stats

    def _run(self, process: int) -> None:
        client = self.factory()
        try:
            for n in itertools.count():
                if self._stop.is_set():
                    return
                key = self.keys[n % len(self.keys)]
                if n % self.write_every == 0:
                    self._put(client, process, key, f"{self.name}-{process}-{n}".encode())
                else:
                    self._get(client, process, key)
                time.sleep(self.pause_s)
        finally:
            close_client(client)

    def _put(self, client: Any, process: int, key: str, value: bytes) -> None:
        invoked = time.monotonic()
        op = self.history.invoke(process, "put", key, value)
        with self._lock:
            self.stats.invoked_writes.append((key, value, invoked))
        try:
            version = client.put(key, value)
        except Exception as exc:  # outcome unknown, whatever the error
            self.history.info(op)
            self._error(exc)
            return
        self.history.ok(op, version)
        with self._lock:
            self.stats.ops += 1
            self.stats.acked_writes.append(Acked(key, value, invoked, time.monotonic()))

    def _get(self, client: Any, process: int, key: str) -> None:
        op = self.history.invoke(process, "get", key)
        try:
            found = client.get_versioned(key)
        except Exception as exc:
            self.history.fail(op)
            self._error(exc)
            return
        self.history.ok(op, found if found is not None else (None, 0))
        with self._lock:
            self.stats.ops += 1

    def _error(self, exc: BaseException) -> None:
        with self._lock:
            self.stats.errors[type(exc).__name__] += 1


class Sequencer:
    """One writer of 1, 2, 3, ... on ``key``; ``last_acked`` is the last acknowledged."""

    def __init__(self, factory: ClientFactory, key: str, pause_s: float = 0.02) -> None:
        self.factory = factory
        self.key = key
        self.pause_s = pause_s
        self.last_acked = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sequencer:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> int:
        self._stop.set()
        self._thread.join(timeout_s)
        return self.last_acked

    def _run(self) -> None:
        client = self.factory()
        n = 1
        try:
            while not self._stop.is_set():
                try:
                    client.put(self.key, str(n).encode())
                except Exception as exc:  # retry the same number: it may or may not be in
                    self.errors[type(exc).__name__] += 1
                    continue
                self.last_acked = n
                n += 1
                time.sleep(self.pause_s)
        finally:
            close_client(client)

    def verify(self, client: Any) -> int:
        """The key's final number; raises if an acknowledged number was lost."""
        value = client.get(self.key)
        final = int(value) if value is not None else 0
        assert final >= self.last_acked, (
            f"acknowledged write lost on {self.key}: last acked {self.last_acked}, now {final}"
        )
        return final


def final_reads(history: Any, client: Any, keys: Iterable[str], process: int = 0) -> None:
    """Read every key once more after the faults, into the history (the checker then
    proves no acknowledged write vanished)."""
    for key in keys:
        op = history.invoke(process, "get", key)
        found = client.get_versioned(key)
        history.ok(op, found if found is not None else (None, 0))


def log_unavailability(label: str, fault_at: float, first_ack: float | None) -> float | None:
    if first_ack is None:
        log.warning("%s: no write acknowledged after the fault", label)
        return None
    window = first_ack - fault_at
    log.warning(
        "%s: unavailability window %.3fs (fault -> first acknowledged write)", label, window
    )
    print(f"{label}: unavailability window {window:.3f}s")
    return window


def longest_ack_gap(
    stats: LoadStats, keys: Iterable[str], start: float, end: float
) -> tuple[float, float]:
    """The longest window in [start, end] with no acknowledged write on ``keys``:
    ``(length_s, began_at)``. The window is measured between acknowledgments (write
    completions), from the last one at or before ``start`` (``start`` itself if there is
    none) to ``end``: a shard that answers nothing from a fault until ``end`` counts
    all of it. With several writers acknowledging every few ms in steady state, this is
    the fault's unavailability plus at most one steady-state gap."""
    wanted = set(keys)
    times = sorted(a.completed for a in stats.acked_writes if a.key in wanted)
    before = [t for t in times if t <= start]
    points = [before[-1] if before else start]
    points += [t for t in times if start < t <= end]
    points.append(end)
    best = (0.0, points[0])
    for a, b in itertools.pairwise(points):
        if b - a > best[0]:
            best = (b - a, a)
    return best
