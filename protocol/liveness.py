"""Connection liveness: every long-lived zmq connection proves it is alive.

A TCP connection can die without either end being told: a network fault, a container
that came back on a new address, a NAT that forgot the flow, a peer that closed its
end while ours stayed ESTABLISHED. zmq then keeps queueing into the dead pipe and never
reconnects, and a ROUTER may keep the stale pipe for an identity while ignoring the
live one. So every socket between zkv processes runs ZMTP heartbeats: a PING every
``interval``; no traffic at all for ``timeout`` closes the connection, and the
connecting side reconnects (resolving the peer's name again). PINGs are answered by
zmq's I/O thread, not by Python, so a busy node loop never looks dead; a stopped
process (SIGSTOP) does, which is what we want. TCP keepalive backs this up for sockets
that see no traffic at all.

The timeout is one election timeout: a dead connection is replaced before the failure
detector would act on the silence it causes.
"""

from __future__ import annotations

from typing import Any

import zmq

#: PINGs per timeout: a few, so one delayed PONG does not drop a healthy connection.
PINGS_PER_TIMEOUT = 4
TCP_KEEPALIVE_IDLE_S = 10
TCP_KEEPALIVE_INTERVAL_S = 2
TCP_KEEPALIVE_COUNT = 3


def keep_alive(sock: zmq.Socket[Any], timeout_ms: int) -> None:
    """Turn on ZMTP heartbeats (dead after ``timeout_ms`` of silence) and TCP keepalive."""
    if timeout_ms < PINGS_PER_TIMEOUT:
        raise ValueError("timeout_ms is too small for heartbeats")
    sock.setsockopt(zmq.HEARTBEAT_IVL, timeout_ms // PINGS_PER_TIMEOUT)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
    # What we ask the other end to use if it hears nothing from us (rounded to 100 ms).
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, timeout_ms))
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_COUNT)
