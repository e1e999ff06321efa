"""``AsyncKVClient.watch``: the asyncio watch loop (the cursor: ``watch.py``).

One poll task per shard, each an ordinary client call (so it inherits the client's
retries: a resend after silence, the next broker after a dead connection); the loop
waits for the first to finish, yields its events, and polls that shard again.
Retryable failures (a failover: ``NO_LEADER``, ``NOT_LEADER``, ``UNAVAILABLE``, or a
``Timeout`` after the call's own retries) poll again after ``RETRY_PAUSE_S``;
``WRONG_SHARD`` reads the shard set again (as every ``SHARDS_REFRESH_S``). The node
holds a poll at most ``POLL_WAIT_MS``, below the client's attempt timeout, so a held
poll is never mistaken for a lost one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from zkv.client.watch import POLL_WAIT_MS, Event, WatchCursor
from zkv.client.watch_sync import RETRY_PAUSE_S, SHARDS_REFRESH_S
from zkv.protocol.errors import NoLeader, NotLeader, Timeout, Unavailable, WrongShard
from zkv.protocol.watch import WatchReply

if TYPE_CHECKING:
    from zkv.client.aio import AsyncKVClient

_RETRY = (NoLeader, NotLeader, Unavailable, Timeout)


async def _shards(client: AsyncKVClient) -> tuple[int, ...]:
    status = await client.status()
    return tuple(int(s) for s in status.get("ring", {}).get("shards", ()))


async def _poll(client: AsyncKVClient, cursor: WatchCursor, shard: int,
                wait_ms: int, pause_s: float) -> Any:
    if pause_s:
        await asyncio.sleep(pause_s)
    try:
        return await client._call(
            lambda rid, _low: cursor.request(client.client_id, rid, shard, wait_ms),
            WatchReply, None)
    except _RETRY as exc:
        return exc


async def watch_events_async(client: AsyncKVClient, prefix: bytes, exact: bool,
                             start: str | None) -> AsyncIterator[Event]:
    cursor = WatchCursor(prefix, exact, start)
    attempt_s = client.attempt_timeout_s or min(1.0, client.timeout_s)
    wait_ms = max(0, min(POLL_WAIT_MS, int(attempt_s * 1000) // 2))
    loop = asyncio.get_running_loop()
    tasks: dict[asyncio.Task[Any], int] = {}
    refresh_at = 0.0
    pause: dict[int, float] = {}
    try:
        while True:
            if loop.time() >= refresh_at or not cursor.shards:
                with contextlib.suppress(*_RETRY):
                    cursor.set_shards(await _shards(client))
                refresh_at = loop.time() + SHARDS_REFRESH_S
                if not cursor.shards:
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
            polling = set(tasks.values())
            for shard in cursor.shards:
                if shard not in polling:
                    task = asyncio.ensure_future(
                        _poll(client, cursor, shard, wait_ms, pause.pop(shard, 0.0)))
                    tasks[task] = shard
            done, _ = await asyncio.wait(tasks, timeout=SHARDS_REFRESH_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                shard = tasks.pop(task)
                result = task.result()  # a non-retryable error raises here
                if isinstance(result, WrongShard):
                    refresh_at = 0.0
                if isinstance(result, BaseException):
                    if not isinstance(result, (*_RETRY, WrongShard)):
                        raise result
                    pause[shard] = RETRY_PAUSE_S
                    continue
                for ev in cursor.absorb(result):
                    yield ev
    finally:
        for task in tasks:
            task.cancel()


class AsyncWatchCalls:
    """``watch`` and ``watch_key`` of ``AsyncKVClient`` (a mixin)."""

    def watch(self, prefix: str | bytes, start: str | None = None) -> AsyncIterator[Event]:
        """``KVClient.watch`` as an async iterator: ``async for ev in kv.watch("p/")``."""
        return watch_events_async(self, _wire(prefix), False, start)  # type: ignore[arg-type]

    def watch_key(self, key: str | bytes, start: str | None = None) -> AsyncIterator[Event]:
        """``watch`` for exactly one key."""
        return watch_events_async(self, _wire(key), True, start)  # type: ignore[arg-type]


def _wire(k: str | bytes) -> bytes:
    return k.encode() if isinstance(k, str) else bytes(k)
