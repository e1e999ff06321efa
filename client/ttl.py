"""The SDKs' side of keys that expire (TTL), shared by ``sdk.py`` and ``aio.py``.

A TTL is given in seconds (int or float) and sent as whole milliseconds, rounded up:
the store never expires a key earlier than asked. ``ttl(key)`` answers ``None`` when
the key does not exist (or expired), ``math.inf`` when it never expires, else the
seconds left at the shard leader when it answered.
"""

from __future__ import annotations

import math
from typing import Any

from zkv.protocol.messages import TtlReply
from zkv.protocol.ttl_messages import TTL_MS_MAX


def ttl_ms(seconds: Any) -> int:
    """Seconds -> whole milliseconds (rounded up); ``TypeError``/``ValueError`` if bad."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"ttl must be a number of seconds, got {type(seconds).__name__}")
    if not 0 < seconds <= TTL_MS_MAX / 1000:  # also refuses nan
        raise ValueError(f"ttl must be > 0 and <= {TTL_MS_MAX // 1000} seconds, got {seconds}")
    return max(1, math.ceil(seconds * 1000))


def ttl_seconds(reply: TtlReply) -> float | None:
    """What ``ttl(key)`` returns for a ``TtlReply``."""
    if not reply.found:
        return None
    if not reply.expires:
        return math.inf
    return reply.ttl_ms / 1000
