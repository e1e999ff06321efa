"""A sorted index over a shard's keys, built lazily, for prefix scans. Pure.

Why this shape: the key table is a dict (the hot path of every get and put); a scan
needs the keys in byte order. Keeping a balanced tree beside the dict would tax every
write for a feature many clusters never use, so the index is a plain sorted ``list`` of
the dict's own key objects (8 bytes per key plus the list's spare room: measured in the
README), built at the first scan and then kept up to date lazily:

- a write that adds a key, or a delete, only notes the key in ``added`` / ``removed``
  (a set operation); the next scan folds the notes in: removals by bisect (few) or one
  filtering pass (many), additions by ``extend`` + ``sort`` (Timsort merges the new run
  into the sorted one in about linear time, in C).
- Bound: when the notes outgrow a quarter of the index (plus 1024), ``stale`` says so
  and the owner drops the index; the next scan rebuilds it with one ``sorted``. So the
  notes never hold more than about a quarter of the keys, however long no scan comes.

Keys compare as bytes: lexicographic by unsigned byte, which is the scan order.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

#: Removals folded in one bisect at a time below this; above, one filtering pass.
_BISECT_REMOVALS_MAX = 64
#: Notes kept before the index is dropped: ``len // 4 + NOTES_SLACK``.
NOTES_SLACK = 1024


class SortedKeys:
    """The keys of a table in byte order; see the module docstring."""

    __slots__ = ("_keys", "_added", "_removed")

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys: list[bytes] = sorted(keys)
        self._added: set[bytes] = set()
        self._removed: set[bytes] = set()

    def add(self, key: bytes) -> None:
        """``key`` is new in the table (it was absent)."""
        if key in self._removed:
            self._removed.discard(key)
        else:
            self._added.add(key)

    def remove(self, key: bytes) -> None:
        """``key`` left the table (it was present)."""
        if key in self._added:
            self._added.discard(key)
        else:
            self._removed.add(key)

    @property
    def stale(self) -> bool:
        """Too many changes noted since the last fold: cheaper to rebuild when needed."""
        return len(self._added) + len(self._removed) > len(self._keys) // 4 + NOTES_SLACK

    def _fold(self) -> None:
        keys = self._keys
        removed = self._removed
        if removed:
            if len(removed) <= _BISECT_REMOVALS_MAX:
                for key in removed:
                    i = bisect.bisect_left(keys, key)
                    if i < len(keys) and keys[i] == key:
                        del keys[i]
            else:
                self._keys = keys = [k for k in keys if k not in removed]
            removed.clear()
        if self._added:
            keys.extend(self._added)
            keys.sort()
            self._added.clear()

    def iter_from(self, start: bytes) -> Iterator[bytes]:
        """Keys ``>= start`` in order. The caller must not change the table while it
        iterates (a scan page is served within one call)."""
        self._fold()
        keys = self._keys
        i = bisect.bisect_left(keys, start)
        n = len(keys)
        while i < n:
            yield keys[i]
            i += 1

    def __len__(self) -> int:
        return len(self._keys) + len(self._added) - len(self._removed)
