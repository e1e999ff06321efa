"""Histories of a real (sequential, hence linearizable) register under random concurrency.

Used by the linearizability checker's tests: every history made here is linearizable
by construction, because each operation takes effect on one in-memory store at a point
between its invocation and its completion (or, for info ops, at any later point or
never). Versions are a global log index, like zkv's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tests.support.history import History


@dataclass
class _Pending:
    op_id: int
    op: str
    key: Any
    value: Any
    expected: Any
    applied: bool = False
    result: Any = None


@dataclass
class RegisterSim:
    """A sequential multi-key register with zkv's semantics and log-index versions."""

    store: dict[Any, tuple[Any, int]] = field(default_factory=dict)
    index: int = 0

    def apply(self, p: _Pending) -> Any:
        cur = self.store.get(p.key)
        if p.op == "get":
            return (cur[0], cur[1]) if cur else (None, 0)
        if p.op == "put":
            self.index += 1
            self.store[p.key] = (p.value, self.index)
            return self.index
        if p.op == "delete":
            self.index += 1
            self.store.pop(p.key, None)
            return cur is not None
        version = cur[1] if cur else 0
        if version != p.expected:
            return (False, version)
        self.index += 1
        self.store[p.key] = (p.value, self.index)
        return (True, self.index)


def generate(
    seed: int,
    ops_total: int = 200,
    keys: int = 3,
    processes: int = 4,
    info_p: float = 0.03,
    fail_p: float = 0.03,
    mix: tuple[float, float, float, float] = (0.35, 0.4, 0.15, 0.1),  # put get cas delete
) -> History:
    rng = random.Random(seed)
    clock = iter(range(1, 10**12))
    h = History(clock=lambda: next(clock))
    reg = RegisterSim()
    pending: dict[int, _Pending] = {}
    zombies: list[_Pending] = []  # info ops that may still take effect later
    started = 0
    written: dict[Any, list[int]] = {}
    while started < ops_total or pending:
        if zombies and rng.random() < 0.02:
            z = zombies.pop(rng.randrange(len(zombies)))
            if rng.random() < 0.5:
                reg.apply(z)
        p = rng.randrange(processes)
        rec = pending.get(p)
        if rec is None:
            if started >= ops_total:
                continue
            started += 1
            op = rng.choices(("put", "get", "cas", "delete"), weights=mix)[0]
            key = f"k{rng.randrange(keys)}"
            value = f"v{started}" if op in ("put", "cas") else None
            expected = None
            if op == "cas":
                cur = reg.store.get(key)
                options = [cur[1] if cur else 0, 0] + written.get(key, [])[-3:]
                expected = rng.choice(options)
            op_id = h.invoke(p, op, key, value, expected)
            pending[p] = _Pending(op_id, op, key, value, expected)
            continue
        roll = rng.random()
        if not rec.applied:
            if roll < fail_p:
                h.fail(rec.op_id)
                del pending[p]
            elif roll < fail_p + info_p / 2:
                h.info(rec.op_id)  # sent, outcome unknown, maybe applied later
                zombies.append(rec)
                del pending[p]
            else:
                rec.result = reg.apply(rec)
                rec.applied = True
                if rec.op in ("put", "cas") and reg.store.get(rec.key, (None, 0))[0] == rec.value:
                    written.setdefault(rec.key, []).append(reg.store[rec.key][1])
            continue
        if roll < info_p / 2:
            h.info(rec.op_id)  # applied, but the reply was lost
        else:
            h.ok(rec.op_id, rec.result)
        del pending[p]
    return h
