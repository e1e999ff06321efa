"""Which keys expire when: the deadline of every key that has one, indexed by deadline.

Part of the replicated state (``state_machine.py`` owns one): a deadline is an absolute
wall-clock time in milliseconds, stamped by the leader in the log entry that set it, so
every replica and every replay holds the same deadlines. Nothing here reads a clock:
``now_ms`` is always an argument.

Structure and its rules:
- ``_deadline``: key -> deadline (ms). A key without an entry never expires. This dict
  is the truth: snapshots store it, ``==`` compares it.
- ``_heap``: ``(deadline, key)`` pairs, a binary min-heap over the same keys, so the
  leader finds the keys due without scanning the table. Entries go stale (the key got
  another deadline, lost it, or is gone): a pair counts only while ``_deadline[key]`` is
  its deadline. Stale pairs are dropped when they reach the top, and the heap is rebuilt
  from the dict when stale pairs outnumber live ones (amortized O(1) per change), so it
  holds at most about twice the live deadlines. The heap is an index, not state: its
  shape may differ between replicas (a restored one is built in dict order), and no
  decision depends on that shape.
- ``due(now_ms, limit)``: the (at most ``limit``) earliest keys whose deadline is
  <= ``now_ms``, in ``(deadline, key)`` order: popped off the heap, stale pairs
  dropped for good, live ones pushed back (the leader's sweep may not commit). At most
  ``4 * limit`` pops: the cost of one sweep is bounded whatever the number of keys due.
- ``trim(budget)``: drop stale pairs off the top. A sweep removes the earliest keys
  due (``due``'s order), so once it applied, on every replica, their pairs are the top
  of the heap and go in ``O(k log n)`` for ``k`` keys, with no rebuild.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

#: The heap is rebuilt when it holds more than this many stale pairs and more stale
#: pairs than live ones.
_STALE_MIN = 1024


class ExpiryIndex:
    """Deadlines of keys, by key and by time; see the module docstring."""

    __slots__ = ("_deadline", "_heap", "deadlines")

    def __init__(self) -> None:
        self._deadline: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []
        #: the same dict, to read only: ``if index.deadlines`` is the "any TTL at all?"
        #: test every write makes, without a Python ``__len__`` call
        self.deadlines = self._deadline

    def __len__(self) -> int:
        return len(self._deadline)

    def __contains__(self, key: object) -> bool:
        return key in self._deadline

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._deadline)

    def get(self, key: bytes) -> int:
        """The key's deadline, 0 if it has none."""
        return self._deadline.get(key, 0)

    def expired(self, key: bytes, now_ms: int) -> bool:
        """The key has a deadline and it has passed at ``now_ms`` (a deadline is the
        first millisecond at which the key no longer exists)."""
        d = self._deadline.get(key)
        return d is not None and d <= now_ms

    def set(self, key: bytes, deadline_ms: int) -> None:
        """Give ``key`` this deadline; 0 removes its deadline."""
        if deadline_ms <= 0:
            self.discard(key)
            return
        if self._deadline.get(key) == deadline_ms:
            return
        self._deadline[key] = deadline_ms
        heapq.heappush(self._heap, (deadline_ms, key))
        self._compact()

    def discard(self, key: bytes) -> None:
        if self._deadline.pop(key, None) is not None:
            self._compact()

    def due(self, now_ms: int, limit: int) -> list[bytes]:
        """Up to ``limit`` keys whose deadline is <= ``now_ms``, earliest first
        (bounded work: at most ``4 * limit`` pops)."""
        heap, deadline = self._heap, self._deadline
        out: list[bytes] = []
        taken: list[tuple[int, bytes]] = []
        pops = 4 * limit
        while heap and len(out) < limit and pops > 0 and heap[0][0] <= now_ms:
            pops -= 1
            pair = heapq.heappop(heap)
            if deadline.get(pair[1]) == pair[0]:
                out.append(pair[1])
                taken.append(pair)
        for pair in taken:  # an index, not a promise: the sweep may never commit
            heapq.heappush(heap, pair)
        return out

    def trim(self, budget: int) -> None:
        """Drop up to ``budget`` stale pairs off the top of the heap."""
        heap, deadline = self._heap, self._deadline
        while budget > 0 and heap and deadline.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
            budget -= 1

    def _compact(self) -> None:
        stale = len(self._heap) - len(self._deadline)
        if stale > _STALE_MIN and stale > len(self._deadline):
            self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(d, k) for k, d in self._deadline.items()]
        heapq.heapify(self._heap)

    # ------------------------------------------------------------------ state

    def to_state(self) -> list[Any]:
        """``[keys, deadlines]``: two flat lists, packed by msgpack in C."""
        return [list(self._deadline.keys()), list(self._deadline.values())]

    @classmethod
    def from_state(cls, state: Any) -> ExpiryIndex:
        """The index of ``to_state``'s output; ``ValueError`` if it is malformed."""
        if type(state) not in (list, tuple) or len(state) != 2:
            raise ValueError("expiry state is not [keys, deadlines]")
        keys, deadlines = state
        if type(keys) not in (list, tuple) or type(deadlines) not in (list, tuple):
            raise ValueError("expiry state is not [keys, deadlines]")
        if len(keys) != len(deadlines):
            raise ValueError("expiry keys and deadlines do not match")
        _check_loaded(keys, deadlines)
        index = cls()
        index._deadline.update(zip(keys, deadlines, strict=True))  # keep `deadlines` its alias
        index._rebuild()
        return index

    def add_loaded(self, keys: Any, deadlines: Any) -> None:
        """Add a slice of a snapshot's ``[keys, deadlines]`` (``snapshot_loader.py``
        decodes a large one a slice per loop turn): the heap grows by pushes, never
        by one rebuild of all of it. ``ValueError`` if the slice is malformed."""
        _check_loaded(keys, deadlines)
        self._deadline.update(zip(keys, deadlines, strict=True))
        heap, push = self._heap, heapq.heappush
        for pair in zip(deadlines, keys, strict=True):
            push(heap, pair)

    def heap_len(self) -> int:
        """Pairs in the heap, stale ones included (for tests and the memory figure)."""
        return len(self._heap)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpiryIndex):
            return NotImplemented
        return self._deadline == other._deadline

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ExpiryIndex({self._deadline!r})"


def _check_loaded(keys: Any, deadlines: Any) -> None:
    """``ValueError`` unless ``keys`` are bytes and ``deadlines`` positive ints."""
    if keys and set(map(type, keys)) != {bytes}:
        raise ValueError("expiry key is not bytes")
    if deadlines and (set(map(type, deadlines)) != {int} or min(deadlines) <= 0):
        raise ValueError("expiry deadline is not a positive int")
