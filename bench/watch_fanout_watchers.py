"""The watcher side of ``bench/watch_fanout.py``: one spawned process, many watchers.

Each watcher is ``AsyncKVClient.watch(prefix, start=token)`` on a client of its own
(its own connection and client id, as separate applications would be); the process's
watchers share one event loop. The conversation with the parent, over a pipe:

- the process starts every watcher from ``token`` and sends ``("ready", None)`` once
  each has received the marker key ``prefix + HELLO`` (written after ``token``, so a
  watcher that has it is connected and caught up);
- the parent sends ``(acked, drain_s)`` after the writes: per writer, one byte per
  write, 1 if it was acknowledged; each watcher then has ``drain_s`` to receive the
  acknowledged writes it has not got yet;
- the process answers ``("result", {...})``: per watcher its events, missing
  (acknowledged, never received), duplicates and unacknowledged writes received; the
  events received per ``BIN_S`` of receipt time (all watchers together, from
  ``origin``, a ``time.monotonic()`` of the parent: the clock is system-wide); the
  receipt times of every ``lag_every``-th write; the client resends of polls.
  Or ``("error", text)`` if it failed.

Keys: ``writer_key`` (writer and sequence number, parsed back per event); any other
key under the prefix (the marker, the probe's keys) is not counted.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from zkv.client.aio import AsyncKVClient
from zkv.protocol.errors import KVError

READY_S = 60.0  # watchers connected and caught up with the marker
BIN_S = 0.1  # events are counted per 100 ms of receipt time
HELLO = b"hello"

Missing = list[tuple[int, int]]  # (writer, seq)


def writer_key(prefix: bytes, writer: int, seq: int) -> bytes:
    return prefix + b"%03d/%09d" % (writer, seq)


@dataclass
class Tally:
    """What one watcher received: per writer, how often each of its writes arrived
    (a byte per write, saturating at 255)."""

    seen: list[bytearray]
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    events: int = 0
    error: str = ""

    def got(self, w: int, s: int) -> bool:
        return s < len(self.seen[w]) and self.seen[w][s] > 0

    def missing(self, acked: list[bytes]) -> Missing:
        return [(w, s) for w, bits in enumerate(acked) for s, a in enumerate(bits)
                if a and not self.got(w, s)]

    def summary(self, acked: list[bytes], missing: Missing) -> dict[str, Any]:
        dups = sum(1 for seen in self.seen for n in seen if n > 1)
        unacked = sum(1 for w, seen in enumerate(self.seen) for s, n in enumerate(seen)
                      if n and not (s < len(acked[w]) and acked[w][s]))
        return {"events": self.events, "missing": len(missing), "duplicates": dups,
                "unacked_delivered": unacked, "error": self.error}


@dataclass
class Receipts:
    """What the process's watchers received, together: events per bin, lag samples."""

    origin: float
    bins: list[int]
    lag_every: int
    samples: list[tuple[int, int, float]] = field(default_factory=list)


async def watch_one(client: AsyncKVClient, prefix: bytes, token: str, tally: Tally,
                    receipts: Receipts) -> None:
    plen, bins = len(prefix), receipts.bins
    try:
        async for ev in client.watch(prefix, start=token):
            now = time.monotonic()
            rest = ev.key[plen:]
            if rest[3:4] != b"/":  # the marker or a probe
                if rest == HELLO:
                    tally.ready.set()
                continue
            w, s = int(rest[:3]), int(rest[4:])
            seen = tally.seen[w]
            if s >= len(seen):
                seen.extend(bytes(s + 1 - len(seen) + 4096))
            if seen[s] < 255:
                seen[s] += 1
            tally.events += 1
            b = int((now - receipts.origin) / BIN_S)
            if 0 <= b < len(bins):
                bins[b] += 1
            if s % receipts.lag_every == 0:
                receipts.samples.append((w, s, now))
    except (KVError, OSError) as exc:
        tally.error = f"{type(exc).__name__}: {exc}"
        tally.ready.set()


async def watchers_main(conn: Connection, endpoint: str, prefix: bytes, token: str,
                        count: int, writers: int, lag_every: int, origin: float,
                        horizon_s: float) -> None:
    loop = asyncio.get_running_loop()
    tallies = [Tally([bytearray() for _ in range(writers)]) for _ in range(count)]
    receipts = Receipts(origin, [0] * int(horizon_s / BIN_S), lag_every)
    clients = [AsyncKVClient(endpoint, timeout_s=10) for _ in range(count)]
    tasks = [asyncio.create_task(watch_one(c, prefix, token, t, receipts))
             for c, t in zip(clients, tallies, strict=True)]
    try:
        async with asyncio.timeout(READY_S):
            for t in tallies:
                await t.ready.wait()
        conn.send(("ready", None))
        acked, drain_s = await loop.run_in_executor(None, conn.recv)
        missing = [t.missing(acked) for t in tallies]
        deadline = time.monotonic() + drain_s
        while any(missing) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            missing = [[(w, s) for w, s in m if not t.got(w, s)]
                       for t, m in zip(tallies, missing, strict=True)]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.close()
    conn.send(("result", {
        "watchers": [t.summary(acked, m) for t, m in zip(tallies, missing, strict=True)],
        "bins": receipts.bins, "samples": receipts.samples,
        "resends": sum(c.resends for c in clients)}))


def watchers_proc(conn: Connection, nice: int, *args: Any) -> None:
    """A spawned process's entry point: ``watchers_main`` on a fresh event loop, at
    ``nice`` (see ``--nice`` in ``watch_fanout.py``)."""
    try:
        os.nice(nice)
        asyncio.run(watchers_main(conn, *args))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
