"""Watch, the client's pure part: where a watcher is in each shard, and the resume token.

Theory of operation (the node side: ``storage_node/watch_history.py``):

- A watcher polls every shard of the ring (``protocol/watch.py``). Its position in a
  shard is ``(after, skip)``: it has seen every matching event up to revision ``after``,
  and the first ``skip`` matching events of the next revision that has any (a token
  taken in the middle of a batch, whose events share one revision).
- ``absorb(reply)`` turns a reply into events, each carrying the token that resumes
  right after it, and moves the position to the reply's ``revision``. Events at or
  below the position are dropped, so a reply to an older or repeated poll (a resend
  after a broker loss) never repeats an event; and since a reply holds every matching
  event up to its revision, one that goes further never loses one.
- Token: ``"shard:after[+skip],..."``, shards in order, e.g. ``"0:17,1:9+2"``.
  ``start=None`` starts each shard "from now" (``WATCH_FROM_NOW``: its applied index);
  a token starts the shards it names from there, and a shard it does not name (added
  to the ring since) from its beginning.
- A compacted reply raises ``WatchCompacted`` with the token to restart from (that
  shard at the oldest revision it still has), after re-reading the keys.

Pure: no sockets, no clock. The loops: ``watch_sync.py`` (``KVClient.watch``) and
``watch_aio.py`` (``AsyncKVClient.watch``).
"""

from __future__ import annotations

from dataclasses import dataclass

from zkv.protocol.watch import (
    KIND_NAMES,
    WATCH_FROM_NOW,
    WatchCompacted,
    WatchReply,
    WatchRequest,
)

#: How long a node holds a poll with nothing to say, and events per reply.
POLL_WAIT_MS = 500
POLL_LIMIT = 500


@dataclass(frozen=True, slots=True)
class Event:
    """One change of a watched key. ``value`` is empty for a delete or an expiry;
    ``version`` is the key's version after a put, or at which it went away."""

    kind: str  # "put", "delete" or "expire"
    key: bytes
    value: bytes
    version: int
    shard: int
    revision: int
    token: str  # pass as ``start=`` to resume right after this event


def format_token(positions: dict[int, tuple[int, int]]) -> str:
    return ",".join(f"{s}:{a}+{k}" if k else f"{s}:{a}"
                    for s, (a, k) in sorted(positions.items()))


def parse_token(token: str) -> dict[int, tuple[int, int]]:
    """The inverse of ``format_token``; ``ValueError`` on anything else."""
    out: dict[int, tuple[int, int]] = {}
    if not token.strip():
        return out
    for part in token.split(","):
        shard, sep, pos = part.strip().partition(":")
        after, _, skip = pos.partition("+")
        if not sep:
            raise ValueError(f"bad watch token {part!r}: expected shard:revision")
        s, a, k = int(shard), int(after), int(skip or 0)
        if min(s, a, k) < 0:
            raise ValueError(f"bad watch token {part!r}: negative")
        out[s] = (a, k)
    return out


class WatchCursor:
    """A watcher's positions per shard; see the module docstring."""

    def __init__(self, prefix: bytes, exact: bool = False, start: str | None = None) -> None:
        self.prefix = prefix
        self.exact = exact
        self._from_token = start is not None
        #: shard -> (after, skip); a shard absent here starts "from now"
        self.positions: dict[int, tuple[int, int]] = {} if start is None else parse_token(start)
        self.shards: tuple[int, ...] = ()

    def set_shards(self, shards: tuple[int, ...]) -> None:
        """The ring's shards (from a status): new ones start from their beginning when
        watching from a token or once started, else from now; gone ones are dropped."""
        for s in shards:
            if s not in self.positions and (self._from_token or self.shards):
                self.positions[s] = (0, 0)
        self.positions = {s: p for s, p in self.positions.items() if s in shards}
        self.shards = tuple(shards)

    def token(self) -> str:
        return format_token(self.positions)

    def request(self, client_id: bytes, rid: int, shard: int,
                wait_ms: int = POLL_WAIT_MS, limit: int = POLL_LIMIT) -> WatchRequest:
        pos = self.positions.get(shard)
        after = WATCH_FROM_NOW if pos is None else pos[0]
        return WatchRequest(client_id, rid, shard, self.prefix, self.exact, after, limit,
                            0 if pos is None else wait_ms)

    def absorb(self, reply: WatchReply) -> list[Event]:
        """The new events of ``reply`` (see the module docstring); moves the position."""
        shard = reply.shard
        if shard not in self.shards:
            return []
        pos = self.positions.get(shard)
        if reply.compacted:
            restart = dict(self.positions)
            restart[shard] = (reply.revision, 0)
            raise WatchCompacted(
                f"shard {shard} no longer holds the events after revision "
                f"{pos[0] if pos else 0}: re-read, then watch from the token",
                format_token(restart))
        if pos is None:  # the "from now" answer: the position to start from
            self.positions[shard] = (reply.revision, 0)
            return []
        after, skip = pos
        fresh = [e for e in reply.events if e.revision > after]
        if skip and fresh:
            first = fresh[0].revision
            dropped = 0
            while dropped < skip and dropped < len(fresh) and fresh[dropped].revision == first:
                dropped += 1
            group_done = dropped
            fresh = fresh[dropped:]
        else:
            group_done = 0
        out: list[Event] = []
        for i, e in enumerate(fresh):
            last_of_rev = i + 1 == len(fresh) or fresh[i + 1].revision != e.revision
            if last_of_rev:
                self.positions[shard] = (e.revision, 0)
                group_done = 0
            else:
                group_done += 1
                self.positions[shard] = (e.revision - 1, group_done)
            out.append(Event(KIND_NAMES[e.kind] if 0 <= e.kind < len(KIND_NAMES) else "?",
                             e.key, e.value, e.version, shard, e.revision, self.token()))
        if reply.revision > self.positions[shard][0]:  # every match up to it was here
            self.positions[shard] = (reply.revision, 0)
        return out
