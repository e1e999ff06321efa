"""Where a client's frames go: to a node, answered here, or refused with an error.

Theory of operation:

- Input is what the frontend ROUTER delivered: ``[client_ident, header, (blob)]``.
- Data requests (get, put, delete, cas) are routed from the header alone with
  ``codec.route_fields`` (one msgpack unpack, one blake3, one bisect): to the leader of
  ``ring.shard_for(key)``, or for a ``STALE`` get round-robin over the shard's live
  replicas. No dataclass is built on this path: it runs once per request.
- ``StatusRequest`` and ``PingRequest`` are decoded and answered by the broker itself.
- An admin request (``protocol.admin``: ring changes) goes to the leader of the shard its header names
  (position 4), like a data request but without a key; ``NO_LEADER`` if there is none.
  A ``WatchRequest`` (``protocol.watch``) is routed the same way.
- Refusals are typed ``ErrorReply`` frames, never exceptions:
  ``NO_LEADER`` (no ring yet or no live leader), ``BAD_REQUEST`` (undecodable, wrong frame
  count, not a client request; the request id is recovered best-effort with
  ``request_id_of``), ``TOO_LARGE`` (key over ``key_bytes_max``, value over
  ``value_bytes_max``, or a header too long to hold only a key and small fields).
- Batches and scans (``protocol.multikey``) are answered ``FAN_OUT``: the shell hands
  them to the fan-out table (``fanout.py``), which keeps what per-request state they
  need. Their headers may be up to ``MULTI_REQUEST_BYTES_MAX`` long (the type is peeked
  before unpacking, so a single-key request still cannot send a huge header).
- The router keeps no per-request state; the only state is the STALE round-robin counter.

Re-routing (``reroute``): a node refuses a data request for a key its ring gives another
shard and hands it back whole in a ``Redirect`` (with its ring, which the shell has the
table adopt first if newer). The item is routed again like a fresh request, except that
if the broker's ring still names the refusing shard, the client gets ``WRONG_SHARD`` with
the broker's ring epoch instead. Invariant: a request moves to another shard only when
the broker's ring disagrees with the refusing node's, and every hop after the first
needs a strictly newer ring, so a request never bounces between two shards (nor tours
the replicas of one, for a ``STALE`` get). Malformed items get ``BAD_REQUEST`` or, with
no client identity to answer, are dropped; both count in ``rejected``.

``route`` returns ``bytes`` (the node routing id to forward to), ``list[bytes]`` (reply
frames to send back after the client identity), or ``None`` (drop). Pure: no sockets, no
clock; ``now`` only ages the status rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from zkv.broker.node_table import NodeTable
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode, RemoteProtocolError
from zkv.protocol.limits import KEY_BYTES_MAX, MULTI_REQUEST_BYTES_MAX, VALUE_BYTES_MAX
from zkv.protocol.messages import (
    ADMIN_REQUEST_TYPES,
    DATA_REQUEST_TYPES,
    CasRequest,
    Consistency,
    ErrorReply,
    GetRequest,
    PingRequest,
    PongReply,
    PutRequest,
    StatusReply,
    StatusRequest,
)
from zkv.protocol.multikey import FANOUT_REQUEST_TYPES, peek_type
from zkv.protocol.watch import WatchRequest

#: Room in a data request header beside the key: client id, request id, small ints.
HEADER_OVERHEAD_BYTES = 4096

_BLOB_TYPES = frozenset({PutRequest.TYPE, CasRequest.TYPE})
_GET = GetRequest.TYPE
_STALE = int(Consistency.STALE)

_route_fields = codec.route_fields
_WATCH = WatchRequest.TYPE
_COUNTED_TYPES = (DATA_REQUEST_TYPES | ADMIN_REQUEST_TYPES | FANOUT_REQUEST_TYPES
                  | {PingRequest.TYPE, StatusRequest.TYPE, _WATCH})

RouteResult = bytes | list[bytes] | None
#: ``route``'s answer for a batch or a scan: the shell hands it to the fan-out table
#: (``fanout.py``). Compared by identity, never sent.
FAN_OUT: list[bytes] = []
_FANOUT_TYPES = FANOUT_REQUEST_TYPES


class Router:
    __slots__ = (
        "_table", "broker_id", "key_bytes_max", "value_bytes_max", "_header_bytes_max",
        "_rr", "_leaders", "_replicas", "rejected", "last_rejection", "wrong_shard",
        "op_counts", "error_counts",
    )  # fmt: skip

    def __init__(
        self,
        table: NodeTable,
        broker_id: str,
        key_bytes_max: int = KEY_BYTES_MAX,
        value_bytes_max: int = VALUE_BYTES_MAX,
    ) -> None:
        if key_bytes_max < 1 or value_bytes_max < 0:
            raise ValueError("key_bytes_max must be >= 1 and value_bytes_max >= 0")
        self._table = table
        self.broker_id = broker_id
        self.key_bytes_max = key_bytes_max
        self.value_bytes_max = value_bytes_max
        self._header_bytes_max = key_bytes_max + codec.INLINE_BLOB_BYTES_MAX + HEADER_OVERHEAD_BYTES
        self._rr = 0
        #: Requests refused as BAD_REQUEST or TOO_LARGE, and why the last one was: the
        #: shell reports these as rate-limited warnings instead of logging per message.
        self.rejected = 0
        self.last_rejection = ""
        #: Redirected requests answered WRONG_SHARD (the ring still names the refuser).
        self.wrong_shard = 0
        #: Requests routed per message type (-1: not a client request type; a re-routed
        #: request counts again) and error replies per code, for metrics (broker/stats.py)
        self.op_counts: dict[int, int] = dict.fromkeys((*_COUNTED_TYPES, -1), 0)
        self.error_counts: dict[int, int] = {}
        # The table mutates these dicts in place, so holding them saves lookups per call.
        self._leaders = table.leaders
        self._replicas = table.replicas

    def route(self, frames: list[bytes], now: float) -> RouteResult:
        """Decide for ``[client_ident, header, (blob)]``; never raises on any input."""
        n = len(frames)
        if n != 2 and n != 3:
            return self._bad(frames[1] if n > 1 else b"", "expected [header] or [header, blob]")
        header = frames[1]
        if len(header) > self._header_bytes_max and (
                peek_type(header) not in _FANOUT_TYPES
                or len(header) > MULTI_REQUEST_BYTES_MAX + HEADER_OVERHEAD_BYTES * 4):
            return self._too_large(header, "header too large")
        try:
            kind, key, consistency = _route_fields(header)
        except Exception:  # RemoteProtocolError, or TypeError on an unhashable type field
            return self._bad(header, "undecodable request")
        try:
            self.op_counts[kind] += 1
        except KeyError:
            self.op_counts[-1] += 1
        if kind not in DATA_REQUEST_TYPES:
            if kind in _FANOUT_TYPES:
                return FAN_OUT if n == 2 else self._bad(header, "unexpected value frame")
            if kind in ADMIN_REQUEST_TYPES or kind == _WATCH:  # routed by shard id
                return self._admin(header)
            return self._local(kind, frames, now)
        if len(key) > self.key_bytes_max:
            return self._too_large(header, "key too large")
        if n == 3:
            if kind not in _BLOB_TYPES:
                return self._bad(header, "unexpected value frame")
            if len(frames[2]) > self.value_bytes_max:
                return self._too_large(header, "value too large")
        # else a small value travels inside the header (codec.INLINE_BLOB_BYTES_MAX);
        # the header bound covers it and the node checks the exact limit
        ring = self._table.ring
        if ring is None:
            return self.no_leader(header, "no ring known yet")
        shard = ring.shard_for(key)
        if consistency == _STALE and kind == _GET:
            replicas = self._replicas.get(shard)
            if replicas:
                self._rr += 1
                return replicas[self._rr % len(replicas)]
        ident = self._leaders.get(shard)
        if ident is None:
            return self.no_leader(header, f"no leader for shard {shard}", ring.config.epoch)
        return ident

    def reroute(self, frames: Sequence[bytes], refused_by_shard: int, now: float) -> RouteResult:
        """Decide again for ``(client_ident, header[, blob])`` that a node of shard
        ``refused_by_shard`` refused as not its own; never raises on any input.

        Same results as ``route``, plus ``WRONG_SHARD`` when the ring still gives the key
        to the refusing shard, and ``None`` when there is no client identity to answer.
        Only data requests are ever redirected, so anything else is ``BAD_REQUEST``.
        """
        n = len(frames)
        if n < 1 or type(frames[0]) is not bytes or not frames[0]:
            self._reject("redirected request without a client identity")
            return None
        header = frames[1] if n > 1 else b""
        if type(header) is not bytes:
            self._reject("redirected request with a header that is not bytes")
            return None
        if (n != 2 and n != 3) or len(header) > self._header_bytes_max:
            return self.route(list(frames), now)  # BAD_REQUEST or TOO_LARGE
        if n == 3 and type(frames[2]) is not bytes:
            return self._bad(header, "redirected request with a value that is not bytes")
        try:
            kind, key, _ = _route_fields(header)
        except Exception:  # RemoteProtocolError, or TypeError on an unhashable type field
            return self._bad(header, "undecodable redirected request")
        if kind not in DATA_REQUEST_TYPES:
            return self._bad(header, f"message type {kind} is not a redirectable request")
        ring = self._table.ring
        if (
            ring is not None
            and len(key) <= self.key_bytes_max  # else route answers TOO_LARGE
            and ring.shard_for(key) == refused_by_shard
        ):
            self.wrong_shard += 1
            epoch = ring.config.epoch
            return self.error(
                codec.request_id_of(header), ErrorCode.WRONG_SHARD,
                f"key not owned by shard {refused_by_shard} at ring epoch {epoch}", epoch,
            )  # fmt: skip
        return self.route(list(frames), now)

    # ------------------------------------------------------------------ replies

    def error(
        self, request_id: int, code: ErrorCode, message: str = "", epoch: int = 0
    ) -> list[bytes]:
        self.error_counts[code] = self.error_counts.get(code, 0) + 1
        return codec.encode(ErrorReply(request_id, int(code), message, "", epoch))

    def no_leader(self, header: bytes, message: str = "no leader", epoch: int = 0) -> list[bytes]:
        """The reply for a request whose shard has no reachable leader."""
        return self.error(codec.request_id_of(header), ErrorCode.NO_LEADER, message, epoch)

    def unavailable(self, header: bytes, message: str) -> list[bytes]:
        return self.error(codec.request_id_of(header), ErrorCode.UNAVAILABLE, message)

    def _bad(self, header: bytes, message: str) -> list[bytes]:
        self._reject(message)
        rid = codec.request_id_of(header) if type(header) is bytes else 0
        return self.error(rid, ErrorCode.BAD_REQUEST, message)

    def _reject(self, message: str) -> None:
        self.rejected += 1
        self.last_rejection = message

    def _too_large(self, header: bytes, message: str) -> list[bytes]:
        self._reject(message)
        return self.error(codec.request_id_of(header), ErrorCode.TOO_LARGE, message)

    def _admin(self, header: bytes) -> RouteResult:
        try:
            shard = codec.admin_shard(header)
        except Exception:  # RemoteProtocolError, or anything odd in a hostile header
            return self._bad(header, "undecodable admin request")
        ident = self._leaders.get(shard)
        if ident is None:
            return self.no_leader(header, f"no leader for shard {shard}")
        return ident

    def _local(self, kind: int, frames: list[bytes], now: float) -> RouteResult:
        if kind != PingRequest.TYPE and kind != StatusRequest.TYPE:
            return self._bad(frames[1], f"message type {kind} is not a client request")
        try:
            msg = codec.decode(frames[1:])
        except RemoteProtocolError as exc:
            return self._bad(frames[1], str(exc))
        if type(msg) is PingRequest:
            return codec.encode(PongReply(msg.request_id, self.broker_id))
        assert type(msg) is StatusRequest  # decode checked the type code above
        table = self._table
        reply = StatusReply(
            msg.request_id,
            self.broker_id,
            tuple(table.status_rows(now)),
            table.ring_config(),
        )
        return codec.encode(reply)
