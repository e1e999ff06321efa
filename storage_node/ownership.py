"""Which keys a shard owns, and the replicated state of a ring change.

This is part of the state machine (``state_machine.py`` applies the ring commands here),
so every replica of a shard holds the same ring, fence and migration progress, derived
only from the log, and it survives restarts through snapshots.

Theory of operation (one migration moves the keys whose owner differs between ring
``old`` at epoch E and ring ``new`` at epoch E+1; see ``ops/rebalance.py`` for the
coordinator that drives the steps; phases are ``protocol.admin.Phase``):

- Ownership. A shard serves key k iff ``ring.shard_for(k)`` is this shard and, while a
  fence is up, ``fence.shard_for(k)`` is too. Otherwise it answers ``WRONG_SHARD`` (not
  ours at this epoch, with the epoch) or ``UNAVAILABLE`` (fenced: moving right now,
  retry). The node checks before proposing; the state machine checks again when a
  write is applied, because a write accepted just before a FENCE entry is applied
  after it. So after the FENCE entry, no write to a moving key takes effect at the
  source, whatever a stale broker sends, and a refused write is not recorded in the
  session table (it did not happen; its retry will be applied by the new owner).
- MIGRATE_BEGIN (target): records ``incoming`` = (old, new) and, per source, progress:
  phase 1 (bulk copy), 2 (catch-up), 3 (final delta, fenced), 4 (done), plus
  ``sessions`` once the source's session table was merged. A new shard adopts ``old``
  here (it started with no ring that names it).
- MIGRATE_OUT (source, before its phase 1 starts): from this entry on, the log index of
  every write to a key that leaves this shard is kept in ``outgoing.dirty``.
- MIGRATE_IN phase 1, the copy (unfenced): ``[key, value, version]`` items, as they are;
  ``v0`` is the lowest applied index of any source listing used (``min`` over
  batches), and every listing is taken after MIGRATE_OUT applied. A moving key not
  written after v0 has the state phase 1 delivered (present with that value, or never
  listed because absent); one written after v0 is in the source's ``dirty`` with an
  index above v0.
- MIGRATE_IN phase 2, the catch-up (unfenced): the keys dirty above v0, listed at some
  index v1 (``min`` over batches): the value if the key exists, a bare ``[key]``
  (delete) if not, as read at or after v1. When it is done, v0 becomes v1: a key not
  written after v1 is now here in its final state.
- FENCE (source): from this entry on, moving keys are refused (reads too: the target
  may flip and take writes any time after the fence commits), so ``dirty`` is final.
- MIGRATE_IN phase 3, the final delta (fenced): the same for the keys dirty above v0.
  Its size is what was written during the catch-up, not the size of the moving ranges
  nor what was written during the copy: the fence stays short.
- MIGRATE_SESSIONS: merges the source's session table (taken after the fence, so it
  holds the replies of every write that ever applied to a moving key) and raises the
  version offset past every version the source assigned. Exactly once: a client whose
  write applied at the source but whose reply was lost retries; the source refuses it
  (fenced or WRONG_SHARD, checked before the session lookup only by the node, which
  never proposes it), the new owner finds the cached reply and does not apply it again.
- RING_SET (every shard, targets first): adopt ``new``; clears the fence and
  ``incoming``. A shard that gains keys refuses the flip unless every source of its
  incoming keys reached phase 3 with sessions merged: no shard can own keys it lacks.
- DROP_UNOWNED (after the flip): delete keys not owned under the current ring: the
  listed ones (the leader lists them a slice per loop turn and proposes them in
  batches, the last batch marking the drop complete), or all of them (unlisted form).
- MIGRATE_IN of a direct stream carries ``after``: it applies only if the target's
  cursor for that source and phase is exactly ``after``, so each batch applies once
  and in order whatever the network repeats or delays; the answer carries the cursor
  so the sender can resume from where the target really is.
- Deadlines (TTL) travel with their keys: a copied or delta item is
  ``[key, value, version, deadline]`` when the key expires (``[key, value, version]``
  otherwise, which clears any deadline the target held), a deleted or dropped key
  loses its deadline. An expired key still in the table moves like any other and
  expires at its target.
- Versions: a key's version is the log index that wrote it plus ``version_offset``
  (0 until keys migrate in). Migrated keys keep their version and raise the offset
  so every later version at this shard exceeds it: per-key versions stay increasing.

Every command is idempotent (a retried or resumed step applies as a no-op), and a
command for a migration this shard does not know answers ``Applied(ok=False)`` and
changes nothing. Rings are stored in snapshots as ``RingConfig.to_wire()``. Pure: no
clock, no I/O.
"""

from __future__ import annotations

from typing import Any

import msgpack

