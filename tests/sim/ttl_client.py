"""SimTtlClient: puts keys with short TTLs and reads them near their expiry, through the
broker, under the simulator's faults; ``check_ttl`` judges what it saw.

Kept out of the linearizability history (its keys expire by time, which the checker's
model does not know); the checks are the TTL rules themselves, with every node on the
simulated wall clock (``WALL_EPOCH_MS`` + simulated ms, so the skew between nodes is 0):

- never visible after expiry: a read that found a key started before ``t_ack + ttl``
  (+ 1 ms, a deadline's resolution);
- never gone early: a (linearizable) read that started after ``t_ack`` and found
  nothing was answered no earlier than ``t_send + ttl``; half the reads are ``stale``
  (any replica: a follower applies the sweep late, so it must hide the key by itself),
  and a stale read may miss a put not yet applied there, so only the first rule
  applies to them;
- at quiescence, after the longest TTL, no replica holds an expired key: the sweep
  ran to the end through crashes, partitions and elections.

Its keys are ``t<client>-<n>``, each put once; a put whose outcome is unknown (the
client gave up) is left out. Draws come from its own ``random.Random``, so turning it on
does not change the other clients' streams.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tests.sim.client import RETRY_CODES
from tests.sim.node import WALL_EPOCH_MS
from zkv.protocol import codec
from zkv.protocol.messages import (
    Consistency,
    ErrorReply,
    GetReply,
    GetRequest,
    PutReply,
    PutTtlRequest,
)

if TYPE_CHECKING:
    from tests.sim.cluster import World

TTLS_S = (0.3, 0.6, 1.0)
SLACK_S = 0.0011


@dataclass(slots=True)
class _Call:
    seq: int
    key: str
    ttl_s: float  # 0: a read
    t_send: float
    stale: bool = False
    attempt: int = 0


class SimTtlClient:
    def __init__(self, world: World, index: int, seed: int) -> None:
        self.world = world
        self.rng = random.Random(f"ttl-{seed}-{index}")
        self.addr = f"t{index}"
        self.client_id = self.addr.encode()
        self.seq = 0
        self.cur: _Call | None = None
        self.puts: dict[str, tuple[float, float, float]] = {}  # key -> (ttl, t_send, t_ack)
        #: (key, t0, t1, found, stale)
        self.reads: list[tuple[str, float, float, bool, bool]] = []
        world.at(self.rng.uniform(0.5, 1.5), self._next)

    @property
    def idle(self) -> bool:
        return self.cur is None

    def _next(self) -> None:
        w = self.world
        if self.cur is not None or w.now >= w.ttl_until:
            return
        self.seq += 1
        near = [k for k, (ttl, _s, ack) in self.puts.items() if abs(ack + ttl - w.now) < 0.2]
        if near and self.rng.random() < 0.7:
            self.cur = _Call(self.seq, self.rng.choice(near), 0.0, w.now,
                             self.rng.random() < 0.5)
        else:
            self.cur = _Call(self.seq, f"{self.addr}-{self.seq}", self.rng.choice(TTLS_S), w.now)
        self._send()

    def _send(self) -> None:
        cur = self.cur
        assert cur is not None
        w = self.world
        cur.attempt += 1
        key = cur.key.encode()
        req: Any = (PutTtlRequest(self.client_id, cur.seq, key, cur.seq, int(cur.ttl_s * 1000),
                                  b"v") if cur.ttl_s else
                    GetRequest(self.client_id, cur.seq, key,
                               Consistency.STALE if cur.stale else Consistency.LINEARIZABLE))
        w.net.send(self.addr, w.brokers[cur.attempt % len(w.brokers)], codec.encode(req), w.now)
        w.at(w.now + w.cfg.client_timeout_s, self._timeout, cur.seq, cur.attempt)

    def _timeout(self, seq: int, attempt: int) -> None:
        cur = self.cur
        if cur is None or cur.seq != seq or cur.attempt != attempt:
            return
        self._retry_or_give_up()

    def _retry_or_give_up(self) -> None:
        cur = self.cur
        assert cur is not None
        w = self.world
        if w.now - cur.t_send >= w.cfg.client_deadline_s:
            self._done()  # outcome unknown: left out of the checks
        else:
            self._send()

    def _backoff(self, seq: int, attempt: int) -> None:
        cur = self.cur
        if cur is not None and cur.seq == seq and cur.attempt == attempt:
            self._retry_or_give_up()

    def deliver(self, src: str, frames: list[bytes]) -> None:
        msg = codec.decode(frames)
        cur = self.cur
        if cur is None or getattr(msg, "request_id", None) != cur.seq:
            return
        w = self.world
        if type(msg) is ErrorReply:
            if msg.code not in RETRY_CODES:
                w.violation(f"{self.addr}: unexpected error {msg} for {cur.key}")
            w.at(w.now + 0.05, self._backoff, cur.seq, cur.attempt)
            return
        if type(msg) is PutReply and cur.ttl_s:
            self.puts[cur.key] = (cur.ttl_s, cur.t_send, w.now)
        elif type(msg) is GetReply and not cur.ttl_s:
            self.reads.append((cur.key, cur.t_send, w.now, msg.found, cur.stale))
        else:
            w.violation(f"{self.addr}: unexpected reply {msg!r}")
        self._done()

    def _done(self) -> None:
        self.cur = None
        w = self.world
        w.at(w.now + self.rng.uniform(0.0, 0.05), self._next)


def check_ttl(world: World, clients: list[SimTtlClient]) -> None:
    """The rules in the module docstring; ``world.violation`` on the first broken."""
    for c in clients:
        for key, t0, t1, found, stale in c.reads:
            ttl, t_send, t_ack = c.puts[key]
            if found and t0 >= t_ack + ttl + SLACK_S:
                world.violation(f"{key} read {t0 - t_ack:.4f}s after its ack, ttl {ttl}")
            if not found and not stale and t0 > t_ack and t1 < t_send + ttl:
                world.violation(f"{key} gone {t1 - t_send:.4f}s after its put, ttl {ttl}")
    now_ms = WALL_EPOCH_MS + int(world.now * 1000)
    for nid, node in world.nodes.items():
        if node.core is None:
            continue
        state = node.state
        left = [k for k in state.data if state.expiry.expired(k, now_ms)]
        if left:
            world.violation(f"{nid} still holds {len(left)} expired keys: {left[:3]}")


def ttl_stats(clients: list[SimTtlClient]) -> dict[str, int]:
    reads = [r for c in clients for r in c.reads]
    return {"ttl_puts": sum(len(c.puts) for c in clients), "ttl_reads": len(reads),
            "ttl_reads_found": sum(r[3] for r in reads)}
