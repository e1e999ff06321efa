"""Batches and scans of the asyncio client (a mixin of ``AsyncKVClient``).

The same rounds and rules as the sync client (``client/batch.py``); time is the event
loop's. A batch is atomic per shard only (``protocol/multikey.py``). For many single
calls in flight, ``asyncio.gather`` them: the asyncio client pipelines by itself.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
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

Key = str | bytes


class AsyncMultiKeyCalls:
    """``mget``, ``mset``, ``mdelete``, ``scan`` and ``scan_iter`` as coroutines."""

    if TYPE_CHECKING:
        client_id: bytes
        timeout_s: float
        consistency: Consistency
        limits: Limits
        _rng: random.Random

        async def _call(self, build: Callable[[int, int], Message], expected: type,
                        timeout: float | None, rid: int | None = None) -> Any: ...
        def new_request_id(self) -> int: ...

    async def mget(self, keys: Iterable[Key], *, consistency: Consistency | None = None,
                   timeout: float | None = None) -> dict[Key, bytes | None]:
        """Values of ``keys`` (None when missing); see ``KVClient.mget``."""
        found = await self.mget_versioned(keys, consistency=consistency, timeout=timeout)
        return {k: (f[0] if f is not None else None) for k, f in found.items()}

    async def mget_versioned(self, keys: Iterable[Key], *,
                             consistency: Consistency | None = None,
                             timeout: float | None = None,
                             ) -> dict[Key, tuple[bytes, int] | None]:
        """``(value, version)`` of each of ``keys`` (None when missing): ``mget`` with
        the versions ``get_versioned`` gives."""
        given = list(keys)
        level = self.consistency if consistency is None else Consistency(consistency)
        wire = [self.limits.key(k) for k in given]
        results = await self._batch(
            wire, None,
            lambda rid, low, ks: MultiGetRequest(self.client_id, rid, tuple(ks), level),
            timeout, same_rid=False)
        return {k: ((r.value, r.version) if r.found else None) for k, r in
                zip(given, (results[w] for w in wire), strict=True)}

    async def mset(self, mapping: Mapping[Key, str | bytes], *,
                   timeout: float | None = None) -> dict[Key, int]:
        """Write every key of ``mapping``; each key's new version. Atomic per shard only."""
        given = list(mapping)
        wire = [self.limits.key(k) for k in given]
        values = {w: self.limits.value(mapping[k]) for k, w in zip(given, wire, strict=True)}
        results = await self._batch(
            wire, list(values.values()),
            lambda rid, low, ks: MultiPutRequest(self.client_id, rid, low, tuple(ks),
                                                 tuple(values[k] for k in ks)),
            timeout, same_rid=True)
        return {k: results[w].version for k, w in zip(given, wire, strict=True)}

    async def mdelete(self, keys: Iterable[Key], *,
                      timeout: float | None = None) -> dict[Key, bool]:
        """Remove ``keys``; whether each existed. Atomic per shard only."""
        given = list(keys)
        wire = [self.limits.key(k) for k in given]
        results = await self._batch(
            wire, None,
            lambda rid, low, ks: MultiDeleteRequest(self.client_id, rid, low, tuple(ks)),
            timeout, same_rid=True)
        return {k: results[w].found for k, w in zip(given, wire, strict=True)}

    async def scan(self, prefix: Key = b"", *, limit: int = SCAN_PAGE_DEFAULT,
                   cursor: bytes | None = None, keys_only: bool = False,
                   consistency: Consistency | None = None,
                   timeout: float | None = None) -> ScanPage:
        """One page of the keys under ``prefix``; see ``KVClient.scan``."""
        p = self.limits.key(prefix)
        after = None if cursor is None else self.limits.key(cursor)
        level = self.consistency if consistency is None else Consistency(consistency)
        n = check_limit(limit)
        reply = await self._call(
            lambda rid, low: ScanRequest(self.client_id, rid, p, after, n, keys_only, level),
            ScanReply, timeout)
        return ScanPage.from_reply(reply)

    async def scan_iter(self, prefix: Key = b"", *, page_size: int = SCAN_PAGE_DEFAULT,
                        keys_only: bool = False, consistency: Consistency | None = None,
                        timeout: float | None = None) -> AsyncIterator[tuple[bytes, bytes]]:
        """Every ``(key, value)`` under ``prefix`` in key order; see ``KVClient.scan_iter``."""
        cursor: bytes | None = None
        while True:
            page = await self.scan(prefix, limit=page_size, cursor=cursor,
                                   keys_only=keys_only, consistency=consistency,
                                   timeout=timeout)
            for item in page.items():
                yield item
            if page.cursor is None:
                return
            cursor = page.cursor

    async def _batch(self, keys: list[bytes], values: list[bytes] | None,
                     build: Callable[[int, int, list[bytes]], Message], timeout: float | None,
                     same_rid: bool) -> dict[bytes, KeyResult]:
        state = BatchState.start(keys, values)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s if timeout is None else timeout)
        rid = self.new_request_id() if same_rid else None
        while state.pending:
            left = deadline - loop.time()
            if left <= 0:
                raise Timeout(state.timeout_message())
            reply: MultiReply = await self._call(
                _bind(build, state.pending), MultiReply, left, rid)
            error = state.absorb(reply)
            if error is not None:
                raise error
            if state.pending:
                pause = backoff_s(state.rounds, self._rng)
                if loop.time() + pause >= deadline:
                    raise Timeout(state.timeout_message())
                await asyncio.sleep(pause)
        return state.results


def _bind(build: Callable[[int, int, list[bytes]], Message],
          keys: list[bytes]) -> Callable[[int, int], Message]:
    """A round's request builder for ``_call``: the keys pending in that round."""
    return lambda rid, low: build(rid, low, keys)