from zkv.protocol.admin import Applied, IncomingInfo, OutgoingInfo, Phase
from zkv.protocol.errors import ErrorCode, KVError
from zkv.protocol.ring import Ring, RingConfig, plan_moves, position
from zkv.storage_node.commands import (
    DropUnowned,
    Fence,
    MigrateBegin,
    MigrateIn,
    MigrateOut,
    MigrateSessions,
    RingCommand,
    RingSet,
)
from zkv.storage_node.expiry import ExpiryIndex
from zkv.storage_node.ownership_records import (
    PHASE_CATCHUP,
    PHASE_COPY,
    PHASE_DELTA,
    PHASE_DONE,
    V0_NONE,
    Incoming,
    Outgoing,
    SourceProgress,
    moving,
    ring_from_wire,
    ring_wire,
)

__all__ = [
    "PHASE_CATCHUP", "PHASE_COPY", "PHASE_DELTA", "PHASE_DONE", "V0_NONE", "Incoming",
    "Outgoing", "Ownership", "SourceProgress", "moving", "ring_from_wire", "ring_wire",
]


class Ownership:
    """Ring, fence and incoming migration of one shard's state machine."""

    def __init__(self, shard_id: int | None = None, ring: RingConfig | None = None) -> None:
        self.shard_id = shard_id
        self.ring: Ring | None = None
        self.fence: Ring | None = None
        self.incoming: Incoming | None = None
        self.outgoing: Outgoing | None = None
        self.version_offset = 0
        #: a RING_SET applied and no DROP_UNOWNED since: keys may linger (for resume)
        self.undropped = False
        self._all_mine = True
        self._set_ring(ring)

    # ------------------------------------------------------------------ hot path

    def refusal(self, key: bytes) -> int:
        """0 if this shard serves ``key`` now, else the ``ErrorCode`` to answer."""
        if self._all_mine:
            return 0
        p = position(key)
        assert self.ring is not None
        if self.ring.owner_of_position(p) != self.shard_id:
            return ErrorCode.WRONG_SHARD
        if self.fence is not None and self.fence.owner_of_position(p) != self.shard_id:
            return ErrorCode.UNAVAILABLE
        return 0

    def note_write(self, key: bytes, index: int) -> None:
        """A write to ``key`` applied at log ``index`` (the caller checks
        ``outgoing`` first, so a shard with no ring change in flight pays nothing)."""
        out = self.outgoing
        if out is not None and out.leaves(key, self.shard_id):
            out.dirty[key] = index

    @property
    def epoch(self) -> int:
        return self.ring.config.epoch if self.ring is not None else 0

    def _set_ring(self, config: RingConfig | None) -> None:
        self.ring = Ring(config) if config is not None else None
        self._recompute()

    def _recompute(self) -> None:
        self._all_mine = self.shard_id is None or self.ring is None or (
            set(self.ring.config.shards) == {self.shard_id} and self.fence is None
        )

    # ------------------------------------------------------------------ commands

    def apply(self, index: int, cmd: RingCommand, data: dict[bytes, tuple[bytes, int]],
              sessions_merge: Any, expiry: ExpiryIndex | None = None) -> Applied:
        """Apply a ring command at log ``index``; the result for the coordinator.
        ``expiry``: the keys' deadlines, which move with them (TTL)."""
        exp = ExpiryIndex() if expiry is None else expiry
        if self.shard_id is None:
            return Applied(False, "this state machine has no shard id")
        try:
            if isinstance(cmd, RingSet):
                return self._ring_set(cmd.ring)
            if isinstance(cmd, Fence):
                return self._fence(cmd.old, cmd.new)
            if isinstance(cmd, MigrateBegin):
                return self._begin(cmd.old, cmd.new)
            if isinstance(cmd, MigrateOut):
                return self._out(cmd.old, cmd.new)
            if isinstance(cmd, MigrateIn):
                return self._migrate_in(index, cmd, data, exp)
            if isinstance(cmd, MigrateSessions):
                return self._sessions(index, cmd, sessions_merge)
            if isinstance(cmd, DropUnowned):
                return self._drop(cmd, data, exp)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # malformed payload: in the log already, so every replica refuses it alike
            return Applied(False, f"malformed {type(cmd).__name__}: {exc}")
        raise TypeError(f"not a ring command: {cmd!r}")

    def _gains(self, old: RingConfig, new: RingConfig) -> set[int]:
        """Sources this shard receives keys from when ``old`` becomes ``new``."""
        return {m.src for m in plan_moves(Ring(old), Ring(new)) if m.dst == self.shard_id}

    def _ring_set(self, new: RingConfig) -> Applied:
        if new.epoch <= self.epoch:
            return Applied(True, epoch=self.epoch, noop=True)
        if self.ring is not None and self._gains(self.ring.config, new):
            inc = self.incoming
            if inc is None or inc.new != new or inc.old != self.ring.config or not inc.complete():
                return Applied(False, "refusing to own keys whose migration is not "
                               f"complete (epoch {new.epoch})")
        self._set_ring(new)
        self.undropped = True
        if self.fence is not None and self.fence.config.epoch <= new.epoch:
            self.fence = None
        if self.incoming is not None and self.incoming.new.epoch <= new.epoch:
            self.incoming = None
        if self.outgoing is not None and self.outgoing.new.epoch <= new.epoch:
            self.outgoing = None
        self._recompute()
        return Applied(True, epoch=self.epoch)

    def _fence(self, old: RingConfig, new: RingConfig) -> Applied:
        if self.epoch >= new.epoch:
            return Applied(True, epoch=self.epoch, noop=True)
        if self.ring is None or self.ring.config != old:
            return Applied(False, f"fence for epoch {old.epoch}, ring is {self.epoch}")
        if self.fence is None or self.fence.config != new:
            self.fence = Ring(new)
            self._recompute()
        return Applied(True, epoch=self.epoch)

    def _out(self, old: RingConfig, new: RingConfig) -> Applied:
        if self.epoch >= new.epoch:
            return Applied(True, epoch=self.epoch, noop=True)
        if self.ring is None or self.ring.config != old:
            return Applied(False, f"ring change from epoch {old.epoch}, ring is {self.epoch}")
        if self.outgoing is not None and self.outgoing.new != new:
            return Applied(False, f"another migration is in flight (to epoch "
                           f"{self.outgoing.new.epoch})")
        if self.outgoing is None:
            self.outgoing = Outgoing(old, new)
        return Applied(True, epoch=self.epoch)

    def _begin(self, old: RingConfig, new: RingConfig) -> Applied:
        if self.epoch >= new.epoch:
            return Applied(True, epoch=self.epoch, noop=True)
        if self.incoming is not None:
            if (self.incoming.old, self.incoming.new) == (old, new):
                return Applied(True, epoch=self.epoch)
            return Applied(False, f"another migration is in flight (to epoch "
                           f"{self.incoming.new.epoch})")
        if self.epoch > old.epoch:
            return Applied(False, f"ring is at epoch {self.epoch}, past {old.epoch}")
        if self.epoch < old.epoch:
            self._set_ring(old)  # a new shard: it never held a ring that names it
        self.incoming = Incoming(old, new, {s: SourceProgress() for s in self._gains(old, new)})
        return Applied(True, epoch=self.epoch, sources=tuple(sorted(self.incoming.sources)))

    def _progress(self, new_epoch: int, src: int) -> SourceProgress | Applied:
        if self.epoch >= new_epoch:
            return Applied(True, epoch=self.epoch, noop=True)
        inc = self.incoming
        if inc is None or inc.new.epoch != new_epoch or src not in inc.sources:
            return Applied(False, f"no migration from shard {src} to epoch {new_epoch}")
        return inc.sources[src]

    def _migrate_in(self, index: int, cmd: MigrateIn,
                    data: dict[bytes, tuple[bytes, int]], expiry: ExpiryIndex) -> Applied:
        p = self._progress(cmd.new_epoch, cmd.src)
        if isinstance(p, Applied):
            return p
        if cmd.phase != p.phase:  # a retry of a phase already closed, or out of order
            return Applied(cmd.phase < p.phase, phase=p.phase, cursor=p.cursor, stale=True)
        if cmd.after is not None and cmd.after != p.cursor:
            # a resent or late batch of a direct stream: applied already, or not next
            return Applied(True, phase=p.phase, cursor=p.cursor, stale=True)
        assert self.incoming is not None
        old, new = Ring(self.incoming.old), Ring(self.incoming.new)
        items = msgpack.unpackb(cmd.items, raw=False, use_list=True)
        stray = deleted = top = 0
        for item in items:
            key = item[0]
            if type(key) is not bytes or moving(old, new, key) != (cmd.src, self.shard_id):
                stray += 1
                continue
            if len(item) in (3, 4):
                value, version = item[1], item[2]
                deadline = item[3] if len(item) == 4 else 0  # TTL: [key, value, version, deadline]
                if (type(value) is not bytes or type(version) is not int or version < 0
                        or type(deadline) is not int or deadline < 0):
                    raise ValueError("bad item")
                data[key] = (value, version)
                expiry.set(key, deadline)
                top = max(top, version)
            elif cmd.phase != Phase.COPY and data.pop(key, None) is not None:
                expiry.discard(key)
                deleted += 1  # deleted at the source since an earlier phase sent it
        self.version_offset = max(self.version_offset, top - index)
        if cmd.phase == Phase.COPY:
            p.v0 = min(p.v0, cmd.v0)
        elif cmd.phase == Phase.CATCHUP:
            p.v1 = min(p.v1, cmd.v0)
        p.cursor = max(p.cursor, cmd.cursor)
        if cmd.done:
            if cmd.phase == Phase.CATCHUP:
                p.v0 = p.v1  # what was written before the catch-up listed is here now
            p.phase = Phase(p.phase + 1)
            p.cursor = b""
        return Applied(True, phase=p.phase, cursor=p.cursor, stray=stray, deleted=deleted)

    def _sessions(self, index: int, cmd: MigrateSessions, merge: Any) -> Applied:
        p = self._progress(cmd.new_epoch, cmd.src)
        if isinstance(p, Applied):
            return p
        if p.phase != Phase.DONE:
            return Applied(False, f"sessions before the delta of shard {cmd.src}")
        if not p.sessions:
            merge(msgpack.unpackb(cmd.sessions, raw=False, use_list=True))
            self.version_offset = max(self.version_offset, cmd.version_next - index)
            p.sessions = True
        return Applied(True, phase=p.phase, sessions=True)

    def _drop(self, cmd: DropUnowned, data: dict[bytes, tuple[bytes, int]],
              expiry: ExpiryIndex) -> Applied:
        if self.epoch < cmd.epoch or self.ring is None:
            return Applied(False, f"ring is at epoch {self.epoch}, not {cmd.epoch}")
        ring, me = self.ring, self.shard_id
        candidates = data if cmd.keys is None else cmd.keys
        gone = [k for k in candidates if k in data and ring.shard_for(k) != me]
        for k in gone:
            del data[k]
            expiry.discard(k)
        if cmd.last:
            self.undropped = False
        return Applied(True, epoch=self.epoch, dropped=len(gone), done=cmd.last)

    # ------------------------------------------------------------------ state

    def incoming_info(self) -> IncomingInfo | None:
        inc = self.incoming
        if inc is None:
            return None
        return IncomingInfo(inc.old, inc.new,
                            tuple(p.info(s) for s, p in sorted(inc.sources.items())))

    def outgoing_info(self) -> OutgoingInfo | None:
        out = self.outgoing
        return None if out is None else OutgoingInfo(out.old, out.new, len(out.dirty))

    def info(self) -> dict[str, object]:
        """For diagnostics and tests; the wire form is ``AdminInfoReply``."""
        return {
            "shard": self.shard_id,
            "ring": self.ring.config if self.ring else None,
            "fence": self.fence.config if self.fence else None,
            "incoming": self.incoming_info(),
            "outgoing": self.outgoing_info(),
            "version_offset": self.version_offset,
            "undropped": self.undropped,
        }

    def to_state(self) -> dict[str, Any]:
        inc = self.incoming
        return {
            "ring": ring_wire(self.ring.config if self.ring else None),
            "fence": ring_wire(self.fence.config if self.fence else None),
            "incoming": None if inc is None else [
                ring_wire(inc.old), ring_wire(inc.new),
                [[s, p.to_state()] for s, p in sorted(inc.sources.items())],
            ],
            "outgoing": None if self.outgoing is None else [
                ring_wire(self.outgoing.old), ring_wire(self.outgoing.new),
                list(self.outgoing.dirty.keys()), list(self.outgoing.dirty.values()),
            ],
            "offset": self.version_offset,
            "undropped": self.undropped,
        }

    def load_state(self, state: Any) -> None:
        """Replace by ``to_state`` output; ValueError if malformed (nothing changed)."""
        try:
            ring = ring_from_wire(state["ring"])
            fence = ring_from_wire(state["fence"])
            inc_state = state["incoming"]
            incoming = None
            if inc_state is not None:
                old, new, sources = inc_state
                incoming = Incoming(
                    ring_from_wire(old), ring_from_wire(new),  # type: ignore[arg-type]
                    {int(s): SourceProgress.from_state(p) for s, p in sources},
                )
            out_state = state.get("outgoing")
            outgoing = None
            if out_state is not None:
                o_old, o_new, o_keys, o_index = out_state
                outgoing = Outgoing(ring_from_wire(o_old), ring_from_wire(o_new),  # type: ignore[arg-type]
                                    dict(zip(o_keys, (int(i) for i in o_index), strict=True)))
            offset = int(state["offset"])
            undropped = bool(state["undropped"])
        except (TypeError, ValueError, KeyError, IndexError, KVError) as exc:
            raise ValueError(f"malformed ownership state: {exc}") from exc
        self._set_ring(ring)
        self.fence = Ring(fence) if fence is not None else None
        self.incoming = incoming
        self.outgoing = outgoing
        self.version_offset = offset
        self.undropped = undropped
        self._recompute()
