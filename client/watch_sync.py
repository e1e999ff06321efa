"""``KVClient.watch``: the synchronous watch loop (the cursor: ``watch.py``).

The loop keeps one poll outstanding per shard on a connection of its own (so a watch
never holds the client's lock while a node holds its poll), sends a new poll for a
shard as soon as its reply is in, and yields events as replies come. Failures:
- a retryable error (``NO_LEADER``, ``NOT_LEADER``, ``UNAVAILABLE``...: a failover in
  progress) polls that shard again after ``RETRY_PAUSE_S``;
- a poll unanswered ``SILENCE_S`` after its wait is sent again; if nothing at all came
  on the connection for ``SILENCE_S`` either, the connection (or its broker) is presumed
  dead, closed, and the loop moves to the next broker and polls every shard again from
  its position, so nothing is lost and, by the cursor's rule, nothing repeats;
- ``WRONG_SHARD`` (a shard left the ring): the shard set is read again from a status.
The shard set is also read again every ``SHARDS_REFRESH_S``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from zkv.client.calls import check_reply
from zkv.client.watch import POLL_WAIT_MS, Event, WatchCursor
from zkv.protocol import codec
from zkv.protocol.errors import (
    RETRYABLE_CODES,
    ErrorCode,
    KVError,
    RemoteProtocolError,
)
from zkv.protocol.messages import ErrorReply
from zkv.protocol.watch import WatchReply

if TYPE_CHECKING:
    from zkv.client.connection import Connection
    from zkv.client.sdk import KVClient

RETRY_PAUSE_S = 0.2
SILENCE_S = 2.0
SHARDS_REFRESH_S = 10.0


def ring_shards(client: KVClient) -> tuple[int, ...]:
    """The shards of the broker's ring (empty while it knows none)."""
    return tuple(int(s) for s in client.status().get("ring", {}).get("shards", ()))


def watch_events(client: KVClient, prefix: bytes, exact: bool,
                 start: str | None) -> Iterator[Event]:
    """Events on ``prefix`` (the key, with ``exact``) forever; see the module docstring."""
    cursor = WatchCursor(prefix, exact, start)
    clock = client._clock
    # Which broker to poll through is read when the connection is made, after the
    # status call that reads the ring: a new client whose first broker is dead has
    # moved past it by then, and the watch must not wait out a poll's silence there.
    endpoint: int | None = None
    conn: Connection | None = None
    outstanding: dict[int, tuple[int, float]] = {}  # shard -> (request id, deadline)
    resume_at: dict[int, float] = {}  # shard -> when to poll it again after an error
    refresh_at = 0.0
    last_rx = 0.0  # when the connection last delivered anything
    try:
        while True:
            now = clock.now()
            if now >= refresh_at or not cursor.shards:
                try:
                    cursor.set_shards(ring_shards(client))
                except KVError:
                    pass
                refresh_at = now + SHARDS_REFRESH_S
                for gone in set(outstanding) - set(cursor.shards):
                    del outstanding[gone]  # a shard that left the ring: stop waiting
                if not cursor.shards:
                    clock.sleep(RETRY_PAUSE_S)
                    continue
            if conn is None:
                if endpoint is None:
                    endpoint = client._endpoint_index
                conn = client._connect(client.endpoints[endpoint])
                outstanding.clear()
                last_rx = now
            for shard in cursor.shards:
                if shard not in outstanding and resume_at.get(shard, 0.0) <= now:
                    rid = client.new_request_id()
                    req = cursor.request(client.client_id, rid, shard)
                    conn.send(codec.encode(req))
                    outstanding[shard] = (rid, now + req.wait_ms / 1000 + SILENCE_S)
            until = min([d for _, d in outstanding.values()]
                        + [t for t in resume_at.values() if t > now] + [now + SILENCE_S])
            frames = conn.recv(until)
            if frames is None:
                now = clock.now()
                late = [s for s, (_, d) in outstanding.items() if d <= now]
                if late and now - last_rx >= SILENCE_S:
                    conn.close()  # nothing at all for a while: the next broker
                    conn = None
                    endpoint = ((client._endpoint_index if endpoint is None else endpoint)
                                + 1) % len(client.endpoints)
                for shard in late:  # lost while others answer: poll again here
                    del outstanding[shard]
                continue
            last_rx = clock.now()
            try:
                reply = codec.decode(frames)
            except RemoteProtocolError:
                continue
            got = _shard_of(reply, outstanding)
            if got is None:
                continue  # a reply to a poll given up on
            del outstanding[got]
            if isinstance(reply, ErrorReply):
                if reply.code == ErrorCode.WRONG_SHARD:
                    refresh_at = 0.0
                elif reply.code not in RETRYABLE_CODES:
                    check_reply(reply, WatchReply)  # raises its error
                resume_at[got] = clock.now() + RETRY_PAUSE_S
                continue
            if isinstance(reply, WatchReply):
                yield from cursor.absorb(reply)
    finally:
        if conn is not None:
            conn.close()


def _shard_of(reply: object, outstanding: dict[int, tuple[int, float]]) -> int | None:
    rid = getattr(reply, "request_id", None)
    for shard, (want, _) in outstanding.items():
        if want == rid:
            return shard
    return None


__all__ = ["POLL_WAIT_MS", "watch_events", "ring_shards"]


class WatchCalls:
    """``watch`` and ``watch_key`` of ``KVClient`` (a mixin)."""

    def watch(self, prefix: str | bytes, start: str | None = None) -> Iterator[Event]:
        """Every put, delete and expiry of the keys starting with ``prefix``, as they
        commit, forever (break out of the loop to stop). ``start``: a token (an event's
        ``.token``) to resume right after that event, None for "from now". In commit
        order per shard, so in version order per key. Raises ``WatchCompacted`` if the
        history no longer reaches back to ``start`` (its ``.token``: where to restart,
        after re-reading the keys). Uses a connection of its own."""
        return watch_events(self, _wire(prefix), False, start)  # type: ignore[arg-type]

    def watch_key(self, key: str | bytes, start: str | None = None) -> Iterator[Event]:
        """``watch`` for exactly one key."""
        return watch_events(self, _wire(key), True, start)  # type: ignore[arg-type]


def _wire(k: str | bytes) -> bytes:
    return k.encode() if isinstance(k, str) else bytes(k)
