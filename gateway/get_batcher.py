"""The GETs that reach the gateway in one event-loop turn go to the cluster as one batch.

Under load the gateway parses many ``GET /kv/{key}`` requests per loop turn (one per
connection that became readable). Sent one by one, each is a message through the broker
to a shard leader and back, and most of the cluster's CPU per GET is that per-message
work. Here the GETs of one turn with the same consistency level leave as one
``MultiGetRequest`` (``AsyncKVClient.mget_versioned``: the broker splits it per shard, each
leader answers its keys in one message), as proxies in front of Redis pipeline their
clients' commands. A turn with a single GET sends a plain ``GetRequest``, so an idle
gateway answers as before.

Same answers: a batch is sent after every one of its requests arrived and answered
before any of them is, and each shard's part is read as the level says (``linearizable``:
the leader confirms its leadership first), so each GET still reads at a point inside its
own request's lifetime. A key the limits refuse fails alone (checked before it joins a
batch); an error of the whole batch (timeout, no leader) is the error each of its GETs
would have had on its own, raised to each. At most ``MAX_BATCH`` keys per batch (the
rest start the next one); a key asked twice in one turn is read once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from zkv.client.aio import AsyncKVClient
from zkv.protocol.messages import Consistency

#: keys per batch: a reply of big values is cut at the multi-reply limit and finished in
#: further rounds by the client, so this only bounds how many GETs share one fate
MAX_BATCH = 64

Found = tuple[bytes, int] | None


class GetBatcher:
    """``get_versioned`` that batches with the other GETs of the same loop turn."""

    def __init__(self, client: Callable[[], AsyncKVClient], max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        self.client = client
        self.max_batch = max_batch
        #: per consistency level (None: the client's default), key -> waiting futures
        self._waiting: dict[Consistency | None, dict[bytes, list[asyncio.Future[Found]]]] = {}
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()  # the loop keeps only weak refs
        self.batches = 0  # sent as a MultiGetRequest (tests and the benchmark read these)
        self.singles = 0

    async def get_versioned(self, key: str | bytes,
                            consistency: Consistency | None = None) -> Found:
        kv = self.client()
        wire = kv.limits.key(key)  # a refused key fails here, alone
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Found] = loop.create_future()
        self._waiting.setdefault(consistency, {}).setdefault(wire, []).append(fut)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)  # after the tasks this turn already started
        return await fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        waiting, self._waiting = self._waiting, {}
        kv = self.client()
        for level, by_key in waiting.items():
            keys = list(by_key)
            for i in range(0, len(keys), self.max_batch):
                part = {k: by_key[k] for k in keys[i:i + self.max_batch]}
                task = asyncio.ensure_future(self._send(kv, level, part))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _send(self, kv: AsyncKVClient, level: Consistency | None,
                    part: dict[bytes, list[asyncio.Future[Found]]]) -> None:
        found: dict[str | bytes, Found]
        try:
            if len(part) == 1:
                self.singles += 1
                (key,) = part
                found = {key: await kv.get_versioned(key, consistency=level)}
            else:
                self.batches += 1
                found = await kv.mget_versioned(list(part), consistency=level)
        except BaseException as exc:  # noqa: BLE001 - each waiting GET gets it as its own
            for futs in part.values():
                for fut in futs:
                    if not fut.done():
                        fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for key, futs in part.items():
            for fut in futs:
                if not fut.done():  # its request may have been cancelled (client gone)
                    fut.set_result(found[key])
