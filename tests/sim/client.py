"""SimClient: one client process issuing put/get/cas/delete one at a time, with retries.

Each operation is recorded in the shared History. A retry keeps the same (client, seq),
so the state machine applies a write at most once. Routing: the NOT_LEADER hint, else
the broker's current leader, else a random node. An attempt times out after
``client_timeout_s``; past ``client_deadline_s`` the operation ends as ``info`` (it
may or may not have happened), unless every attempt was refused NOT_LEADER, in which
case nothing was proposed and it ends as ``fail``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.sim.cluster import World


@dataclass(slots=True)
class _Op:
    op_id: int
    op: str
    key: str
    value: str | None
    expected: int | None
    seq: int
    started: float
    attempt: int = 0
    unsure: bool = False  # some attempt may have been proposed


class SimClient:
    def __init__(self, world: World, client_id: int) -> None:
        self.world = world
        self.id = client_id
        self.addr = f"c{client_id}"
        self.seq = 0
        self.cur: _Op | None = None
        self.hint = ""
        self.versions: dict[str, int] = {}  # last version seen per key, for cas
        self.stopped = False
        world.at(world.rng.uniform(0.5, 1.5), self._next)

    @property
    def idle(self) -> bool:
        return self.cur is None

    def _next(self) -> None:
        w = self.world
        if self.cur is not None or self.stopped or not w.take_op_budget():
            return
        self.seq += 1
        rng = w.client_rng
        op = rng.choices(("put", "get", "cas", "delete"), weights=(4, 4, 2, 1))[0]
        key = f"k{rng.randrange(w.cfg.keys)}"
        value = f"{self.addr}.{self.seq}" if op in ("put", "cas") else None
        expected = None
        if op == "cas":
            expected = self.versions.get(key, 0) if rng.random() < 0.8 else rng.randrange(5)
        self.start(op, key, value, expected)

    def start(self, op: str, key: str, value: str | None = None, expected: int | None = None) -> None:
        w = self.world
        op_id = w.history.invoke(self.id, op, key, value, expected)
        self.cur = _Op(op_id, op, key, value, expected, self.seq, w.now)
        # A duplicated request can be proposed by one copy and refused by the other, so
        # with duplication on, no refusal proves the write was never proposed.
        self.cur.unsure = w.net.config.dup_p > 0
        self._send()

    def _send(self) -> None:
        cur = self.cur
        assert cur is not None
        w = self.world
        cur.attempt += 1
        target = self.hint or w.broker.leader() or w.client_rng.choice(w.node_ids)
        self.hint = ""
        if cur.op == "get":
            req: tuple = ("get", self.id, cur.seq, cur.key)
        else:
            req = (cur.op, self.id, cur.seq, cur.key, cur.value, cur.expected)
        w.net.send(self.addr, target, req, w.now)
        w.at(w.now + w.cfg.client_timeout_s, self._timeout, cur.seq, cur.attempt)

    def _timeout(self, seq: int, attempt: int) -> None:
        cur = self.cur
        if cur is None or cur.seq != seq or cur.attempt != attempt:
            return
        cur.unsure = True
        self._retry_or_give_up()

    def _retry_or_give_up(self) -> None:
        cur = self.cur
        assert cur is not None
        w = self.world
        if w.now - cur.started >= w.cfg.client_deadline_s:
            if cur.unsure and cur.op != "get":
                w.history.info(cur.op_id)
            else:
                w.history.fail(cur.op_id)
            self._done()
        else:
            self._send()

    def deliver(self, src: str, msg: Any) -> None:
        cur = self.cur
        if cur is None or msg[1] != cur.seq:
            return  # a late or duplicated reply to an earlier operation
        w = self.world
        if msg[0] == "not_leader":
            self.hint = msg[2] if msg[2] != src else ""
            attempt = cur.attempt
            w.at(w.now + 0.05, self._after_backoff, cur.seq, attempt)
            return
        result = msg[2]
        if cur.op == "get":
            result = tuple(result)
            self.versions[cur.key] = result[1]
        elif cur.op == "put":
            self.versions[cur.key] = result
        elif cur.op == "cas":
            result = tuple(result)
            self.versions[cur.key] = result[1]
        w.history.ok(cur.op_id, result)
        w.acked.append((self.id, cur.seq, cur.op, cur.key, result))
        self._done()

    def _after_backoff(self, seq: int, attempt: int) -> None:
        cur = self.cur
        if cur is None or cur.seq != seq or cur.attempt != attempt:
            return
        self._retry_or_give_up()

    def _done(self) -> None:
        self.cur = None
        w = self.world
        w.at(w.now + w.client_rng.uniform(0.0, 0.1), self._next)
