"""Scatter-gather of batches and scans: split per shard, send at once, merge. Pure.

Theory of operation. The broker otherwise keeps no per-request state; a batch or a
scan needs some, bounded here: at most ``FANOUT_PENDING_MAX`` fan-outs in flight holding
at most ``FANOUT_HELD_BYTES_MAX`` bytes of requests and answers between them, each
forgotten by ``FANOUT_TIMEOUT_S`` (the SDK has resent by then). A fan-out sends each
shard's part to that shard's leader under its own ident (``FANOUT_MAGIC`` + fan-out id
+ shard + round), so a reply is matched without decoding anything else; a reply for a
fan-out or a part that is no longer awaited is dropped.

Batches (``MultiGetRequest``, ``MultiPutRequest``, ``MultiDeleteRequest``):
- Split by the broker's ring: one part per shard, the keys it owns, in request order,
  with the client's own client id and request id (a write's part is deduplicated by
  that shard's session table when the SDK resends).
- A shard with no leader: its keys get ``NO_LEADER`` at once; the others still go.
- A part answered by ``MultiReply``: results are taken by key; answered by an
  ``ErrorReply``: every key of the part gets that code (the SDK retries retryable codes
  for those keys only). Merged values stop at ``MULTI_REPLY_BYTES_MAX`` bytes (the rest
  ``UNAVAILABLE``, asked again by the SDK). Expiry: keys still awaited get ``TIMEOUT``.
- Never re-split here: a key refused as another shard's comes back ``WRONG_SHARD``, the
  shell has adopted the node's newer ring by then, and the SDK's next round splits
  again. So a part is sent once per round and the broker never loops.

Scans (``ScanRequest``): the same page request to the leader of every shard of the
ring; any shard without a leader fails the page (``NO_LEADER``, retried by the SDK). A
page is accepted only if every shard answered under the same ring epoch and the shards
asked are exactly that ring's shards: then each key had exactly one owner among the
answers, so no key is missing or doubled. Otherwise (a ring change landed between the
answers) the page is asked again of the shards of the broker's ring, which the shell
has by then updated from the replies, at most ``SCAN_ROUNDS_MAX`` times, then
``UNAVAILABLE``. Accepted pages are merged by ``merge_pages``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.limits import (
    MULTI_KEYS_MAX,
    MULTI_REPLY_BYTES_MAX,
    MULTI_REQUEST_BYTES_MAX,
    SCAN_LIMIT_MAX,
)
from zkv.protocol.messages import Consistency, ErrorReply, Message
from zkv.protocol.multikey import (
    FANOUT_MAGIC,
    FanOutRequest,
    KeyResult,
    MultiDeleteRequest,
    MultiGetRequest,
    MultiPutRequest,
    MultiReply,
    MultiRequest,
    ScanReply,
    ScanRequest,
    request_bytes,
)
from zkv.protocol.ring import Ring

#: Fan-outs awaiting parts at once; beyond, a new one is answered UNAVAILABLE.
FANOUT_PENDING_MAX = 4096
#: A fan-out still incomplete after this is answered (TIMEOUT) and forgotten.
FANOUT_TIMEOUT_S = 3.0
#: Times a scan page is asked again because its shards answered under different rings.
SCAN_ROUNDS_MAX = 3
#: Bytes of requests and partial answers the fan-outs in flight may hold in all; beyond,
#: a new one is answered UNAVAILABLE (a batch may carry 16 MiB: 4,096 of them must not).
FANOUT_HELD_BYTES_MAX = 256 * 1024 * 1024

#: magic, fan-out id, shard, round
PART_IDENT_BYTES = len(FANOUT_MAGIC) + 8 + 4 + 2


def part_ident(fid: int, shard: int, round_: int) -> bytes:
    return (FANOUT_MAGIC + fid.to_bytes(8, "big") + shard.to_bytes(4, "big")
            + round_.to_bytes(2, "big"))


def parse_ident(ident: bytes) -> tuple[int, int, int] | None:
    """``(fan-out id, shard, round)`` of a part ident, None if it is not one."""
    if len(ident) != PART_IDENT_BYTES or not ident.startswith(FANOUT_MAGIC):
        return None
    n = len(FANOUT_MAGIC)
    return (int.from_bytes(ident[n:n + 8], "big"), int.from_bytes(ident[n + 8:n + 12], "big"),
            int.from_bytes(ident[n + 12:], "big"))


def split_keys(keys: tuple[bytes, ...], ring: Ring) -> dict[int, list[int]]:
    """Shard -> positions of its keys in ``keys`` (ascending)."""
    parts: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        parts.setdefault(ring.shard_for(key), []).append(i)
    return parts


def part_request(req: MultiRequest, positions: list[int]) -> MultiRequest:
    """The part of ``req`` holding the keys at ``positions``."""
    keys = tuple(req.keys[i] for i in positions)
    if isinstance(req, MultiGetRequest):
        return MultiGetRequest(req.client_id, req.request_id, keys, req.consistency)
    if isinstance(req, MultiPutRequest):
        return MultiPutRequest(req.client_id, req.request_id, req.lowest_pending, keys,
                               tuple(req.values[i] for i in positions))
    return MultiDeleteRequest(req.client_id, req.request_id, req.lowest_pending, keys)


def merge_pages(pages: list[ScanReply], limit: int
                ) -> tuple[list[bytes], list[bytes], list[int], bytes | None]:
    """k-way merge of shard pages: ``(keys, values, versions, next_after)``.

    Only keys up to the smallest ``next_after`` of the pages are known complete (each
    shard reported every key it owns up to its own ``next_after``), so the page keeps
    those, at most ``limit``, and the cursor is the last key kept when more remain, else
    that bound (None when every shard is exhausted)."""
    bound = min((p.next_after for p in pages if p.next_after is not None), default=None)
    with_values = any(p.values for p in pages)

    def rows(p: ScanReply) -> Iterator[tuple[bytes, bytes, int]]:
        values = p.values if with_values and p.values else [b""] * len(p.keys)
        return zip(p.keys, values, p.versions, strict=True)

    keys: list[bytes] = []
    values: list[bytes] = []
    versions: list[int] = []
    more = False
    for key, value, version in heapq.merge(*(rows(p) for p in pages)):
        if bound is not None and key > bound:
            break
        if len(keys) >= limit:
            more = True
            break
        keys.append(key)
        values.append(value)
        versions.append(version)
    next_after = keys[-1] if more else bound
    return keys, values if with_values else [], versions, next_after


@dataclass(slots=True)
class FanOutput:
    """What the shell must do: ``sends`` ``(node ident, part ident, frames)`` to the
    backend, ``replies`` ``(client ident, frames)`` to the frontend."""

    sends: list[tuple[bytes, bytes, list[bytes]]] = field(default_factory=list)
    replies: list[tuple[bytes, list[bytes]]] = field(default_factory=list)


@dataclass(slots=True)
class _FanOut:
    fid: int
    client: bytes
    stamp: bytes
    req: FanOutRequest
    deadline: float
    awaiting: dict[int, list[int]]  # shard -> key positions (a scan: [])
    results: list[KeyResult | None]
    pages: list[ScanReply] = field(default_factory=list)
    queried: frozenset[int] = frozenset()
    round: int = 0
    value_bytes: int = 0
    held: int = 0  # bytes counted in FanOutTable.held_bytes


class FanOutTable:
    """The fan-outs in flight; see the module docstring for the rules."""

    def __init__(self, key_bytes_max: int, pending_max: int = FANOUT_PENDING_MAX,
                 timeout_s: float = FANOUT_TIMEOUT_S,
                 held_bytes_max: int = FANOUT_HELD_BYTES_MAX) -> None:
        self.key_bytes_max = key_bytes_max
        self.pending_max = pending_max
        self.timeout_s = timeout_s
        self.held_bytes_max = held_bytes_max
        #: bytes the fan-outs in flight hold: their requests and the answers so far
        self.held_bytes = 0
        self._fans: dict[int, _FanOut] = {}
        self._next_fid = 1
        self._rr = 0
        #: counters for logs and tests
        self.expired = 0
        self.scan_rounds = 0

    def __len__(self) -> int:
        return len(self._fans)

    # ------------------------------------------------------------------ start

    def start(self, client: bytes, stamp: bytes, req: FanOutRequest, now: float,
              ring: Ring | None, leaders: Mapping[int, bytes],
              replicas: Mapping[int, tuple[bytes, ...]] | None = None) -> FanOutput:
        """A client's batch or scan: its parts to send, or an answer at once.
        ``stamp``: the role byte a secure broker puts before the part idents."""
        out = FanOutput()
        why = self._refusal(req, ring)
        if why is not None:
            out.replies.append((client, codec.encode(why)))
            return out
        assert ring is not None
        fid = self._next_fid
        self._next_fid += 1
        fan = _FanOut(fid, client, stamp, req, now + self.timeout_s, {}, [])
        self._hold(fan, len(req.prefix) if isinstance(req, ScanRequest) else request_bytes(req))
        if isinstance(req, ScanRequest):
            self._fans[fid] = fan
            self._send_scan(fan, ring, leaders, out)
            return out
        fan.results = [None] * len(req.keys)
        stale = req.consistency is Consistency.STALE if isinstance(req, MultiGetRequest) else False
        for shard, positions in split_keys(req.keys, ring).items():
            node = self._pick(shard, leaders, replicas if stale else None)
            if node is None:
                for i in positions:
                    fan.results[i] = KeyResult(int(ErrorCode.NO_LEADER))
                continue
            fan.awaiting[shard] = positions
            frames = codec.encode(part_request(req, positions))
            out.sends.append((node, stamp + part_ident(fid, shard, 0), frames))
        if fan.awaiting:
            self._fans[fid] = fan
        else:
            self._forget(fan)
            self._finish(fan, out)
        return out

    def _refusal(self, req: FanOutRequest, ring: Ring | None) -> ErrorReply | None:
        rid = req.request_id
        if len(self._fans) >= self.pending_max or self.held_bytes >= self.held_bytes_max:
            return ErrorReply(rid, ErrorCode.UNAVAILABLE, "broker busy with batches; retry")
        if isinstance(req, ScanRequest):
            if not 1 <= req.limit <= SCAN_LIMIT_MAX:
                return ErrorReply(rid, ErrorCode.BAD_REQUEST,
                                  f"scan limit must be 1..{SCAN_LIMIT_MAX}")
        elif len(req.keys) > MULTI_KEYS_MAX:
            return ErrorReply(rid, ErrorCode.TOO_LARGE,
                              f"{len(req.keys)} keys in one batch; the limit is {MULTI_KEYS_MAX}")
        elif any(len(k) > self.key_bytes_max for k in req.keys):
            return ErrorReply(rid, ErrorCode.TOO_LARGE, "a key is over the key limit")
        elif not isinstance(req, MultiGetRequest) and request_bytes(req) > MULTI_REQUEST_BYTES_MAX:
            return ErrorReply(rid, ErrorCode.TOO_LARGE,
                              f"batch over {MULTI_REQUEST_BYTES_MAX} bytes")
        elif isinstance(req, MultiPutRequest) and len(req.values) != len(req.keys):
            return ErrorReply(rid, ErrorCode.BAD_REQUEST, "keys and values differ in number")
        if ring is None:
            return ErrorReply(rid, ErrorCode.NO_LEADER, "no ring known yet")
        return None

    def _hold(self, fan: _FanOut, n: int) -> None:
        fan.held += n
        self.held_bytes += n

    def _forget(self, fan: _FanOut) -> None:
        self._fans.pop(fan.fid, None)
        self.held_bytes -= fan.held
        fan.held = 0

    def _pick(self, shard: int, leaders: Mapping[int, bytes],
              replicas: Mapping[int, tuple[bytes, ...]] | None) -> bytes | None:
        if replicas is not None:
            live = replicas.get(shard)
            if live:
                self._rr += 1
                return live[self._rr % len(live)]
        return leaders.get(shard)

    def _send_scan(self, fan: _FanOut, ring: Ring, leaders: Mapping[int, bytes],
                   out: FanOutput) -> None:
        shards = ring.config.shards
        missing = [s for s in shards if s not in leaders]
        if missing:
            self._forget(fan)
            out.replies.append((fan.client, codec.encode(ErrorReply(
                fan.req.request_id, ErrorCode.NO_LEADER, f"no leader for shard {missing[0]}",
                epoch=ring.config.epoch))))
            return
        fan.queried = frozenset(shards)
        fan.pages = []
        fan.awaiting = {s: [] for s in shards}
        frames = codec.encode(fan.req)
        for shard in shards:
            out.sends.append((leaders[shard], fan.stamp + part_ident(fan.fid, shard, fan.round),
                              frames))

    # ------------------------------------------------------------------ replies

    def on_reply(self, ident: bytes, reply: Message, now: float, ring: Ring | None,
                 leaders: Mapping[int, bytes]) -> FanOutput:
        """A node's answer to a part (``ident`` without the role stamp). ``ring`` is the
        broker's ring after adopting any ring the reply carried."""
        out = FanOutput()
        parsed = parse_ident(ident)
        if parsed is None:
            return out
        fid, shard, round_ = parsed
        fan = self._fans.get(fid)
        if fan is None or round_ != fan.round or shard not in fan.awaiting:
            return out  # late, repeated, or from an earlier round: dropped
        positions = fan.awaiting.pop(shard)
        if isinstance(fan.req, ScanRequest):
            self._scan_part(fan, reply, out, ring, leaders)
            return out
        self._multi_part(fan, positions, reply)
        if not fan.awaiting:
            self._forget(fan)
            self._finish(fan, out)
        return out

    def _multi_part(self, fan: _FanOut, positions: list[int], reply: Message) -> None:
        keys = fan.req.keys  # type: ignore[union-attr]
        if isinstance(reply, MultiReply):
            by_key = dict(zip(reply.keys, reply.results, strict=False))
            for i in positions:
                r = by_key.get(keys[i])
                if r is None:
                    r = KeyResult(int(ErrorCode.UNAVAILABLE))
                elif r.value:
                    fan.value_bytes += len(r.value)
                    self._hold(fan, len(r.value))
                    if fan.value_bytes > MULTI_REPLY_BYTES_MAX:
                        r = KeyResult(int(ErrorCode.UNAVAILABLE))
                fan.results[i] = r
            return
        code = reply.code if isinstance(reply, ErrorReply) else int(ErrorCode.INTERNAL)
        for i in positions:
            fan.results[i] = KeyResult(code)

    def _scan_part(self, fan: _FanOut, reply: Message, out: FanOutput, ring: Ring | None,
                   leaders: Mapping[int, bytes]) -> None:
        req = fan.req
        assert isinstance(req, ScanRequest)
        if not isinstance(reply, ScanReply):
            self._forget(fan)
            err = reply if isinstance(reply, ErrorReply) else ErrorReply(
                req.request_id, ErrorCode.INTERNAL, f"unexpected {type(reply).__name__}")
            out.replies.append((fan.client, codec.encode(
                ErrorReply(req.request_id, err.code, err.message, err.leader_hint, err.epoch))))
            return
        fan.pages.append(reply)
        self._hold(fan, sum(map(len, reply.keys)) + sum(map(len, reply.values)))
        if fan.awaiting:
            return
        epochs = {p.epoch for p in fan.pages}
        ring_shards = {frozenset(p.ring.shards) for p in fan.pages if p.ring is not None}
        if len(epochs) == 1 and ring_shards == {fan.queried}:
            self._forget(fan)
            keys, values, versions, next_after = merge_pages(fan.pages, req.limit)
            out.replies.append((fan.client, codec.encode(ScanReply(
                req.request_id, tuple(keys), tuple(values), tuple(versions), next_after,
                epochs.pop()))))
            return
        self.scan_rounds += 1
        fan.round += 1
        if fan.round > SCAN_ROUNDS_MAX or ring is None:
            self._forget(fan)
            out.replies.append((fan.client, codec.encode(ErrorReply(
                req.request_id, ErrorCode.UNAVAILABLE, "the ring is changing; retry"))))
            return
        self._send_scan(fan, ring, leaders, out)

    def _finish(self, fan: _FanOut, out: FanOutput) -> None:
        req = fan.req
        assert not isinstance(req, ScanRequest)
        timeout = KeyResult(int(ErrorCode.TIMEOUT))
        results = tuple(timeout if r is None else r for r in fan.results)
        out.replies.append((fan.client, codec.encode(MultiReply(req.request_id, req.keys,
                                                                results))))

    # ------------------------------------------------------------------ expiry

    def expire(self, now: float) -> FanOutput:
        """Answer and forget the fan-outs past their deadline (a part never answered:
        its node died or its reply was lost)."""
        out = FanOutput()
        late = [fan for fan in self._fans.values() if fan.deadline <= now]
        for fan in late:
            self._forget(fan)
            self.expired += 1
            if isinstance(fan.req, ScanRequest):
                out.replies.append((fan.client, codec.encode(ErrorReply(
                    fan.req.request_id, ErrorCode.TIMEOUT, "a shard did not answer in time"))))
            else:
                self._finish(fan, out)
        return out
