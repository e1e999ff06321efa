"""Decoding a snapshot a bounded slice at a time, so installing one never stalls. Pure.

Why: a follower that falls behind the leader's compacted log installs the leader's
snapshot: the whole data set (128 MB at 1,000,000 keys of 100 B). Decoding that in one
call (``msgpack.unpackb``, then a ``dict`` of a million keys) held the node's loop for
about 2.4 s: no heartbeat reached the brokers, no ack reached the leader, and the
follower's timers fired late, which cost an election. ``SnapshotLoader`` decodes at
most ``RECORDS_PER_STEP`` keys (or ``BYTES_PER_STEP`` bytes) per ``step()``; the node
core calls it once per loop turn and applies nothing newer until it is done
(``node_core.py``), so a turn stays within a few milliseconds at any data size.

What is decoded in one go: the head (format, applied index) and the small parts after
the keys and values (client sessions, ring ownership, TTL deadlines). The deadlines
grow with the number of keys that carry a TTL: a snapshot with very many TTL keys
decodes their deadlines in one step (measured in the README's limits).

``KVStateMachine.restore`` (a node's own snapshot at start-up, when nothing else waits)
decodes in one call: faster, and the same checks (``adopt`` validates both).
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import msgpack

from zkv.protocol.errors import RemoteProtocolError
from zkv.storage_node.key_table import KeyTable
from zkv.storage_node.state_machine import check_snapshot_head, key_table_part

#: keys decoded per step: ~1 us each (decode + insert), so a step costs ~8 ms
RECORDS_PER_STEP = 8192
#: and at most this many bytes of them (large values decode slower per key)
BYTES_PER_STEP = 4 * 1024 * 1024
_SLICE = 64  # keys decoded between two checks of the budget
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


class SnapshotLoader:
    """Decodes a state machine snapshot (``KVStateMachine.snapshot_bytes``'s layout:
    ``[format, applied, keys, values, sessions, ownership?, deadlines?]``) step by step.

    ``step()`` returns True once everything is decoded; then ``fmt``, ``applied``,
    ``table`` and ``rest`` (the parts after the values, still to be validated by
    ``KVStateMachine.adopt``) hold the result. A malformed snapshot raises
    ``RemoteProtocolError`` from ``step()``."""

    def __init__(self, data: Any) -> None:
        self._unpacker = msgpack.Unpacker(_ViewReader(data), raw=False, use_list=False,
                                          read_size=_READ_SIZE,
                                          max_buffer_size=max(len(data), _READ_SIZE))
        self.fmt = 0
        self.applied = 0
        self.table = KeyTable()
        self.rest: tuple[Any, ...] = ()
        self._parts = 0
        self._keys: list[bytes] = []  # decoded before the values they pair with
        self._key_count = -1
        self._values_left = -1
        self._paired = 0
        self._records = 0  # keys (then values) decoded, from byte ``_records_from`` on
        self._records_from = 0
        self.done = False

    def step(self, records: int = RECORDS_PER_STEP, nbytes: int = BYTES_PER_STEP) -> bool:
        """Decode up to ``records`` keys or values (or ``nbytes`` bytes); True when done."""
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
        if self._key_count < 0:
            self._head()
        start = up.tell()
        budget = records
        while budget > 0 and (used := up.tell() - start) < nbytes:
            # records in the next slice, from their mean size so far: fewer when they
            # are large (up to 1 MiB values), one until the mean is known
            size = max(1, min(_SLICE, (nbytes - used) * self._records // max(
                1, up.tell() - self._records_from)))
            if len(self._keys) < self._key_count:
                want = min(size, budget, self._key_count - len(self._keys))
                got = tuple(islice(up, want))
                if len(got) != want:
                    raise RemoteProtocolError("snapshot ends inside its keys")
                if set(map(type, got)) != {bytes}:
                    raise RemoteProtocolError("snapshot holds a malformed key or value")
                self._keys.extend(got)
                self._records += want
                budget -= want
                continue
            if self._values_left < 0:
                if up.read_array_header() != self._key_count:
                    raise RemoteProtocolError("snapshot keys and values do not match")
                self._values_left = self._key_count
                self._records, self._records_from = 0, up.tell()  # values: a new mean
                continue
            if self._values_left == 0:
                self._finish()
                return
            want = min(size, budget, self._values_left)
            values = tuple(islice(up, want))
            if len(values) != want:
                raise RemoteProtocolError("snapshot ends inside its values")
            keys = self._keys[self._paired : self._paired + want]
            key_table_part(self.fmt, keys, values, self.table)
            self._paired += want
            self._values_left -= want
            self._records += want
            budget -= want
        if self._values_left == 0:
            self._finish()

    def _head(self) -> None:
        up = self._unpacker
        self._parts = up.read_array_header()
        if self._parts < 5:
            raise RemoteProtocolError("snapshot has too few parts")
        self.fmt, self.applied = up.unpack(), up.unpack()
        check_snapshot_head(self.fmt, self.applied, self._parts - 5)
        self._key_count = up.read_array_header()
        self._records_from = up.tell()

    def _finish(self) -> None:
        up = self._unpacker
        self.rest = tuple(up.unpack() for _ in range(self._parts - 4))
        self._keys = []
        self.done = True
