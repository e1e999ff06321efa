"""``KeyTable``: a shard's ``key -> (value, version)`` in one packed bytes per key.

Why: a ``(value, version)`` tuple and an int object per key cost ~100 B more per key
than one ``bytes`` holding the value then the version as 8 little-endian bytes; a
snapshot is then the keys and the packed values as they are (no per-key object to
write or load). Reads as a mapping of ``(value, version)`` to ``ownership.py``,
``push.py`` and the tests. A sorted index (``key_index.py``) is built at a shard's
first scan and kept up to date by every write from then on.
"""

from __future__ import annotations

from collections.abc import Iterator, KeysView, Mapping, ValuesView
from typing import Any

from zkv.storage_node.key_index import SortedKeys

_VERSION_BYTES = 8


class KeyTable:
    """``key -> (value, version)``, held as ``key -> value + version (8 bytes LE)``.

    Why packed: a ``(value, version)`` tuple costs a tuple and an int object per key
    (~100 B with the allocator's rounding) on top of the value itself; the packed form is
    one bytes object, and it is also what a snapshot stores, so a restore is one
    ``dict(zip(...))`` in C. Reads unpack (a slice of the value), which is cheap next to
    a request. ``size_bytes``, the sum of the lengths of keys and values (versions not
    counted), stays exact through every mutation, so a quota check costs nothing.

    The mapping interface (``[]``, ``get``, ``pop``, ``in``, iteration over keys,
    ``items``/``values`` of ``(value, version)`` pairs, ``==`` against any mapping) is
    what ``ownership.py``, ``push.py`` and the tests use.
    """

    __slots__ = ("_d", "size_bytes", "_index")

    def __init__(self, items: Any = ()) -> None:
        self._d: dict[bytes, bytes] = {}
        self.size_bytes = 0
        #: the sorted key index for scans (``key_index.py``): None until a scan asks
        #: for it; from then on every write that adds or removes a key updates it
        self._index: SortedKeys | None = None
        pairs = items.items() if hasattr(items, "items") else items
        for key, (value, version) in pairs:
            self.put(key, value, version)

    @classmethod
    def from_packed(cls, keys: Any, packed: Any) -> KeyTable:
        """A table from parallel sequences of keys and packed values (a snapshot's)."""
        table = cls()
        table.add_packed(keys, packed)
        return table

    def add_packed(self, keys: Any, packed: Any) -> None:
        """Add parallel sequences of new keys and packed values (a snapshot's, a slice
        at a time: ``snapshot_loader.py``)."""
        self._d.update(zip(keys, packed, strict=True))
        self.size_bytes += (sum(map(len, keys)) + sum(map(len, packed))
                            - _VERSION_BYTES * len(packed))

    def put(self, key: bytes, value: bytes, version: int) -> None:
        d = self._d
        old = d.get(key)
        if old is None:
            self.size_bytes += len(key) + len(value)
            if self._index is not None:
                self._index.add(key)
        else:
            self.size_bytes += len(value) - len(old) + _VERSION_BYTES
        d[key] = value + version.to_bytes(_VERSION_BYTES, "little")

    # ------------------------------------------------------------------ sorted index

    def keys_from(self, start: bytes) -> Iterator[bytes]:
        """Keys ``>= start`` in byte order (builds the sorted index at the first call).
        Do not change the table while iterating."""
        if self._index is None:
            self._index = SortedKeys(self._d)
        return self._index.iter_from(start)

    def get_packed(self, key: bytes) -> bytes | None:
        """The stored form ``value + version``, for a scan that reads many keys."""
        return self._d.get(key)

    def get(self, key: bytes, default: Any = None) -> tuple[bytes, int] | Any:
        p = self._d.get(key)
        if p is None:
            return default
        return p[:-_VERSION_BYTES], int.from_bytes(p[-_VERSION_BYTES:], "little")

    def __getitem__(self, key: bytes) -> tuple[bytes, int]:
        p = self._d[key]
        return p[:-_VERSION_BYTES], int.from_bytes(p[-_VERSION_BYTES:], "little")

    def __setitem__(self, key: bytes, item: tuple[bytes, int]) -> None:
        self.put(key, item[0], item[1])

    def __delitem__(self, key: bytes) -> None:
        old = self._d.pop(key)
        self.size_bytes -= len(key) + len(old) - _VERSION_BYTES
        if self._index is not None:
            self._index.remove(key)

    def pop(self, key: bytes, *default: Any) -> Any:
        old = self._d.pop(key, None)
        if old is None:
            if default:
                return default[0]
            raise KeyError(key)
        self.size_bytes -= len(key) + len(old) - _VERSION_BYTES
        if self._index is not None:
            self._index.remove(key)
        return old[:-_VERSION_BYTES], int.from_bytes(old[-_VERSION_BYTES:], "little")

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def keys(self) -> KeysView[bytes]:
        return self._d.keys()

    def packed_values(self) -> ValuesView[bytes]:
        return self._d.values()

    def values(self) -> Iterator[tuple[bytes, int]]:
        for p in self._d.values():
            yield p[:-_VERSION_BYTES], int.from_bytes(p[-_VERSION_BYTES:], "little")

    def items(self) -> Iterator[tuple[bytes, tuple[bytes, int]]]:
        for k, p in self._d.items():
            yield k, (p[:-_VERSION_BYTES], int.from_bytes(p[-_VERSION_BYTES:], "little"))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyTable):
            return self._d == other._d
        if not isinstance(other, Mapping):
            return NotImplemented
        return len(other) == len(self) and all(
            other.get(k, None) == v for k, v in self.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"KeyTable({dict(self.items())!r})"
