"""How a storage node admits batches and scans. Pure (a mixin of ``RequestCore``).

Rules, the single-key ones applied to every key (``node_requests.py``):
- Admission: more than ``MULTI_KEYS_MAX`` keys, a key over ``key_bytes_max``, a value
  over ``value_bytes_max`` or a batch over ``MULTI_REQUEST_BYTES_MAX`` bytes: the whole
  request gets ``TOO_LARGE``; a scan ``limit`` outside 1..``SCAN_LIMIT_MAX`` gets
  ``BAD_REQUEST``.
- Reads (``mget``, scan) are gated like a get: ``stale`` answered by any replica at once,
  ``leader`` by the leader at once, ``linearizable`` by the leader once its read index
  is applied (``NodeCore._serve_reads`` calls ``serve_multi_read``), with ownership
  checked then, per key, as for a get.
- A batch write is proposed by the leader as ONE ``MultiWrite`` entry. Ownership of
  every key is checked before proposing: if some key is not served here, nothing is
  proposed and the reply names, per key, the refusal (``WRONG_SHARD`` with our ring, or
  ``UNAVAILABLE`` while fenced) or ``UNAVAILABLE`` for the keys we do serve (so that the
  SDK sends them again, split by the newer ring). The state machine checks again at
  apply (``multikey_state.py``). Disk full and the data quota answer as for single
  writes; the quota counts the growth of the whole part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zkv.protocol.errors import ErrorCode
from zkv.protocol.limits import MULTI_KEYS_MAX, MULTI_REQUEST_BYTES_MAX, SCAN_LIMIT_MAX
from zkv.protocol.messages import Consistency, ErrorReply, Role
from zkv.protocol.multikey import (
    FanOutRequest,
    KeyResult,
    MultiDeleteRequest,
    MultiGetRequest,
    MultiPutRequest,
    MultiReply,
    ScanRequest,
    request_bytes,
)
from zkv.protocol.ring import RingConfig
from zkv.storage_node.multikey_commands import MultiKind, MultiWrite
from zkv.storage_node.multikey_state import multi_get_reply, scan_page
from zkv.storage_node.quota import write_growth_bytes
from zkv.storage_node.ttl_requests import wait_index

if TYPE_CHECKING:
    from zkv.protocol.ring import Ring
    from zkv.storage_node.node_requests import NodeCoreConfig, Pending
    from zkv.storage_node.quota import Quota
    from zkv.storage_node.replica import Replica
    from zkv.storage_node.state_machine import KVStateMachine

_UNAVAILABLE = int(ErrorCode.UNAVAILABLE)


class MultiKeyRequests:
    """Batch and scan methods of ``RequestCore`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: NodeCoreConfig
        replica: Replica
        state: KVStateMachine
        initial_ring: Ring
        quota: Quota
        disk_full: bool
        pending_type: Callable[..., Pending]
        pending_writes: dict[int, Pending]
        wall_ms: int

        def _reply(self, origin: object, ident: bytes, reply: object) -> None: ...
        def not_leader(self, request_id: int) -> ErrorReply: ...
        def _propose(self, cmd: Any, pending: Pending, now: float) -> int: ...

    def _ring_config(self) -> RingConfig:
        return (self.state.ownership.ring or self.initial_ring).config

    def _on_fanout(self, origin: object, ident: bytes, req: FanOutRequest, now: float,
                   ts_ms: int) -> None:
        why = self._multi_refusal(req)
        if why is not None:
            self._reply(origin, ident, why)
        elif isinstance(req, (MultiGetRequest, ScanRequest)):
            self._on_multi_read(origin, ident, req, now)
        else:
            self._on_multi_write(origin, ident, req, now, ts_ms)

    def _multi_refusal(self, req: FanOutRequest) -> ErrorReply | None:
        rid, cfg = req.request_id, self.config
        if isinstance(req, ScanRequest):
            if not 1 <= req.limit <= SCAN_LIMIT_MAX:
                return ErrorReply(rid, ErrorCode.BAD_REQUEST,
                                  f"scan limit must be 1..{SCAN_LIMIT_MAX}")
            if len(req.prefix) > cfg.key_bytes_max or len(req.after or b"") > cfg.key_bytes_max:
                return ErrorReply(rid, ErrorCode.TOO_LARGE, "prefix or cursor over the key limit")
            return None
        if len(req.keys) > MULTI_KEYS_MAX:
            return ErrorReply(rid, ErrorCode.TOO_LARGE,
                              f"{len(req.keys)} keys in one batch; the limit is {MULTI_KEYS_MAX}")
        if any(len(k) > cfg.key_bytes_max for k in req.keys):
            return ErrorReply(rid, ErrorCode.TOO_LARGE,
                              f"a key is over the limit of {cfg.key_bytes_max} bytes")
        if isinstance(req, MultiPutRequest):
            if len(req.values) != len(req.keys):
                return ErrorReply(rid, ErrorCode.BAD_REQUEST, "keys and values differ in number")
            if any(len(v) > cfg.value_bytes_max for v in req.values):
                return ErrorReply(rid, ErrorCode.TOO_LARGE,
                                  f"a value is over the limit of {cfg.value_bytes_max} bytes")
        if not isinstance(req, MultiGetRequest) and request_bytes(req) > MULTI_REQUEST_BYTES_MAX:
            return ErrorReply(rid, ErrorCode.TOO_LARGE,
                              f"batch over {MULTI_REQUEST_BYTES_MAX} bytes of keys and values")
        return None

    def _on_multi_read(self, origin: object, ident: bytes,
                       req: MultiGetRequest | ScanRequest, now: float) -> None:
        if req.consistency is Consistency.STALE or (
                req.consistency is Consistency.LEADER and self.replica.role is Role.LEADER):
            self._reply(origin, ident, self.answer_multi_read(req))
        elif self.replica.role is not Role.LEADER:
            self._reply(origin, ident, self.not_leader(req.request_id))
        elif not self.replica.read_index(
                self.pending_type(origin, ident, req.request_id, multi=req), now):
            self._reply(origin, ident, ErrorReply(req.request_id, ErrorCode.UNAVAILABLE, "busy"))

    def answer_multi_read(self, req: MultiGetRequest | ScanRequest) -> object:
        """The reply to a batch read or a scan page from the state as it is now; keys
        expired by ``wall_ms`` are absent, swept or not, as for a single get."""
        state = self.state
        expiry, now_ms = state.expiry, self.wall_ms
        expired = (lambda key: expiry.expired(key, now_ms)) if len(expiry) else None
        if isinstance(req, MultiGetRequest):
            return multi_get_reply(req.request_id, req.keys, state.data, state.ownership,
                                   self._ring_config(), expired=expired)
        return scan_page(req.request_id, req.prefix, req.after, req.limit, req.keys_only,
                         state.data, state.ownership, self._ring_config(), expired=expired)

    def serve_multi_read(self, pending: Pending) -> int:
        """A queued linearizable batch read or scan whose read index is applied: answered,
        or (0 not returned) the log index to wait for first: a batch read that finds a
        key expired with one of our single writes on it in flight waits for that write,
        as a single get does (``ttl_requests.wait_index``)."""
        req = pending.multi
        assert isinstance(req, (MultiGetRequest, ScanRequest))
        if isinstance(req, MultiGetRequest) and self.pending_writes and len(self.state.expiry):
            wait = max(wait_index(self.state, k, self.wall_ms, self.pending_writes)
                       for k in req.keys)
            if wait:
                return wait
        self._reply(pending.origin, pending.ident, self.answer_multi_read(req))
        return 0

    def _on_multi_write(self, origin: object, ident: bytes,
                        req: MultiPutRequest | MultiDeleteRequest, now: float, ts_ms: int) -> None:
        rid = req.request_id
        if self.replica.role is not Role.LEADER:
            self._reply(origin, ident, self.not_leader(rid))
            return
        if self.disk_full:
            self._reply(origin, ident, ErrorReply(rid, ErrorCode.DISK_FULL,
                                                  "the shard leader's disk is full; retry later"))
            return
        own = self.state.ownership
        refusals = [own.refusal(k) for k in req.keys]
        if any(refusals):
            wrong = any(r == ErrorCode.WRONG_SHARD for r in refusals)
            results = tuple(KeyResult(int(r) or _UNAVAILABLE) for r in refusals)
            self._reply(origin, ident, MultiReply(rid, req.keys, results,
                                                  self._ring_config() if wrong else None))
            return
        growth = 0
        if isinstance(req, MultiPutRequest):
            kind, values = MultiKind.PUT, req.values
            if self.quota.max_data_bytes:
                growth = self._batch_growth(req)
                why = self.quota.refusal(self.state.data_bytes, growth)
                if why:
                    self._reply(origin, ident, ErrorReply(rid, ErrorCode.QUOTA_EXCEEDED, why))
                    return
        else:
            kind, values = MultiKind.DELETE, ()
        cmd = MultiWrite(req.client_id, rid, req.lowest_pending, ts_ms, kind, req.keys, values)
        index = self._propose(cmd, self.pending_type(origin, ident, rid, command=cmd), now)
        if growth:
            self.quota.proposed(index, growth)

    def _batch_growth(self, req: MultiPutRequest) -> int:
        """Bytes the part would add (a key written twice counts its last value)."""
        last = dict(zip(req.keys, req.values, strict=True))
        get = self.state.get
        return sum(write_growth_bytes(k, v, get(k)) for k, v in last.items())
