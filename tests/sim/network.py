"""The simulated network: a seeded priority queue of deliveries (TigerBeetle's packet
simulator, in miniature).

Every ``send`` draws from the network's own ``random.Random``: the message is lost with
``loss_p``; otherwise it is delivered after a random delay (a minimum plus an
exponential tail, with rare spikes of ``spike_ms``), and duplicated with ``dup_p``
(each copy with its own delay). Independent delays are what reorder messages.

Partitions are a set of blocked directed links. A link is checked when the message is
sent *and* when it is due, so a cut also drops what was in flight (a cable pulled, not
a queue paused). ``heal`` removes every cut. Endpoints not mentioned in a partition
(the broker, clients) keep talking to everyone unless cut explicitly.

A misroute (``misroute(src, dst, wrong)``) delivers what ``src`` sends to ``dst`` to
``wrong`` instead, as a connection to an address that another node took over would;
the receiver sees the true sender. For the availability check the link is cut
(``blocked``). Misroutes are checked when a message is sent.

Determinism: given the same seed and the same sequence of calls, the same deliveries
come out in the same order (ties broken by a send counter).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class NetConfig:
    delay_ms_min: float = 0.5
    delay_ms_mean: float = 3.0  # mean of the exponential part
    spike_p: float = 0.01  # probability of a long delay
    spike_ms: float = 300.0
    loss_p: float = 0.0
    dup_p: float = 0.0
    in_flight_max: int = 200_000  # a limit on everything: a runaway sender fails loudly


@dataclass(slots=True)
class NetStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    cut: int = 0
    duplicated: int = 0
    misrouted: int = 0


class SimNetwork:
    def __init__(self, rng: random.Random, config: NetConfig | None = None) -> None:
        self.rng = rng
        self.config = config or NetConfig()
        self.stats = NetStats()
        self._queue: list[tuple[float, int, str, str, Any]] = []
        self._counter = 0
        self._blocked: set[tuple[str, str]] = set()
        self._misrouted: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ faults

    def partition(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        """Cut every link between the two sides, both directions."""
        a, b = set(side_a), set(side_b)
        for x in a:
            for y in b:
                if x != y:
                    self._blocked.add((x, y))
                    self._blocked.add((y, x))

    def cut(self, src: str, dst: str) -> None:
        """Cut one direction only (asymmetric partition)."""
        self._blocked.add((src, dst))

    def uncut(self, src: str, dst: str) -> None:
        """Restore one direction (only what ``cut`` or ``partition`` blocked there)."""
        self._blocked.discard((src, dst))

    def isolate(self, node: str, others: Iterable[str]) -> None:
        self.partition([node], others)

    def heal(self) -> None:
        self._blocked.clear()

    def misroute(self, src: str, dst: str, wrong: str) -> None:
        """Deliver what ``src`` sends to ``dst`` to ``wrong`` instead."""
        self._misrouted[(src, dst)] = wrong

    def unmisroute(self, src: str, dst: str) -> None:
        self._misrouted.pop((src, dst), None)

    def unmisroute_all(self) -> None:
        self._misrouted.clear()

    def blocked(self, src: str, dst: str) -> bool:
        return (src, dst) in self._blocked or (src, dst) in self._misrouted

    @property
    def partitioned(self) -> bool:
        return bool(self._blocked)

    # ------------------------------------------------------------------ traffic

    def delay(self) -> float:
        """One draw of the delay distribution, in seconds."""
        cfg = self.config
        ms = cfg.delay_ms_min + self.rng.expovariate(1.0 / cfg.delay_ms_mean)
        if self.rng.random() < cfg.spike_p:
            ms += self.rng.uniform(0, cfg.spike_ms)
        return ms / 1000.0

    def send(self, src: str, dst: str, msg: Any, now: float) -> None:
        self.stats.sent += 1
        if self._misrouted and (src, dst) in self._misrouted:
            dst = self._misrouted[(src, dst)]
            self.stats.misrouted += 1
        if (src, dst) in self._blocked:
            self.stats.cut += 1
            return
        if self.rng.random() < self.config.loss_p:
            self.stats.lost += 1
            return
        copies = 2 if self.rng.random() < self.config.dup_p else 1
        self.stats.duplicated += copies - 1
        if len(self._queue) + copies > self.config.in_flight_max:
            raise RuntimeError(f"more than {self.config.in_flight_max} messages in flight")
        for _ in range(copies):
            self._counter += 1
            heapq.heappush(self._queue, (now + self.delay(), self._counter, src, dst, msg))

    def next_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def pop_due(self, now: float) -> tuple[str, str, Any] | None:
        """The next message due at or before ``now`` whose link is still up, or None."""
        while self._queue and self._queue[0][0] <= now:
            _, _, src, dst, msg = heapq.heappop(self._queue)
            if (src, dst) in self._blocked:
                self.stats.cut += 1
                continue
            self.stats.delivered += 1
            return src, dst, msg
        return None

    def requeue(self, src: str, dst: str, msg: Any, when: float) -> None:
        """Hold a message for a paused receiver until ``when`` (a stopped process's socket
        buffers keep it)."""
        self._counter += 1
        heapq.heappush(self._queue, (when, self._counter, src, dst, msg))

    def drop_to(self, dst: str) -> int:
        """Forget everything in flight to ``dst`` (its process died with its buffers)."""
        keep = [item for item in self._queue if item[3] != dst]
        dropped = len(self._queue) - len(keep)
        if dropped:
            heapq.heapify(keep)
            self._queue = keep
        return dropped

    def __len__(self) -> int:
        return len(self._queue)
