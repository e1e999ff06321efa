"""Batches, scans and the pipeline of the synchronous client (a mixin of ``KVClient``).

Rounds, retries and bounds of a batch: ``client/batch.py``. A batch is atomic per shard
only (``protocol/multikey.py``): each shard applies its part of an ``mset`` or
``mdelete`` as one log entry, but parts on different shards apply independently.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from zkv.client.batch import SCAN_PAGE_DEFAULT, BatchState, ScanPage, check_limit
from zkv.client.retry import backoff_s
from zkv.protocol.errors import Timeout
from zkv.protocol.messages import Consistency, Message
from zkv.protocol.multikey import (
    KeyResult,
    MultiDeleteRequest,
    MultiGetRequest,
    MultiPutRequest,
    MultiReply,
    ScanReply,
    ScanRequest,
)

if TYPE_CHECKING:
    from zkv.client.calls import Limits
    from zkv.client.connection import Clock
    from zkv.client.pipeline import Pipeline

Key = str | bytes


class MultiKeyCalls:
    """``mget``, ``mset``, ``mdelete``, ``scan``, ``scan_iter`` and ``pipeline``."""

    if TYPE_CHECKING:
        client_id: bytes
        timeout_s: float
        consistency: Consistency
        limits: Limits
        _clock: Clock
        _rng: random.Random

        def _call(self, build: Any, expected: type, timeout: float | None,
                  rid: int | None = None) -> Any: ...
        def new_request_id(self) -> int: ...

    def mget(self, keys: Iterable[Key], *, consistency: Consistency | None = None,
             timeout: float | None = None) -> dict[Key, bytes | None]:
        """Values of ``keys`` (None when missing), one request per round for all of
        them: the broker asks each shard's leader at once. Keys as given (a key given
        as str and as bytes is one key, in the dict twice)."""
        found = self.mget_versioned(keys, consistency=consistency, timeout=timeout)
        return {k: (f[0] if f is not None else None) for k, f in found.items()}

    def mget_versioned(self, keys: Iterable[Key], *, consistency: Consistency | None = None,
                       timeout: float | None = None) -> dict[Key, tuple[bytes, int] | None]:
        """``(value, version)`` of each of ``keys`` (None when missing): ``mget`` with
        the versions ``get_versioned`` gives."""
        given = list(keys)
        level = self.consistency if consistency is None else Consistency(consistency)
        wire = [self.limits.key(k) for k in given]
        results = self._batch(
            wire, None,
            lambda rid, ks: MultiGetRequest(self.client_id, rid, tuple(ks), level),
            timeout, same_rid=False)
        return {k: ((r.value, r.version) if r.found else None) for k, r in
                zip(given, (results[w] for w in wire), strict=True)}

    def mset(self, mapping: Mapping[Key, str | bytes], *,
             timeout: float | None = None) -> dict[Key, int]:
        """Write every key of ``mapping``; returns each key's new version. Atomic per
        shard only (see the module docstring)."""
        given = list(mapping)
        wire = [self.limits.key(k) for k in given]
        values = {w: self.limits.value(mapping[k]) for k, w in zip(given, wire, strict=True)}
        results = self._batch(
            wire, list(values.values()),
            lambda rid, ks: MultiPutRequest(self.client_id, rid, rid, tuple(ks),
                                            tuple(values[k] for k in ks)),
            timeout, same_rid=True)
        return {k: results[w].version for k, w in zip(given, wire, strict=True)}

    def mdelete(self, keys: Iterable[Key], *, timeout: float | None = None) -> dict[Key, bool]:
        """Remove ``keys``; returns for each whether it existed. Atomic per shard only."""
        given = list(keys)
        wire = [self.limits.key(k) for k in given]
        results = self._batch(
            wire, None,
            lambda rid, ks: MultiDeleteRequest(self.client_id, rid, rid, tuple(ks)),
            timeout, same_rid=True)
        return {k: results[w].found for k, w in zip(given, wire, strict=True)}

    def scan(self, prefix: Key = b"", *, limit: int = SCAN_PAGE_DEFAULT,
             cursor: bytes | None = None, keys_only: bool = False,
             consistency: Consistency | None = None, timeout: float | None = None) -> ScanPage:
        """One page of the keys starting with ``prefix``, in byte order, across every
        shard, strictly after ``cursor`` (None: from the first); ``page.cursor`` is where
        the next page starts (None: done). Each page is linearizable per shard."""
        p = self.limits.key(prefix)
        after = None if cursor is None else self.limits.key(cursor)
        level = self.consistency if consistency is None else Consistency(consistency)
        n = check_limit(limit)
        reply = self._call(
            lambda rid: ScanRequest(self.client_id, rid, p, after, n, keys_only, level),
            ScanReply, timeout)
        return ScanPage.from_reply(reply)

    def scan_iter(self, prefix: Key = b"", *, page_size: int = SCAN_PAGE_DEFAULT,
                  keys_only: bool = False, consistency: Consistency | None = None,
                  timeout: float | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Every ``(key, value)`` under ``prefix`` in key order, a page at a time (value
        ``b""`` with ``keys_only``). Keys written or deleted meanwhile may or may not
        appear; a key present throughout appears exactly once."""
        cursor: bytes | None = None
        while True:
            page = self.scan(prefix, limit=page_size, cursor=cursor, keys_only=keys_only,
                             consistency=consistency, timeout=timeout)
            yield from page.items()
            if page.cursor is None:
                return
            cursor = page.cursor

    def pipeline(self, *, timeout: float | None = None) -> Pipeline:
        """Many single calls in flight at once: ``with kv.pipeline() as p: p.put(...)``,
        then ``p.results`` (see ``client/pipeline.py``)."""
        from zkv.client.pipeline import Pipeline

        return Pipeline(self, timeout)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ machinery

    def _batch(self, keys: list[bytes], values: list[bytes] | None,
               build: Callable[[int, list[bytes]], Message], timeout: float | None,
               same_rid: bool) -> dict[bytes, KeyResult]:
        """Rounds until every key has a result (``client/batch.py``)."""
        state = BatchState.start(keys, values)
        clock = self._clock
        deadline = clock.now() + (self.timeout_s if timeout is None else timeout)
        rid = self.new_request_id() if same_rid else None
        while state.pending:
            left = deadline - clock.now()
            if left <= 0:
                raise Timeout(state.timeout_message())
            pending = state.pending
            reply: MultiReply = self._call(
                lambda r, ks=pending: build(r, ks), MultiReply, left, rid)
            error = state.absorb(reply)
            if error is not None:
                raise error
            if state.pending:
                pause = backoff_s(state.rounds, self._rng)
                if clock.now() + pause >= deadline:
                    raise Timeout(state.timeout_message())
                clock.sleep(pause)
        return state.results
