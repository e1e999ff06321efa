"""Read consistency levels (re-exported by ``protocol.messages``); a module of its own
so message modules that ``messages`` imports can use it too."""

from __future__ import annotations

import enum


class Consistency(enum.IntEnum):
    """Read consistency. LINEARIZABLE confirms leadership with a majority round."""

    LINEARIZABLE = 0
    LEADER = 1
    STALE = 2
