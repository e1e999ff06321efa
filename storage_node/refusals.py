"""Redialing connections whose Curve handshake a server refused.

Why: libzmq (4.3) reconnects a dropped connection by itself, but not one whose handshake
the server's ZAP handler refused: that session ends for good. A node whose key is
trusted only once a membership change commits (``protocol/node_keys.py``) is refused by
its peers and the brokers until then, and would stay cut off after. So the node watches
its dialing sockets (peers, brokers, heartbeats) for ``EVENT_HANDSHAKE_FAILED_AUTH`` and
reopens a refused one, at most once per ``retry_s`` (a refused dial costs the server a
handshake and a warning, so not at libzmq's 100 ms pace).

``RefusedDials`` decides (pure: names and times in, names due out); ``RefusalMonitors``
reads libzmq's monitor sockets, once per heartbeat, never on the hot path.
"""

from __future__ import annotations

import contextlib
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message


class RefusedDials:
    """When to reopen refused connections (by name): ``retry_s`` after the refusal."""

    def __init__(self, retry_s: float) -> None:
        self.retry_s = retry_s
        self._refused_at: dict[str, float] = {}

    def refused(self, name: str, now: float) -> None:
        self._refused_at.setdefault(name, now)

    def forget(self, name: str) -> None:
        self._refused_at.pop(name, None)

    def due(self, now: float) -> list[str]:
        """The names to reopen now (each forgotten: its new socket is watched anew)."""
        names = sorted(n for n, t in self._refused_at.items() if now >= t + self.retry_s)
        for n in names:
            del self._refused_at[n]
        return names


class RefusalMonitors:
    """A libzmq monitor per watched socket, reporting only refused handshakes."""

    EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH

    def __init__(self) -> None:
        self._watched: dict[str, tuple[zmq.Socket[Any], zmq.Socket[Any]]] = {}

    def watch(self, name: str, sock: zmq.Socket[Any]) -> None:
        """Watch ``sock`` (before it connects) under ``name``."""
        self.forget(name)
        self._watched[name] = (sock, sock.get_monitor_socket(self.EVENTS))

    def forget(self, name: str) -> None:
        """Stop watching (before the socket closes)."""
        got = self._watched.pop(name, None)
        if got is None:
            return
        sock, mon = got
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        mon.close(linger=0)

    def refused(self) -> list[str]:
        """The names whose sockets had a handshake refused since the last call."""
        out = []
        for name, (_, mon) in self._watched.items():
            hit = False
            while True:
                try:
                    event = recv_monitor_message(mon, zmq.NOBLOCK)
                except zmq.Again:
                    break
                hit = hit or event["event"] == self.EVENTS
            if hit:
                out.append(name)
        return out

    def close(self) -> None:
        for name in list(self._watched):
            self.forget(name)
