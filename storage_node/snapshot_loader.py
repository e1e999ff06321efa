"""Decoding a snapshot a bounded slice at a time, so installing one never stalls. Pure.

Why: a follower that falls behind the leader's compacted log installs the leader's
snapshot: the whole data set (128 MB at 1,000,000 keys of 100 B). Decoding that in one
call (``msgpack.unpackb``, then a ``dict`` of a million keys) held the node's loop for
about 2.4 s: no heartbeat reached the brokers, no ack reached the leader, and the
follower's timers fired late, which cost an election. ``SnapshotLoader`` decodes at
most ``RECORDS_PER_STEP`` records (or ``BYTES_PER_STEP`` bytes) per ``step()``; the
node core calls it once per loop turn and applies nothing newer until it is done
(``node_snapshots.py``). The two large parts are decoded that way: the keys with their
values (into the ``KeyTable``), and the keys with their TTL deadlines (into the
``ExpiryIndex``, its heap grown by pushes). One cost is not sliced: the turn whose
insert makes the key table's dict outgrow its size copies the dict (40-50 ms before
1,000,000 keys, twice that per doubling; the README's limits).

The head (format, applied index), the client sessions and the ring ownership are small
and decoded in one go. ``KVStateMachine.restore`` (a node's own snapshot at start-up,
when nothing else waits) decodes in one call: faster, and the same checks (``adopt``
validates both).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Any

import msgpack

from zkv.protocol.errors import RemoteProtocolError
from zkv.storage_node.expiry import ExpiryIndex
from zkv.storage_node.key_table import KeyTable
from zkv.storage_node.state_machine import check_snapshot_head, key_table_part

#: records decoded per step: ~1 us each (decode + insert), so a step costs ~8 ms
RECORDS_PER_STEP = 8192
#: and at most this many bytes of them (large values decode slower per key)
BYTES_PER_STEP = 4 * 1024 * 1024
_SLICE = 64  # records decoded between two checks of the budget
_READ_SIZE = 1024 * 1024


class _ViewReader:
    """A file over a buffer: the unpacker reads 1 MiB at a time, nothing is copied whole."""

    __slots__ = ("_view", "_pos")

    def __init__(self, data: Any) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = len(self._view) if n < 0 else min(len(self._view), start + n)
        self._pos = end
        return bytes(self._view[start:end])


class _Pairs:
    """Two parallel msgpack arrays (all the firsts, then all the seconds) decoded a
    slice at a time; each slice of seconds goes to ``sink`` with its firsts."""

    __slots__ = ("_sink", "_count", "_firsts", "_left", "_paired", "_records", "_from")

    def __init__(self, sink: Callable[[list[Any], tuple[Any, ...]], None]) -> None:
        self._sink = sink
        self._count = -1  # firsts announced by the array header; -1 before it is read
        self._firsts: list[Any] = []
        self._left = -1  # seconds still to decode; -1 before their header is read
        self._paired = 0
        self._records = 0  # decoded in this array so far, from byte ``_from`` on
        self._from = 0

    @property
    def done(self) -> bool:
        return self._left == 0

    def slice(self, up: Any, budget: int, room: int) -> int:
        """Decode one slice of at most ``budget`` records and about ``room`` bytes (a
        header alone decodes none); the records decoded."""
        if self._count < 0:
            self._count, self._from = up.read_array_header(), up.tell()
            return 0
        if len(self._firsts) == self._count and self._left < 0:
            if up.read_array_header() != self._count:
                raise RemoteProtocolError("snapshot arrays of different lengths")
            self._left, self._records, self._from = self._count, 0, up.tell()
            return 0
        # records in this slice, from their mean size so far: fewer when they are large
        # (values up to 1 MiB), one until the mean is known
        size = max(1, min(_SLICE, budget,
                          room * self._records // max(1, up.tell() - self._from)))
        if self._left < 0:
            want = min(size, self._count - len(self._firsts))
            self._firsts.extend(self._take(up, want))
        else:
            want = min(size, self._left)
            self._sink(self._firsts[self._paired : self._paired + want], self._take(up, want))
            self._paired += want
            self._left -= want
            if not self._left:
                self._firsts = []
        self._records += want
        return int(want)

    @staticmethod
    def _take(up: Any, want: int) -> tuple[Any, ...]:
        got = tuple(islice(up, want))
        if len(got) != want:
            raise RemoteProtocolError("snapshot ends inside an array")
        return got


class SnapshotLoader:
    """Decodes a state machine snapshot (``KVStateMachine.snapshot_bytes``'s layout:
    ``[format, applied, keys, values, sessions, ownership?, [keys, deadlines]?]``)
    step by step.

    ``step()`` returns True once everything is decoded; then ``fmt``, ``applied``,
    ``table`` and ``rest`` (the parts after the values, for ``KVStateMachine.adopt``
    to check; the deadlines as an ``ExpiryIndex``) hold the result. A malformed
    snapshot raises ``RemoteProtocolError`` from ``step()``."""

    def __init__(self, data: Any) -> None:
        self._unpacker = msgpack.Unpacker(_ViewReader(data), raw=False, use_list=False,
                                          read_size=_READ_SIZE,
                                          max_buffer_size=max(len(data), _READ_SIZE))
        self.fmt = 0
        self.applied = 0
        self.table = KeyTable()
        self.expiry = ExpiryIndex()
        self.rest: tuple[Any, ...] = ()
        self._parts = 0
        self._stage = 0  # 0: the head; 1: keys and values; 2: deadlines; 3: done
        self._pairs: _Pairs | None = None
        self.done = False

    def step(self, records: int = RECORDS_PER_STEP, nbytes: int = BYTES_PER_STEP) -> bool:
        """Decode up to ``records`` records (or ``nbytes`` bytes); True when done."""
        if self.done:
            return True
        try:
            self._step(records, nbytes)
        except RemoteProtocolError:
            raise
        except Exception as exc:  # msgpack raises many types on garbage
            raise RemoteProtocolError(
                f"undecodable snapshot: {exc.__class__.__name__}") from exc
        return self.done

    def _step(self, records: int, nbytes: int) -> None:
        up = self._unpacker
        start = up.tell()
        budget = records
        while not self.done and budget > 0 and (used := up.tell() - start) < nbytes:
            pairs = self._pairs
            if pairs is not None and not pairs.done:
                budget -= pairs.slice(up, budget, nbytes - used)
            else:
                self._next_part()

    def _next_part(self) -> None:
        up = self._unpacker
        if self._stage == 0:
            self._parts = up.read_array_header()
            if self._parts < 5:
                raise RemoteProtocolError("snapshot has too few parts")
            self.fmt, self.applied = up.unpack(), up.unpack()
            check_snapshot_head(self.fmt, self.applied, self._parts - 5)
            self._pairs, self._stage = _Pairs(self._add_values), 1
            return
        if self._stage == 1:  # the sessions, then the ownership by format
            with_deadlines = self.fmt >= 4
            self.rest = tuple(up.unpack() for _ in range(self._parts - 4 - with_deadlines))
            if with_deadlines:
                if up.read_array_header() != 2:
                    raise RemoteProtocolError("expiry state is not [keys, deadlines]")
                self._pairs, self._stage = _Pairs(self._add_deadlines), 2
                return
        else:
            self.rest += (self.expiry,)
        self._pairs, self._stage, self.done = None, 3, True

    def _add_values(self, keys: list[Any], values: tuple[Any, ...]) -> None:
        key_table_part(self.fmt, keys, values, self.table)

    def _add_deadlines(self, keys: list[Any], deadlines: tuple[Any, ...]) -> None:
        try:
            self.expiry.add_loaded(keys, deadlines)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from exc
