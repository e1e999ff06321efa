"""A sorted index over a shard's keys, for prefix scans. Pure.

Why this shape: the key table is a dict (the hot path of every get and put); a scan
needs the keys in byte order. The index is built at a shard's first scan (a shard that
is never scanned pays nothing) and from then on kept up to date by every write that adds
or removes a key. It is a list of sorted chunks of the table's own key objects (no
copies) with each chunk's last key in ``maxes``, the layout of ``sortedcontainers``'
``SortedList`` in a few lines: finding a key is two bisects, inserting or removing one
moves at most ``CHUNK_MAX`` pointers, so a write pays about a microsecond whatever the
shard's size, where one flat sorted list would move half of a million pointers, and
re-sorting it at each scan page after a few writes would cost tens of milliseconds at a
million keys (both measured). Memory: a pointer per key plus a list header per chunk of
hundreds of keys, about 8.5 bytes per key (README, ``bench/multikey.py``).

Rules: chunks hold between ``CHUNK_MIN`` and ``CHUNK_MAX`` keys (a chunk that outgrows
the bound is split in two; one that shrinks below the floor is merged into a neighbour,
so deletes cannot leave a chunk header per key); none is empty; ``maxes[i]`` is
``chunks[i][-1]``. Keys compare as bytes: lexicographic by unsigned byte, which is the
scan order.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

CHUNK_MAX = 1024
CHUNK_MIN = 128
_BUILD = 512  # keys per chunk when built from scratch


class SortedKeys:
    """The keys of a table in byte order; see the module docstring."""

    __slots__ = ("_chunks", "_maxes", "_len")

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        ordered = sorted(keys)
        self._chunks: list[list[bytes]] = [ordered[i:i + _BUILD]
                                           for i in range(0, len(ordered), _BUILD)]
        self._maxes: list[bytes] = [c[-1] for c in self._chunks]
        self._len = len(ordered)

    def __len__(self) -> int:
        return self._len

    def add(self, key: bytes) -> None:
        """``key`` is new in the table (the caller knows it was absent)."""
        chunks, maxes = self._chunks, self._maxes
        self._len += 1
        if not chunks:
            chunks.append([key])
            maxes.append(key)
            return
        i = bisect.bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
        chunk = chunks[i]
        bisect.insort(chunk, key)
        maxes[i] = chunk[-1]
        if len(chunk) > CHUNK_MAX:
            half = len(chunk) // 2
            chunks[i:i + 1] = [chunk[:half], chunk[half:]]
            maxes[i:i + 1] = [chunk[half - 1], chunk[-1]]

    def remove(self, key: bytes) -> None:
        """``key`` left the table (absent keys are ignored)."""
        chunks, maxes = self._chunks, self._maxes
        i = bisect.bisect_left(maxes, key)
        if i == len(maxes):
            return
        chunk = chunks[i]
        j = bisect.bisect_left(chunk, key)
        if j == len(chunk) or chunk[j] != key:
            return
        del chunk[j]
        self._len -= 1
        if not chunk:
            del chunks[i]
            del maxes[i]
            return
        maxes[i] = chunk[-1]
        if len(chunk) < CHUNK_MIN and len(chunks) > 1:
            self._merge(i if i + 1 < len(chunks) else i - 1)

    def _merge(self, i: int) -> None:
        """Merge chunk ``i + 1`` into chunk ``i``, split again if too large."""
        chunks, maxes = self._chunks, self._maxes
        merged = chunks[i] + chunks[i + 1]
        if len(merged) > CHUNK_MAX:
            half = len(merged) // 2
            chunks[i:i + 2] = [merged[:half], merged[half:]]
            maxes[i:i + 2] = [merged[half - 1], merged[-1]]
        else:
            chunks[i:i + 2] = [merged]
            maxes[i:i + 2] = [merged[-1]]

    def iter_from(self, start: bytes) -> Iterator[bytes]:
        """Keys ``>= start`` in order. The caller must not change the table while it
        iterates (a scan page is served within one call)."""
        chunks = self._chunks
        i = bisect.bisect_left(self._maxes, start)
        if i == len(chunks):
            return
        chunk = chunks[i]
        for j in range(bisect.bisect_left(chunk, start), len(chunk)):
            yield chunk[j]
        for chunk in chunks[i + 1:]:
            yield from chunk

    def check(self) -> None:
        """Assert the rules of the module docstring (for tests)."""
        assert all(self._chunks), "an empty chunk"
        assert self._maxes == [c[-1] for c in self._chunks]
        flat = [k for c in self._chunks for k in c]
        assert flat == sorted(flat) and len(flat) == self._len == len(set(flat))
        assert all(len(c) <= CHUNK_MAX for c in self._chunks)
