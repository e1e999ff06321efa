"""The exactly-once session table: part of the replicated state (RIFL-style).

Per client we keep the replies of its recent writes, by request id, so a retried write
is answered from the table instead of being applied twice (invariant 4).

Rules, applied identically on every replica (they depend only on the log):
- Time is the largest leader-stamped ``ts_ms`` seen so far, never a local clock; taking
  the max keeps it monotonic across leaders whose clocks disagree.
- A client's ``floor``: its request ids below it are forgotten. It rises to each
  command's ``lowest_pending`` (the client no longer awaits anything below) and past any
  reply dropped by the per-client bound.
- Lookup of (client, request id): a cached reply is a duplicate; an uncached id below
  the floor is *expired* (it may have been applied: answering SESSION_EXPIRED is the
  only safe answer); anything else is new.
- Bounds: ``replies_per_client_max`` replies per client (the oldest dropped first) and
  ``clients_max`` clients (the least recently active evicted); a client idle for
  ``session_ttl_ms`` is expired. A client whose session is gone is new again: a retry
  of a write it sent before that is not recognised, which is why the TTL (an hour) is
  far longer than any client deadline.
- Clients are kept in order of last activity, so expiry and eviction pop from the front.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack

from zkv.protocol.messages import CasReply, DeleteReply, ExpireReply, PutReply
from zkv.protocol.multikey import KeyResult


@dataclass(frozen=True, slots=True)
class MultiCached:
    """The remembered outcome of a batch write's parts under one request id
    (``multikey_state.py``): per key, a 64-bit hash of the key (``key_hash``, not the
    key: 8 bytes however long the key) and its result."""

    request_id: int
    hashes: tuple[int, ...]
    results: tuple[KeyResult, ...]

    def merged(self, other: MultiCached) -> MultiCached:
        """Both records' keys (this one's result for a key in both)."""
        mine = set(self.hashes)
        extra = [(h, r) for h, r in zip(other.hashes, other.results, strict=True)
                 if h not in mine]
        return MultiCached(self.request_id, self.hashes + tuple(h for h, _ in extra),
                           self.results + tuple(r for _, r in extra))


#: A batch's cached reply in a snapshot: ``[MULTI_CACHED_TYPE, request_id, False, blob]``.
MULTI_CACHED_TYPE = 110

SessionReply = PutReply | DeleteReply | CasReply | ExpireReply | MultiCached

REPLIES_PER_CLIENT_MAX = 2048  # >= the SDK's in-flight bound (1024)
CLIENTS_MAX = 20_000  # with the reply bound: a hard ceiling on session memory
SESSION_TTL_MS = 3_600_000


class SessionStatus(enum.Enum):
    NEW = "new"  # apply the command
    EXPIRED = "expired"  # answer SESSION_EXPIRED, do not apply


class _Session:
    __slots__ = ("floor", "last_active_ms", "replies")

    def __init__(self, floor: int, last_active_ms: int) -> None:
        self.floor = floor
        self.last_active_ms = last_active_ms
        self.replies: dict[int, SessionReply] = {}  # insertion order = order applied


# Replies in a snapshot: [type, request_id, flag, version] (flag: deleted / swapped);
# a batch's: [MULTI_CACHED_TYPE, request_id, False, msgpack [[hash, code, found, version]...]].
def _reply_fields(r: SessionReply) -> tuple[int, int, bool, int | bytes]:
    if isinstance(r, MultiCached):
        rows = [[h, x.code, x.found, x.version] for h, x in zip(r.hashes, r.results,
                                                                 strict=True)]
        blob: bytes = msgpack.packb(rows, use_bin_type=True)
        return MULTI_CACHED_TYPE, r.request_id, False, blob
    if isinstance(r, PutReply):
        return PutReply.TYPE, r.request_id, False, r.version
    if isinstance(r, DeleteReply):
        return DeleteReply.TYPE, r.request_id, r.deleted, r.version
    if isinstance(r, ExpireReply):  # expire / persist (TTL)
        return ExpireReply.TYPE, r.request_id, r.found, r.version
    return CasReply.TYPE, r.request_id, r.swapped, r.version


def _multi_from(request_id: int, blob: Any) -> MultiCached:
    try:
        rows = msgpack.unpackb(blob, raw=False)
        hashes = tuple(int(h) for h, _c, _f, _v in rows)
        results = tuple(KeyResult(int(c), bool(f), int(v)) for _h, c, f, v in rows)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ValueError(f"bad cached batch reply: {exc.__class__.__name__}") from exc
    return MultiCached(request_id, hashes, results)


def _reply_from(kind: int, request_id: int, flag: bool, version: Any) -> SessionReply:
    if kind == MULTI_CACHED_TYPE:
        return _multi_from(request_id, version)
    if kind == PutReply.TYPE:
        return PutReply(request_id, version)
    if kind == DeleteReply.TYPE:
        return DeleteReply(request_id, flag, version)
    if kind == CasReply.TYPE:
        return CasReply(request_id, flag, version)
    if kind == ExpireReply.TYPE:
        return ExpireReply(request_id, flag, version)
    raise ValueError(f"unknown cached reply type {kind}")


class SessionTable:
    """Replies of recent writes per client; see the module docstring for the rules."""

    def __init__(
        self,
        replies_per_client_max: int = REPLIES_PER_CLIENT_MAX,
        clients_max: int = CLIENTS_MAX,
        session_ttl_ms: int = SESSION_TTL_MS,
    ) -> None:
        if replies_per_client_max < 1 or clients_max < 1 or session_ttl_ms < 1:
            raise ValueError("session bounds must be >= 1")
        self.replies_per_client_max = replies_per_client_max
        self.clients_max = clients_max
        self.session_ttl_ms = session_ttl_ms
        self.now_ms = 0
        self._clients: OrderedDict[bytes, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    def lookup(self, client_id: bytes, request_id: int, ts_ms: int) -> SessionReply | SessionStatus:
        """Advance time to ``ts_ms``, expire idle clients, and classify the request:
        its cached reply (a duplicate), ``EXPIRED`` or ``NEW``."""
        if ts_ms > self.now_ms:
            self.now_ms = ts_ms
            self._expire()
        s = self._clients.get(client_id)
        if s is None:
            return SessionStatus.NEW
        s.last_active_ms = self.now_ms
        self._clients.move_to_end(client_id)
        cached = s.replies.get(request_id)
        if cached is not None:
            return cached
        return SessionStatus.EXPIRED if request_id < s.floor else SessionStatus.NEW

    def record(
        self, client_id: bytes, request_id: int, lowest_pending: int, reply: SessionReply
    ) -> None:
        """Remember ``reply`` for a write just applied (after ``lookup`` said NEW)."""
        s = self._clients.get(client_id)
        if s is None:
            while len(self._clients) >= self.clients_max:
                self._clients.popitem(last=False)
            s = self._clients[client_id] = _Session(lowest_pending, self.now_ms)
        else:
            s.last_active_ms = self.now_ms
            self._clients.move_to_end(client_id)
        replies = s.replies
        if lowest_pending > s.floor:
            s.floor = lowest_pending
            # Ids arrive mostly in order, so the prunable ones sit at the front; an
            # out-of-order straggler left behind is harmless and goes with the bound.
            while replies:
                oldest = next(iter(replies))
                if oldest >= lowest_pending:
                    break
                del replies[oldest]
        if request_id >= s.floor:
            replies[request_id] = reply
        while len(replies) > self.replies_per_client_max:
            oldest = next(iter(replies))
            del replies[oldest]
            if oldest >= s.floor:
                s.floor = oldest + 1

    def _expire(self) -> None:
        deadline = self.now_ms - self.session_ttl_ms
        clients = self._clients
        while clients:
            s = next(iter(clients.values()))
            if s.last_active_ms > deadline:
                break
            clients.popitem(last=False)

    # ------------------------------------------------------------------ snapshots

    def to_state(self) -> list[Any]:
        """Plain msgpack-able form: ``[now_ms, [client_id, floor, last_active_ms,
        [type, request_id, flag, version, ...]], ...]`` in activity order."""
        clients = []
        for cid, s in self._clients.items():
            flat: list[Any] = []
            for r in s.replies.values():
                flat.extend(_reply_fields(r))
            clients.append([cid, s.floor, s.last_active_ms, flat])
        return [self.now_ms, clients]

    def load_state(self, state: Any) -> None:
        """Replace the table by ``to_state`` output (lists or tuples). Raises
        ``ValueError`` on a malformed state and leaves the table unchanged."""
        try:
            now_ms, clients = state
            table: OrderedDict[bytes, _Session] = OrderedDict()
            for cid, floor, last_active_ms, flat in clients:
                if type(cid) is not bytes or len(flat) % 4:
                    raise ValueError("bad session entry")
                s = _Session(int(floor), int(last_active_ms))
                for i in range(0, len(flat), 4):
                    reply = _reply_from(*flat[i : i + 4])
                    s.replies[reply.request_id] = reply
                table[cid] = s
            now = int(now_ms)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed session table state: {exc}") from exc
        self.now_ms = now
        self._clients = table

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SessionTable):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]


def merge_session_state(table: SessionTable, state: Any) -> None:
    """Fold another shard's ``to_state`` output into ``table`` (a migration moves keys
    and, with them, the replies of writes to them). Per client: the union of cached
    replies, the higher floor (request ids below a client's ``lowest_pending`` will
    never be retried, so the max is safe) and the later activity. Deterministic, and
    idempotent: merging the same state twice changes nothing more. Raises
    ``ValueError`` on a malformed state and leaves the table unchanged."""
    other = SessionTable(table.replies_per_client_max, table.clients_max, table.session_ttl_ms)
    other.load_state(state)
    clients = table._clients
    for cid, s in other._clients.items():
        mine = clients.get(cid)
        if mine is None:
            while len(clients) >= table.clients_max:
                clients.popitem(last=False)
            mine = clients[cid] = _Session(s.floor, s.last_active_ms)
        mine.floor = max(mine.floor, s.floor)
        mine.last_active_ms = max(mine.last_active_ms, s.last_active_ms)
        merged = {rid: r for rid, r in mine.replies.items() if rid >= mine.floor}
        for rid, r in s.replies.items():
            if rid >= mine.floor and rid not in merged:
                merged[rid] = r
            elif rid >= mine.floor:  # one batch's parts applied on both shards: keep both
                held = merged[rid]
                if isinstance(held, MultiCached) and isinstance(r, MultiCached):
                    merged[rid] = held.merged(r)
        ordered = sorted(merged.items())
        keep = ordered[-table.replies_per_client_max:]
        if len(keep) < len(ordered):  # dropped by the bound: now forgotten, so expired
            mine.floor = max(mine.floor, ordered[len(ordered) - len(keep) - 1][0] + 1)
        mine.replies = dict(keep)
    table.now_ms = max(table.now_ms, other.now_ms)
