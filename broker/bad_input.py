"""What the broker does with bad input: rate-limited warnings, dropping a message's tail.

Nothing from the network stops the broker; it logs. ``WarningLimiter`` keeps that from
flooding the log: at most ``WARNINGS_PER_WINDOW`` lines per ``WARNING_WINDOW_S`` per
source, the rest counted and summarized in one line. ``discard_rest`` drops what is left
of a multipart message the broker refuses, so the next receive starts a new message.
"""

from __future__ import annotations

import math
from typing import Any

import zmq

WARNINGS_PER_WINDOW = 10
WARNING_WINDOW_S = 10.0


class WarningLimiter:
    """At most ``limit`` warnings per ``window_s``; the rest are counted and summarized."""

    def __init__(
        self,
        log: Any,
        source: str,
        limit: int = WARNINGS_PER_WINDOW,
        window_s: float = WARNING_WINDOW_S,
    ) -> None:
        self._log = log
        self._source = source
        self._limit = limit
        self._window_s = window_s
        self._window_start = -math.inf
        self._count = 0
        self._suppressed = 0

    def warn(self, now: float, message: str, *args: Any) -> None:
        if now - self._window_start >= self._window_s:
            self.flush(now)
            self._window_start = now
            self._count = 0
        if self._count < self._limit:
            self._count += 1
            self._log.warning(message, *args)
        else:
            self._suppressed += 1

    def flush(self, now: float) -> None:
        if self._suppressed and now - self._window_start >= self._window_s:
            self._log.warning(
                "{}: {} more warnings suppressed in the last {:.0f} s",
                self._source, self._suppressed, self._window_s,
            )  # fmt: skip
            self._suppressed = 0


def discard_rest(sock: zmq.Socket[Any]) -> int:
    """Receive and drop the remaining parts of the current message; returns how many."""
    n = 0
    while sock.get(zmq.RCVMORE):
        sock.recv(zmq.NOBLOCK, False)
        n += 1
    return n
