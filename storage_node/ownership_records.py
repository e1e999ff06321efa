"""The records of a ring change a shard replicates: declarative. Pure.

``ownership.py`` owns the rules (its docstring is the theory of operation); this module
holds only what those rules keep per migration, and how each record goes to and from a
snapshot: a source's progress at a target (``SourceProgress``: phase, cursor, v0/v1,
sessions merged), the source's ``Outgoing`` side (the last write index of each leaving
key, since MIGRATE_OUT), the target's ``Incoming`` side, and the ring wire helpers. Kept
apart so the rules read on their own; ``ownership.py`` re-exports the names other code
imports from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zkv.protocol.admin import Phase, SourceInfo
from zkv.protocol.limits import INT_MAX
from zkv.protocol.ring import Ring, RingConfig, position

#: Per source at a target: the bulk copy, a catch-up of what was written meanwhile (not
#: fenced), the final delta (fenced), done (aliases of ``Phase``, for older imports).
PHASE_COPY, PHASE_CATCHUP, PHASE_DELTA, PHASE_DONE = (
    Phase.COPY, Phase.CATCHUP, Phase.DELTA, Phase.DONE)
V0_NONE = INT_MAX


@dataclass(slots=True)
class SourceProgress:
    phase: Phase = Phase.COPY
    cursor: bytes = b""
    #: every moving key not written at the source after v0 is here in its final state
    v0: int = V0_NONE
    sessions: bool = False
    #: the catch-up's own v0, in force once it is done
    v1: int = V0_NONE

    def to_state(self) -> list[Any]:
        return [self.phase, self.cursor, self.v0, self.sessions, self.v1]

    @classmethod
    def from_state(cls, v: Any) -> SourceProgress:
        phase, cursor, v0, sessions, v1 = v
        return cls(Phase(phase), bytes(cursor), int(v0), bool(sessions), int(v1))

    def info(self, shard: int) -> SourceInfo:
        return SourceInfo(shard, self.phase, self.cursor, self.v0, self.sessions, self.v1)


@dataclass(slots=True)
class Outgoing:
    """A source's side of a ring change: the last log index of each write, since
    MIGRATE_OUT, to a key that leaves this shard."""

    old: RingConfig
    new: RingConfig
    dirty: dict[bytes, int] = field(default_factory=dict)
    _new_ring: Ring = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._new_ring = Ring(self.new)

    def leaves(self, key: bytes, me: int | None) -> bool:
        return self._new_ring.shard_for(key) != me


@dataclass(slots=True)
class Incoming:
    old: RingConfig
    new: RingConfig
    sources: dict[int, SourceProgress]

    def complete(self) -> bool:
        return all(p.phase == Phase.DONE and p.sessions for p in self.sources.values())


def ring_wire(r: RingConfig | None) -> list[Any] | None:
    return None if r is None else r.to_wire()


def ring_from_wire(v: Any) -> RingConfig | None:
    return None if v is None else RingConfig.from_wire(v)


def moving(old: Ring, new: Ring, key: bytes) -> tuple[int, int]:
    """(old owner, new owner) of ``key``."""
    p = position(key)
    return old.owner_of_position(p), new.owner_of_position(p)
