"""A pipeline for the synchronous client: many single calls in flight on one connection.

    with kv.pipeline() as p:
        p.put("a", "1")
        p.get("b")
    p.results            # [version of a, value of b], in call order

Calls are queued, then ``execute`` (run by the ``with`` block's exit, when it raises
nothing) sends them ``PIPELINE_WINDOW`` at a time without waiting between them and
collects the replies by request id: one round trip per window instead of per call.
A call whose reply is missing after the attempt timeout, or is a retryable error, then
goes through the client's ordinary retry loop alone (same frames, same request id: a
write is still applied once). Each call's outcome is its own: ``execute`` raises the
first call's error in call order (``raise_on_error=False``: the exception objects take
their places in ``results``). Calls are concurrent, as if made from several threads:
neither a transaction nor ordered (a get queued after a put of the same key may see the
value from before the put; make the put first and the get after ``execute``).
The window stays below the broker's per-client queue (``broker/config.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zkv.client.retry import attempt_until
from zkv.protocol import codec
from zkv.protocol.errors import RETRYABLE_CODES, KVError, RemoteProtocolError
from zkv.protocol.messages import (
    CasReply,
    CasRequest,
    Consistency,
    DeleteReply,
    DeleteRequest,
    ErrorReply,
    GetReply,
    GetRequest,
    Message,
    PutReply,
    PutRequest,
)

if TYPE_CHECKING:
    from zkv.client.sdk import KVClient

#: Calls sent before waiting for their replies.
PIPELINE_WINDOW = 256


@dataclass(frozen=True, slots=True)
class _Op:
    build: Callable[[int, int], Message]  # (request id, lowest pending) -> request
    expected: type
    convert: Callable[[Any], Any]


class Pipeline:
    """Queued single calls of one ``KVClient``; see the module docstring."""

    def __init__(self, client: KVClient, timeout: float | None = None) -> None:
        self._client = client
        self._timeout = timeout
        self._ops: list[_Op] = []
        #: outcomes in call order, once executed
        self.results: list[Any] = []

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.execute()

    def __len__(self) -> int:
        return len(self._ops)

    # ------------------------------------------------------------------ calls

    def get(self, key: str | bytes, *, consistency: Consistency | None = None) -> int:
        """Queue a get; its result is the value or None. Returns its position."""
        c = self._client
        k = c.limits.key(key)
        level = c.consistency if consistency is None else Consistency(consistency)
        return self._add(lambda rid, low: GetRequest(c.client_id, rid, k, level), GetReply,
                         lambda r: r.value if r.found else None)

    def put(self, key: str | bytes, value: str | bytes) -> int:
        """Queue a put; its result is the key's new version."""
        c = self._client
        k, v = c.limits.key(key), c.limits.value(value)
        return self._add(lambda rid, low: PutRequest(c.client_id, rid, k, low, v), PutReply,
                         lambda r: int(r.version))

    def delete(self, key: str | bytes) -> int:
        """Queue a delete; its result is whether the key existed."""
        c = self._client
        k = c.limits.key(key)
        return self._add(lambda rid, low: DeleteRequest(c.client_id, rid, k, low), DeleteReply,
                         lambda r: bool(r.deleted))

    def cas(self, key: str | bytes, expected_version: int, value: str | bytes) -> int:
        """Queue a compare-and-set; its result is whether it swapped."""
        from zkv.client.sdk import check_version

        c = self._client
        k, v = c.limits.key(key), c.limits.value(value)
        expected = check_version(expected_version)
        return self._add(
            lambda rid, low: CasRequest(c.client_id, rid, k, low, expected, v), CasReply,
            lambda r: bool(r.swapped))

    def _add(self, build: Callable[[int, int], Message], expected: type,
             convert: Callable[[Any], Any]) -> int:
        self._ops.append(_Op(build, expected, convert))
        return len(self._ops) - 1

    # ------------------------------------------------------------------ execution

    def execute(self, *, raise_on_error: bool = True) -> list[Any]:
        """Send every queued call, collect every outcome (in call order)."""
        from zkv.client.sdk import ClientClosed, check_reply

        c = self._client
        ops, self._ops = self._ops, []
        results: list[Any] = []
        with c._lock:
            if c._closed:
                raise ClientClosed("client is closed")
            for start in range(0, len(ops), PIPELINE_WINDOW):
                window = ops[start:start + PIPELINE_WINDOW]
                rids = [c.new_request_id() for _ in window]
                frames = [codec.encode(op.build(rid, rids[0])) for op, rid in zip(
                    window, rids, strict=True)]
                replies = self._send_window(rids, frames)
                for op, rid, fr in zip(window, rids, frames, strict=True):
                    try:
                        reply = replies.get(rid)
                        if reply is None:  # silent or retryable: the ordinary retry loop
                            reply = c._exchange(rid, fr, self._timeout)
                        results.append(op.convert(check_reply(reply, op.expected)))
                    except KVError as exc:
                        results.append(exc)
        self.results = results
        if raise_on_error:
            for r in results:
                if isinstance(r, KVError):
                    raise r
        return results

    def _send_window(self, rids: list[int], frames: list[list[bytes]]) -> dict[int, Message]:
        """Send every call of a window, then take the replies that arrive within one
        attempt timeout; retryable errors are left out (their call is retried alone)."""
        from zkv.client.retry import CallState

        c = self._client
        conn = c._ensure_connection()
        for fr in frames:
            conn.send(fr)
        now = c._clock.now()
        total_s = c.timeout_s if self._timeout is None else self._timeout
        state = CallState.start(rids[0], now, total_s, len(c.endpoints), c._endpoint_index)
        until = attempt_until(state, now, c.attempt_timeout_s)
        wanted = set(rids)
        got: dict[int, Message] = {}
        while wanted:
            raw = conn.recv(until)
            if raw is None:
                break
            try:
                reply = codec.decode(raw)
            except RemoteProtocolError:
                continue
            rid = getattr(reply, "request_id", None)
            if rid not in wanted:
                continue
            wanted.discard(rid)
            if not (isinstance(reply, ErrorReply) and reply.code in RETRYABLE_CODES):
                got[rid] = reply
        return got
