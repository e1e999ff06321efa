"""Watch history: the recent events a replica's state machine applied, in log order. Pure.

Theory of operation:

- An event is ``(revision, kind, key, value, version)``: ``revision`` is the log index of
  the entry that caused it, ``kind`` put / delete / expire (``protocol/watch.py``),
  ``version`` the key's version the event gives it (a put's new version; for a delete or
  an expiry, the version at which the key went away: ``revision + version_offset``).
- What is recorded (``state_machine.py`` calls ``record``): a put, a put with a TTL, a
  CAS that wrote, a delete that removed a key, each key a batch wrote or removed, each
  key a sweep expired, and a key found expired when a write touches it (it expired
  before that write). Nothing else: not refused or deduplicated writes (their entry
  changes nothing), not keys copied in by a shard move (MIGRATE_IN), not drops of keys
  another shard owns, not EXPIRE/PERSIST (they change no value, so no version).
- Every replica applies the same committed log, so every replica records the same
  events under the same revisions: whichever replica answers a poll (a new leader after
  a failover included), the events after a revision are the same. That is what makes a
  watcher's resume token (the last revision it has seen, per shard) exact: resuming
  neither loses nor repeats an event.
- The history is complete for revisions ``> floor``. It is bounded by a count
  (``events_max``) and by bytes (``bytes_max``: keys + values + ``EVENT_OVERHEAD_BYTES``
  per event); the oldest events go first (a sixteenth of the bound at a time), and
  ``floor`` becomes the revision of the last one dropped. A replica that restored a
  snapshot (at restart, or one sent by the leader) has no events before it:
  ``reset(snapshot index)``. A poll after a revision below ``floor`` is ``Compacted(floor)``: the watcher must re-read the keys and resume
  from ``floor`` (etcd's ErrCompacted).
- ``poll`` never splits a revision: a page ends after the last event of a revision, so
  ``covered`` (every matching event up to it is in the page) is always a whole revision
  and a resume from it is exact. Cost: recording is one list append of a tuple per
  event (O(1); the README has the measured figure); a poll is a bisect plus a scan of
  at most ``examined_max`` events.
"""

from __future__ import annotations

from bisect import bisect_right
from operator import itemgetter

#: put, delete, expire: the wire values of ``WatchEvent.kind``
PUT, DELETE, EXPIRE = 0, 1, 2

#: Bounds of one replica's history (see the module docstring).
EVENTS_MAX = 100_000
HISTORY_BYTES_MAX = 16 * 1024 * 1024
#: What an event costs beyond its key and value (the tuple, the list slot, ints), as
#: the bytes bound counts it: ``sys.getsizeof`` of a 5-tuple is 80, plus the pointer.
EVENT_OVERHEAD_BYTES = 96
#: Events one poll looks at, at most (a page for a rare prefix ends there).
EXAMINED_MAX = 50_000

Event = tuple[int, int, bytes, bytes, int]
#: what a dropped event's slot holds until the list is compacted (never read: polls
#: start at ``_head``)
_GONE: Event = (0, 0, b"", b"", 0)
_revision = itemgetter(0)


class Compacted(Exception):  # noqa: N818 -- etcd's name for it
    """The history no longer holds the events after the revision asked for."""

    def __init__(self, floor: int) -> None:
        super().__init__(f"history compacted up to revision {floor}")
        self.floor = floor


class WatchHistory:
    """A bounded, ordered list of events; see the module docstring."""

    __slots__ = ("_events", "_head", "_bytes", "floor", "events_max", "bytes_max")

    def __init__(self, events_max: int = EVENTS_MAX, bytes_max: int = HISTORY_BYTES_MAX) -> None:
        if events_max < 1 or bytes_max < 1:
            raise ValueError("events_max and bytes_max must be >= 1")
        self.events_max = events_max
        self.bytes_max = bytes_max
        #: events in revision order; ``_events[:_head]`` were dropped (compacted lazily)
        self._events: list[Event] = []
        self._head = 0
        self._bytes = 0
        #: the history is complete for revisions above this one
        self.floor = 0

    def __len__(self) -> int:
        return len(self._events) - self._head

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def record(self, revision: int, kind: int, key: bytes, value: bytes, version: int) -> None:
        """Append one event (revisions never decrease: the apply order)."""
        events = self._events
        events.append((revision, kind, key, value, version))
        self._bytes += len(key) + len(value) + EVENT_OVERHEAD_BYTES
        if self._bytes > self.bytes_max or len(events) - self._head > self.events_max:
            self._trim()

    def _trim(self) -> None:
        """Drop the oldest events until both bounds hold with 1/16 to spare, so a full
        history trims once per ``events_max / 16`` records, not on every one."""
        events, head = self._events, self._head
        count_max = self.events_max - self.events_max // 16
        bytes_max = self.bytes_max - self.bytes_max // 16
        size = self._bytes
        end = len(events)
        floor = self.floor
        while head < end and (size > bytes_max or end - head > count_max):
            ev = events[head]
            size -= len(ev[2]) + len(ev[3]) + EVENT_OVERHEAD_BYTES
            floor = ev[0]
            events[head] = _GONE  # free the value now, not when the list is compacted
            head += 1
        self._bytes = size
        self.floor = max(self.floor, floor)
        if head > 1024 and head * 2 > len(events):  # amortized O(1) per dropped event
            del events[:head]
            head = 0
        self._head = head

    def reset(self, floor: int) -> None:
        """Forget everything: the state was replaced by a snapshot at ``floor``."""
        self._events = []
        self._head = 0
        self._bytes = 0
        self.floor = floor

    def oldest_revision(self) -> int:
        """The revision a watcher may resume from (``floor``)."""
        return self.floor

    def poll(self, after: int, prefix: bytes, exact: bool, applied: int,
             limit: int, bytes_max: int,
             examined_max: int = EXAMINED_MAX) -> tuple[list[Event], int]:
        """Events with revision ``> after`` whose key starts with ``prefix`` (equals it,
        with ``exact``), and ``covered``: the revision up to which every such event is
        in the list (``applied`` when the history was read to its end). Stops after
        ``limit`` events or ``bytes_max`` bytes or ``examined_max`` events looked at,
        always at the end of a revision. ``Compacted`` if ``after < floor``."""
        if after < self.floor:
            raise Compacted(self.floor)
        events = self._events
        end = len(events)
        i = bisect_right(events, after, lo=self._head, key=_revision)
        out: list[Event] = []
        size = 0
        stop_after = -1  # once a bound is hit: the revision to finish
        examined = 0
        while i < end:
            ev = events[i]
            rev = ev[0]
            if stop_after >= 0 and rev != stop_after:
                return out, stop_after
            key = ev[2]
            if (key == prefix) if exact else key.startswith(prefix):
                out.append(ev)
                size += len(key) + len(ev[3])
            examined += 1
            if stop_after < 0 and (len(out) >= limit or size >= bytes_max
                                   or examined >= examined_max):
                stop_after = rev
            i += 1
        return out, max(applied, after)
