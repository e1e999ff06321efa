"""The ``zkv bench`` load generator: the request codec, the socket windows and the loop.

Theory of operation: a few DEALER sockets in one thread, each with a window of
outstanding requests; every reply immediately triggers the next request on the same
socket, so ``concurrency`` requests stay in flight. Requests are built by a
``RequestCodec`` straight into msgpack frames (the exact bytes ``zkv.protocol.codec.encode``
produces, checked by a unit test) and replies are parsed just enough to learn
``(request_id, error_code)``: the generator must cost far less than the server.

``generate`` runs ``warmup_s`` (replies not recorded) then ``duration_s`` (recorded),
then closes the sockets with linger 0: every run stops by itself. A request unanswered
for ``request_timeout_s`` counts as a ``TIMEOUT`` error and its window slot is refilled.
It returns raw samples; ``ops/bench_stats.py`` summarizes them.
"""

from __future__ import annotations

import os
import random
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zkv.protocol.codec import INLINE_BLOB_BYTES_MAX
from zkv.protocol.compat import LEGACY_VERSION
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    Consistency,
    ErrorReply,
    GetRequest,
    PutRequest,
)
from zkv.protocol.security import Curve

OP_GET = 0
OP_PUT = 1
OP_NAMES = ("get", "put")
REQUEST_TIMEOUT_S = 2.0
EXPIRY_SCAN_S = 0.1
PROGRESS_TICK_S = 0.25


# --------------------------------------------------------------------------- wire


class RequestCodec:
    """zkv framing, built without dataclasses: the bytes ``zkv.protocol.codec`` would send
    (stamped version 1: both requests read the same in the previous release)."""

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack

    def get(self, client_id: bytes, rid: int, key: bytes, consistency: int) -> list[bytes]:
        return [self._pack([LEGACY_VERSION, GetRequest.TYPE, client_id, rid, key,
                            consistency])]

    def put(self, client_id: bytes, rid: int, key: bytes, lowest: int,
            value: bytes) -> list[bytes]:
        if len(value) <= INLINE_BLOB_BYTES_MAX:  # small values ride in the header
            return [self._pack([LEGACY_VERSION, PutRequest.TYPE, client_id, rid, key, lowest,
                                value])]
        return [self._pack([LEGACY_VERSION, PutRequest.TYPE, client_id, rid, key, lowest]),
                value]

    def parse_reply(self, frames: list[bytes]) -> tuple[int, int]:
        """``(request_id, error_code or 0)``; ``(-1, 0)`` for frames we cannot read."""
        try:
            head = msgpack.unpackb(frames[0], raw=False)
            rid = head[2]
            code = head[3] if head[1] == ErrorReply.TYPE else 0
        except Exception:
            return -1, 0
        return (rid, code) if type(rid) is int else (-1, 0)


@dataclass(frozen=True)
class Workload:
    keys: int = 10_000
    value_size: int = 100
    read_ratio: float = 0.5
    consistency: int = int(Consistency.LINEARIZABLE)
    key_prefix: str = "bench-"


# --------------------------------------------------------------------------- generator


class _Window:
    """One DEALER socket and the requests outstanding on it (rid -> (t0, op), oldest first)."""

    __slots__ = ("sock", "client_id", "next_rid", "outstanding", "size")

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, size: int,
                 curve: Curve | None = None) -> None:
        # One endpoint per socket: a DEALER connected to several would queue requests
        # for a broker that is not (yet) connected instead of the live ones.
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        if curve is not None:
            curve.broker_client(self.sock, endpoint)
        self.sock.connect(endpoint)
        self.client_id = os.urandom(16)
        self.next_rid = 1
        self.outstanding: dict[int, tuple[float, int]] = {}
        self.size = size


