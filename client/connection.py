"""The sync client's edges: its connection to one broker and its clock.

``KVClient`` (``client/sdk.py``) talks to a broker only through a ``Connection`` and
reads time only through a ``Clock``, so tests can swap both for fakes and run the client
with no socket and no wall-clock wait. The real ones: ``ZmqConnection``, a DEALER
connected to one broker and closed with linger 0 (the Lazy Pirate: a connection that
went silent is thrown away, with whatever it still queued, never reused), and
``MonotonicClock``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import zmq

from zkv.protocol.security import Curve


class Connection(Protocol):
    """One connection to one broker, as the sync client needs it."""

    def send(self, frames: list[bytes]) -> None: ...

    def recv(self, until: float) -> list[bytes] | None:
        """The next frames, or None if none arrive before clock time ``until``."""

    def close(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``time.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def open_dealer(ctx: zmq.Context[Any], endpoint: str, curve: Curve | None) -> zmq.Socket[Any]:
    """A plain (not asyncio) DEALER to broker ``endpoint``, linger 0, Curve when given
    keys; a bad endpoint is ``ValueError``. Both clients' connections start here."""
    sock: zmq.Socket[Any] = zmq.Socket(ctx, zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:  # Curve: this client's key, the broker's expected key
        curve.broker_client(sock, endpoint)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ValueError(f"cannot connect to {endpoint!r}: {exc}") from exc
    return sock


class ZmqConnection:
    """A DEALER connected to one broker, closed with linger 0 (Lazy Pirate)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, curve: Curve | None = None) -> None:
        self._sock: zmq.Socket[Any] = open_dealer(ctx, endpoint, curve)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def send(self, frames: list[bytes]) -> None:
        self._sock.send_multipart(frames, copy=len(frames[-1]) < 65536)

    def recv(self, until: float) -> list[bytes] | None:
        left_ms = math.ceil((until - time.monotonic()) * 1000)
        if left_ms <= 0 or not self._poller.poll(left_ms):
            return None
        return self._sock.recv_multipart()

    def close(self) -> None:
        self._poller.unregister(self._sock)
        self._sock.close(linger=0)
