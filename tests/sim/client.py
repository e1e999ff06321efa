"""SimClient: one client issuing put/get/cas/delete one at a time through the broker.

Requests are the real wire messages (``PutRequest`` ...), encoded by the codec and sent
to the broker, so the node core's admission and the state machine's sessions are what
answer them. Each operation is recorded in the shared History. A retry keeps the same
(client id, request id), so a write is applied at most once (sessions); a request's
``lowest_pending`` is its own id (one operation at a time). An attempt times out after
``client_timeout_s``; refusals (``NOT_LEADER``, ``NO_LEADER``, ``UNAVAILABLE``,
``WRONG_SHARD``) are retried after a short backoff. Past ``client_deadline_s`` the
operation ends as ``info`` (it may or may not have happened) unless no attempt can
have been proposed: every one was refused by the broker itself (``NO_LEADER`` before
forwarding) or by a node that never proposes on refusal. A node's ``NOT_LEADER`` does
not prove that: a leader that steps down fails its pending writes so, and those may
still commit. Every answer to one write (retries, duplicates) must equal the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tests.sim.broker import OwnReply
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    CasReply,
    CasRequest,
    DeleteReply,
    DeleteRequest,
    ErrorReply,
    GetReply,
    GetRequest,
    PutReply,
    PutRequest,
)

if TYPE_CHECKING:
    from tests.sim.cluster import World

WRITE_REPLIES = (PutReply, DeleteReply, CasReply)
RETRY_CODES = frozenset({ErrorCode.NOT_LEADER, ErrorCode.NO_LEADER, ErrorCode.UNAVAILABLE,
                         ErrorCode.WRONG_SHARD, ErrorCode.DISK_FULL})


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
    def __init__(self, world: World, client_id: int, keys: list[str] | None = None,
                 auto: bool = True) -> None:
        """``auto``: draw operations on its own; else only what ``start`` is given."""
        self.world = world
        self.id = client_id
        self.addr = f"c{client_id}"
        self.client_id = self.addr.encode()
        self.seq = 0
        self.cur: _Op | None = None
        self.keys = keys or [f"k{i}" for i in range(world.cfg.keys)]
        self.versions: dict[str, int] = {}  # last version seen per key, for cas
        self.stopped = False
        #: replies are lost on the way while held (and no attempt gives up): a write is
        #: sent again, with its request id, only when ``release`` is called
        self.held = False
        if auto:
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
        key = rng.choice(self.keys)
        value = f"{self.addr}.{self.seq}" if op in ("put", "cas") else None
        expected = None
        if op == "cas":
            expected = self.versions.get(key, 0) if rng.random() < 0.8 else rng.randrange(5)
        elif op == "delete" and self.seq % 2 == 0:
            # Every other delete is conditional: mostly on the last version seen, else on
            # a guess. Chosen from seq, not drawn, so the seeds' random streams are as
            # they were before conditional deletes.
            seen = self.versions.get(key, 0)
            expected = seen if seen and self.seq % 3 else self.seq % 5 + 1
        self.start(op, key, value, expected)

    def start(self, op: str, key: str, value: str | None = None, expected: int | None = None) -> None:
        w = self.world
        op_id = w.history.invoke(self.id, op, key, value, expected)
        self.cur = _Op(op_id, op, key, value, expected, self.seq, w.now)
        # A duplicated request can be proposed by one copy and refused by the other, so
        # with duplication on, no refusal proves the write was never proposed.
        self.cur.unsure = w.net.config.dup_p > 0
        self._send()

    def _request(self, cur: _Op) -> Any:
        cid, rid, key = self.client_id, cur.seq, cur.key.encode()
        value = (cur.value or "").encode()
        if cur.op == "get":
            return GetRequest(cid, rid, key)
        if cur.op == "put":
            return PutRequest(cid, rid, key, rid, value)
        if cur.op == "delete":
            return DeleteRequest(cid, rid, key, rid, cur.expected or 0)
        return CasRequest(cid, rid, key, rid, cur.expected or 0, value)

    def _send(self) -> None:
        cur = self.cur
        assert cur is not None
        w = self.world
        cur.attempt += 1
        broker = w.brokers[cur.attempt % len(w.brokers)]
        w.net.send(self.addr, broker, codec.encode(self._request(cur)), w.now)
        w.at(w.now + w.cfg.client_timeout_s, self._timeout, cur.seq, cur.attempt)

    def _timeout(self, seq: int, attempt: int) -> None:
        cur = self.cur
        if cur is None or cur.seq != seq or cur.attempt != attempt:
            return
        cur.unsure = True
        if self.held:
            self.world.at(self.world.now + self.world.cfg.client_timeout_s, self._timeout, seq, attempt)
            return
        self._retry_or_give_up()

    def release(self) -> None:
        """Stop holding: send the current operation again (same request id)."""
        self.held = False
        if self.cur is not None:
            self.cur.started = self.world.now
            self._send()

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

    def deliver(self, src: str, frames: list[bytes]) -> None:
        msg = codec.decode(frames)
        if type(msg) in WRITE_REPLIES:  # every answer to one write must be its first
            first = self.world.write_replies.setdefault((self.client_id, msg.request_id), msg)
            if first != msg:
                self.world.violation(f"{self.addr}: write #{msg.request_id} answered {msg} "
                                     f"after {first}: applied twice?")
        cur = self.cur
        if cur is None or getattr(msg, "request_id", None) != cur.seq or self.held:
            return  # a late or duplicated reply to an earlier operation, or held
        w = self.world
        if type(msg) is ErrorReply:
            if msg.code not in RETRY_CODES:
                w.violation(f"{self.addr}: unexpected error {msg} for {cur.op} {cur.key}")
            if msg.code != ErrorCode.NO_LEADER or type(frames) is not OwnReply:
                cur.unsure = True  # a node refused: it may have proposed it before
            w.at(w.now + 0.05, self._after_backoff, cur.seq, cur.attempt)
            return
        result = self._result(cur, msg)
        w.history.ok(cur.op_id, result)
        w.acked.append((self.client_id, cur.seq, cur.op, cur.key, result))
        self._done()

    def _result(self, cur: _Op, msg: Any) -> Any:
        if type(msg) is GetReply:
            result: Any = (msg.value.decode() if msg.found else None, msg.version)
            self.versions[cur.key] = msg.version
        elif type(msg) is PutReply:
            result = msg.version
            self.versions[cur.key] = msg.version
        elif type(msg) is CasReply:
            result = (msg.swapped, msg.version)
            self.versions[cur.key] = msg.version
        elif type(msg) is DeleteReply and cur.expected is not None:
            result = (msg.deleted, msg.version)
            if not msg.deleted:
                self.versions[cur.key] = msg.version
        elif type(msg) is DeleteReply:
            result = msg.deleted
        else:
            self.world.violation(f"{self.addr}: unexpected reply {msg!r} to {cur.op}")
        return result

    def _after_backoff(self, seq: int, attempt: int) -> None:
        cur = self.cur
        if cur is None or cur.seq != seq or cur.attempt != attempt:
            return
        self._retry_or_give_up()

    def _done(self) -> None:
        self.cur = None
        w = self.world
        w.at(w.now + w.client_rng.uniform(0.0, 0.1), self._next)