def spread(endpoints: Sequence[str], concurrency: int, sockets: int = 0) -> list[tuple[str, int]]:
    """``(endpoint, window size)`` per socket: ``sockets`` sockets (0: one per 16
    requests, 1..16), at least one per broker while ``concurrency`` allows, brokers
    assigned round robin and the window sizes differing by at most one."""
    n_socks = sockets or max(1, min(16, concurrency // 16))
    n_socks = min(max(n_socks, len(endpoints)), concurrency)
    return [(endpoints[i % len(endpoints)],
             concurrency // n_socks + (1 if i < concurrency % n_socks else 0))
            for i in range(n_socks)]


def generate(
    endpoints: Sequence[str],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    workload: Workload,
    *,
    sockets: int = 0,
    seed: int | None = None,
    codec: RequestCodec | None = None,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    tick: Callable[[int, int], None] | None = None,
    key_dir: str | None = None,
) -> dict[str, Any]:
    """Drive the load; return raw samples ``{"lat": [array per op], "errors": {...}, "ops"}``."""
    codec = codec or RequestCodec()
    rng = random.Random(seed)
    keys = [f"{workload.key_prefix}{i:08d}".encode() for i in range(workload.keys)]
    value = rng.randbytes(workload.value_size)
    ctx: zmq.Context[Any] = zmq.Context()
    curve = None if key_dir is None else Curve.for_identity(Path(key_dir))
    windows: list[_Window] = []
    try:
        for endpoint, size in spread(endpoints, concurrency, sockets):
            windows.append(_Window(ctx, endpoint, size, curve))
    except BaseException:
        for w in windows:
            w.sock.close(linger=0)
        ctx.term()
        raise
    by_sock = {w.sock: w for w in windows}
    poller = zmq.Poller()
    for w in windows:
        poller.register(w.sock, zmq.POLLIN)
    lat: list[array[int]] = [array("q"), array("q")]
    errors: dict[str, int] = {}
    read_ratio, consistency = workload.read_ratio, workload.consistency
    n_keys = len(keys)
    perf = time.perf_counter
    ok = 0
    err = 0
    warm = 0  # answered during the warmup (not in the figures; see BenchResult)

    def send(w: _Window, now: float) -> None:
        rid = w.next_rid
        w.next_rid = rid + 1
        key = keys[rng.randrange(n_keys)]
        if rng.random() < read_ratio:
            frames = codec.get(w.client_id, rid, key, consistency)
            op = OP_GET
        else:
            low = next(iter(w.outstanding), rid)
            frames = codec.put(w.client_id, rid, key, low, value)
            op = OP_PUT
        w.outstanding[rid] = (now, op)
        w.sock.send_multipart(frames, copy=False) if len(frames[-1]) > 65536 else \
            w.sock.send_multipart(frames)

    start = perf()
    measure_from = start + warmup_s
    end = measure_from + duration_s
    try:
        for w in windows:
            for _ in range(w.size):
                send(w, perf())
        next_scan = next_tick = start
        now = start
        while now < end:
            timeout_ms = max(0, min(100, int((end - now) * 1000) + 1))
            for sock, _ in poller.poll(timeout_ms):
                w = by_sock[sock]
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    rid, code = codec.parse_reply(frames)
                    entry = w.outstanding.pop(rid, None)
                    if entry is None:
                        continue  # stale (already expired) or unreadable
                    now = perf()
                    if now >= end:
                        break
                    if now >= measure_from:
                        if code:
                            err += 1
                            name = _code_name(code)
                            errors[name] = errors.get(name, 0) + 1
                        else:
                            ok += 1
                            lat[entry[1]].append(int((now - entry[0]) * 1e6))
                    elif not code:
                        warm += 1
                    send(w, now)
            now = perf()
            if now >= next_scan:
                next_scan = now + EXPIRY_SCAN_S
                expired = _expire(windows, now - request_timeout_s)
                if expired and now >= measure_from:
                    err += expired
                    errors["TIMEOUT(client)"] = errors.get("TIMEOUT(client)", 0) + expired
                for w in windows:
                    while len(w.outstanding) < w.size:
                        send(w, now)
            if tick is not None and now >= next_tick:
                next_tick = now + PROGRESS_TICK_S
                tick(ok, err)
    finally:
        for w in windows:
            w.sock.close(linger=0)
        ctx.term()
    if tick is not None:
        tick(ok, err)
    return {"lat": lat, "errors": errors, "ops": ok, "warmup_ops": warm,
            "elapsed_s": min(perf(), end) - measure_from}


def _expire(windows: list[_Window], cutoff: float) -> int:
    """Forget requests sent before ``cutoff`` (oldest first); return how many."""
    n = 0
    for w in windows:
        out = w.outstanding
        while out:
            rid = next(iter(out))
            if out[rid][0] >= cutoff:
                break
            del out[rid]
            n += 1
    return n


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"CODE_{code}"
