"""How a storage node answers watch polls. Pure (a mixin of ``RequestCore``).

Rules (the events and their revisions: ``watch_history.py``; the messages:
``protocol/watch.py``):
- A ``WatchRequest`` for another shard answers ``WRONG_SHARD``; a ``limit`` outside
  1..``WATCH_LIMIT_MAX``, a negative ``after`` or ``wait_ms``: ``BAD_REQUEST``.
- Any replica answers (every replica recorded the same events under the same
  revisions; the broker sends polls to the leader, which is the most up to date). A
  replica behind the watcher's token simply has no events after it yet.
- ``after`` = ``WATCH_FROM_NOW``: answered at once, empty, at the applied index.
- ``after`` below the history's floor: ``WatchReply(compacted=True, revision=floor)``.
- Matching events after ``after``: answered at once (a page, ``WatchHistory.poll``).
- None: the poll is parked until an applied entry brings a matching event
  (``serve_watches``, after each loop turn's applies) or ``wait_ms`` (capped at
  ``WATCH_WAIT_MS_MAX``) passes (``expire_watches``, from ``tick``): then it is
  answered empty, with ``revision`` = what was looked at, so the next poll does not
  look again. A parked poll remembers how far it looked: a turn only looks at the
  events applied since. At most ``PARKED_MAX`` polls are parked; past that a poll is
  answered empty at once (the watcher polls again: back-pressure, never an unbounded
  queue). Parked polls are answered from the history only: they block no writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply
from zkv.protocol.watch import (
    WATCH_FROM_NOW,
    WATCH_LIMIT_MAX,
    WATCH_REPLY_BYTES_MAX,
    WATCH_WAIT_MS_MAX,
    WatchEvent,
    WatchReply,
    WatchRequest,
)
from zkv.storage_node.watch_history import Compacted

if TYPE_CHECKING:
    from zkv.storage_node.node_requests import NodeCoreConfig
    from zkv.storage_node.state_machine import KVStateMachine

#: Polls held at once per node, waiting for an event.
PARKED_MAX = 1000


@dataclass(slots=True)
class ParkedWatch:
    origin: object
    ident: bytes
    req: WatchRequest
    deadline: float
    #: every matching event up to this revision was looked for (none found)
    looked: int


class WatchRequests:
    """Watch methods of ``RequestCore`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: NodeCoreConfig
        state: KVStateMachine
        parked_watches: list[ParkedWatch]

        def _reply(self, origin: object, ident: bytes, reply: object) -> None: ...

    def _on_watch(self, origin: object, ident: bytes, req: WatchRequest, now: float) -> None:
        if req.shard != self.config.shard_id:
            self._reply(origin, ident, ErrorReply(
                req.request_id, ErrorCode.WRONG_SHARD,
                f"this node serves shard {self.config.shard_id}, not {req.shard}"))
            return
        if not 1 <= req.limit <= WATCH_LIMIT_MAX or req.after < 0 or req.wait_ms < 0:
            self._reply(origin, ident, ErrorReply(
                req.request_id, ErrorCode.BAD_REQUEST,
                f"watch limit must be 1..{WATCH_LIMIT_MAX}; after and wait_ms >= 0"))
            return
        if req.after == WATCH_FROM_NOW:
            self._reply(origin, ident, WatchReply(req.request_id, req.shard, (),
                                                  self.state.applied_index))
            return
        answered, looked = self._poll_watch(origin, ident, req, req.after, final=False)
        if answered:
            return
        if req.wait_ms == 0 or len(self.parked_watches) >= PARKED_MAX:
            self._poll_watch(origin, ident, req, looked, final=True)
            return
        deadline = now + min(req.wait_ms, WATCH_WAIT_MS_MAX) / 1000
        self.parked_watches.append(ParkedWatch(origin, ident, req, deadline, looked))

    def _poll_watch(self, origin: object, ident: bytes, req: WatchRequest, after: int,
                    final: bool) -> tuple[bool, int]:
        """Answer ``req`` from ``after`` if there is something to say (or ``final``):
        ``(answered, covered)``."""
        state = self.state
        try:
            events, covered = state.history.poll(
                after, req.prefix, req.exact, state.applied_index, req.limit,
                WATCH_REPLY_BYTES_MAX)
        except Compacted as exc:
            self._reply(origin, ident, WatchReply(req.request_id, req.shard, (), exc.floor,
                                                  compacted=True))
            return True, after
        if not events and not final:
            return False, covered
        self._reply(origin, ident, WatchReply(
            req.request_id, req.shard, tuple(WatchEvent(*e) for e in events), covered))
        return True, covered

    def serve_watches(self) -> None:
        """After applies: answer the parked polls that have events now."""
        applied = self.state.applied_index
        keep = []
        for w in self.parked_watches:
            if w.looked >= applied:
                keep.append(w)
                continue
            answered, w.looked = self._poll_watch(w.origin, w.ident, w.req, w.looked, False)
            if not answered:
                keep.append(w)
        self.parked_watches = keep

    def expire_watches(self, now: float) -> None:
        """Answer the parked polls whose wait is over (empty, with how far they looked)."""
        keep = []
        for w in self.parked_watches:
            if w.deadline <= now:
                self._poll_watch(w.origin, w.ident, w.req, w.looked, final=True)
            else:
                keep.append(w)
        self.parked_watches = keep
