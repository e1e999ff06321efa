"""Ending a drain of a zmq socket without the exception of an empty receive.

The node and the broker drain each ready socket with non-blocking receives. Ending
that loop on ``zmq.Again`` builds a Python exception (its message looked up through
``zmq_strerror``): 5-9 us on this project's 2-core machine, against ~2 us for asking
the socket whether another message waits. One request at a time, every drain holds a
single message and the exception sat on every request's path (in the broker, before
the forward; in the node, before the reply), so the drains ask after their first
message and keep ``Again`` as the end only for drains that hold more.
"""

from __future__ import annotations

from typing import Any, cast

import zmq

# plain ints: ``zmq.POLLIN`` is an IntFlag, and ``int & IntFlag`` builds a flag member
# through the enum machinery (~1 us, a third of the question's cost)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def more_waiting(sock: zmq.Socket[Any]) -> bool:
    """Whether another message can be received from ``sock`` without blocking."""
    return bool(cast(int, sock.getsockopt(_EVENTS)) & _POLLIN)
