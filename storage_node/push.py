"""A source leader's side of moving keys: stream the moving ranges straight to the
target shard's leader, and drop what the shard no longer owns.

Why here and not in the coordinator: the keys go source leader -> target leader in one
hop (``MigrateBatch`` on the target's peer port, answered by ``MigrateAck``), and the
coordinator only starts streams and watches progress (``ops/rebalance.py``).

Theory of operation:

- ``KeyLister`` lists the keys of a snapshot of the table that a test on their ring
  position selects (moving ``me -> dst``, or no longer owned), ``LIST_CHUNK_KEYS`` per
  loop turn, then sorts them: hashing a million keys takes about a second of Python,
  which must not stall replication and client traffic. ``applied`` is the applied index
  the snapshot was taken at. A key absent from the snapshot but present later was
  written after ``applied``, so the source's dirty record has it above ``applied``:
  a later delta sends it. That is why one snapshot is enough.
- ``Push`` sends one batch at a time in key order and waits for its ack before the
  next. The target applies a batch only if it continues exactly where the target's
  replicated cursor stands (``MigrateIn.after``), so a batch resent after a lost ack or
  a leader change is acknowledged without applying twice, and a ``stale`` answer
  carries the target's real cursor to resume from. Not the leader: try the node it
  hints, else the next node of the target shard. No ack within ``ACK_TIMEOUT_S``: the
  same batch to the next node.
- Phase 1 (copy) sends ``[key, value, version]`` (``[key, value, version, deadline]``
  for a key that expires); each batch carries ``v0`` = the
  listing's applied index. Phase 2 (catch-up) and phase 3 (final delta, only after this
  shard applied the fence) send the keys whose last write since MIGRATE_OUT is above
  the target's ``v0``, with their value, or bare (``[key]``: delete) if they are gone.
- ``LeaderTasks`` holds a leader's pushes and drops. It is leader-only soft state: a
  new leader starts with none and the coordinator starts the stream again from the
  target's recorded cursor (``zkv admin resume`` from the shards' state if the
  coordinator died too).
- A drop lists the keys this shard does not own at its (flipped) ring and proposes
  ``DropUnowned`` a batch at a time; the last batch marks the drop complete. Nothing
  can become unowned after the flip (writes to such keys are refused, old streams are
  stale), so one listing is complete.

Pure: no sockets, no clock (``now`` is passed in).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from zkv.protocol.admin import Applied, MigrateAck, MigrateBatch, Phase, PushInfo, StreamState
from zkv.protocol.ring import Ring, RingConfig, position
from zkv.storage_node.commands import DropUnowned, MigrateIn
from zkv.storage_node.state_machine import KVStateMachine

#: Keys hashed per loop turn while listing (about 15 ms of Python).
LIST_CHUNK_KEYS = 10_000
#: A batch not acknowledged by then goes to the next node of the target shard.
ACK_TIMEOUT_S = 1.5
#: After "not the leader" without a known leader (an election is on): wait this long
#: before trying the next node, rather than bouncing a large batch around the group.
NO_LEADER_RETRY_S = 0.1
BATCH_KEYS = 2000
BATCH_BYTES = 2 * 1024 * 1024
#: Keys per DropUnowned command.
DROP_BATCH_KEYS = 5000
CURSOR_START = b""

LISTING, SENDING, DONE, FAILED = (
    StreamState.LISTING, StreamState.SENDING, StreamState.DONE, StreamState.FAILED)
PHASE_COPY, PHASE_DELTA = Phase.COPY, Phase.DELTA


def cursor_of(key: bytes) -> bytes:
    """A cursor after ``key`` (b"" is the start; the prefix keeps the two apart)."""
    return b"\x01" + key


class KeyLister:
    """Sorted keys of a table snapshot whose ring position ``wanted`` accepts, built a
    chunk per ``advance`` so a large shard never stalls the node's loop."""

    __slots__ = ("applied", "_todo", "_next", "_found", "_wanted", "_chunk", "keys")

    def __init__(self, sm: KVStateMachine, wanted: Callable[[int], bool],
                 chunk: int = LIST_CHUNK_KEYS, among: list[bytes] | None = None) -> None:
        """``among``: the keys to look at (default: the whole table)."""
        self.applied = sm.applied_index
        # one C-speed copy; the hashing is what is spread out
        self._todo = list(sm.data) if among is None else among
        self._next = 0
        self._found: list[bytes] = []
        self._wanted = wanted
        self._chunk = chunk
        #: the sorted result, once ``done``
        self.keys: list[bytes] | None = None

    @property
    def done(self) -> bool:
        return self.keys is not None

    @property
    def progress(self) -> float:
        return 1.0 if self.keys is not None else self._next / max(1, len(self._todo))

    def advance(self) -> bool:
        """List one more chunk; True once every key is looked at (and sorted)."""
        if self.keys is not None:
            return True
        end = min(len(self._todo), self._next + self._chunk)
        wanted, found = self._wanted, self._found
        for k in self._todo[self._next:end]:
            if wanted(position(k)):
                found.append(k)
        self._next = end
        if end >= len(self._todo):
            found.sort()
            self.keys = found
            self._todo = []
        return self.keys is not None


@dataclass(frozen=True, slots=True)
class PushSpec:
    """What the coordinator asked for: stream ``src -> dst`` of ``old -> new``, one
    phase, from cursor ``after``, to one of ``targets`` (node id -> peer address)."""

    old: RingConfig
    new: RingConfig
    src: int
    dst: int
    phase: Phase
    v0: int
    after: bytes
    targets: tuple[tuple[str, str], ...]
    batch_keys: int = BATCH_KEYS
    batch_bytes: int = BATCH_BYTES
    #: bytes per second this stream may send (0: as fast as the target acknowledges),
    #: so an operator can trade migration speed for the traffic's share of the CPU
    rate_bytes_s: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.new.epoch, self.dst, self.phase)


class Push:
    """One phase of one ``src -> dst`` stream; see the module docstring."""

    def __init__(self, spec: PushSpec, sm: KVStateMachine, seq0: int = 0) -> None:
        old, new = Ring(spec.old), Ring(spec.new)
        src, dst = spec.src, spec.dst
        self.spec = spec
        among = None
        if spec.phase != PHASE_COPY:  # catch-up or final delta: keys written since v0
            out = sm.ownership.outgoing
            assert out is not None and out.new == spec.new, "a delta needs MIGRATE_OUT"
            among = [k for k, i in out.dirty.items() if i > spec.v0]
        self.lister = KeyLister(
            sm, lambda p: old.owner_of_position(p) == src and new.owner_of_position(p) == dst,
            among=among)
        self.after = spec.after
        self.state = LISTING
        self.error = ""
        self.sent_keys = 0
        self.sent_bytes = 0
        self.batches = 0
        self.resends = 0
        self._seq = seq0
        self._inflight: MigrateBatch | None = None
        self._inflight_keys = 0
        self._sent_at = 0.0
        self._targets = [node for node, _ in spec.targets]
        self._target = 0
        #: set by a "not the leader" answer: when to send the batch again
        self._resend_at: float | None = None
        #: the rate limit: the next new batch not before then
        self._next_at = float("-inf")

    @property
    def target(self) -> str:
        return self._targets[self._target] if self._targets else ""

    def pump(self, sm: KVStateMachine, now: float) -> list[tuple[str, MigrateBatch]]:
        """What to send now: nothing, the next batch, or the unacknowledged one again."""
        if self.state == LISTING:
            if not self.lister.advance():
                return []
            self.state = SENDING
        if self.state != SENDING or not self._targets:
            if self.state == SENDING:
                self.state, self.error = FAILED, "no node of the target shard is known"
            return []
        if self._inflight is not None:
            if self._resend_at is not None:  # answered "not the leader"
                if now < self._resend_at:
                    return []
                self._resend_at = None
            elif now - self._sent_at < ACK_TIMEOUT_S:
                return []
            else:  # no answer in time: the same batch to the next node
                self._target = (self._target + 1) % len(self._targets)
            self.resends += 1
        else:
            if now < self._next_at:
                return []  # the rate limit: not yet
            self._inflight = self._next_batch(sm)
            if self.spec.rate_bytes_s:
                self._next_at = now + len(self._inflight.items) / self.spec.rate_bytes_s
        self._sent_at = now
        return [(self.target, self._inflight)]

    def on_ack(self, ack: MigrateAck, now: float) -> None:
        batch = self._inflight
        if batch is None or ack.seq != batch.seq or self.state != SENDING:
            return  # an answer to a batch already settled
        r = ack.result
        if not r.ok:
            if r.not_leader:
                hint = ack.leader_hint
                if hint in self._targets:  # at once to the leader it names
                    self._target = self._targets.index(hint)
                    self._resend_at = now
                else:
                    self._target = (self._target + 1) % len(self._targets)
                    self._resend_at = now + NO_LEADER_RETRY_S
                return
            self.state, self.error = FAILED, r.error or "refused"
            self._inflight = None
            return
        self._inflight = None
        if r.noop:
            # the target is at the new epoch already: the change finished there (a stale
            # or resumed stream); nothing this stream sends can matter any more
            self.state = DONE
            return
        if r.phase is not None and r.phase > self.spec.phase:
            self.state = DONE  # this batch closed the phase, or an earlier stream did
            if not r.stale:
                self._count(batch)
            return
        if r.stale or r.cursor != batch.cursor:
            # not this batch's doing (a stale resend, or an old answer that happens to
            # carry this seq): go on from where the target says it stands
            self.after = r.cursor if r.phase is not None else self.after
            return
        self._count(batch)  # applied: the target's cursor is now where this batch ends
        self.after = batch.cursor

    def _count(self, batch: MigrateBatch) -> None:
        self.sent_keys += self._inflight_keys
        self.sent_bytes += len(batch.items)
        self.batches += 1

    def _next_batch(self, sm: KVStateMachine) -> MigrateBatch:
        spec, keys = self.spec, self.lister.keys
        assert keys is not None
        after = self.after
        start = 0 if after == CURSOR_START else bisect.bisect_right(keys, after[1:])
        data, expiry = sm.data, sm.expiry
        delta = spec.phase != PHASE_COPY
        v0 = self.lister.applied  # the target keeps the lowest of a phase as its next v0
        items: list[list[Any]] = []
        size = 0
        i = start
        n = len(keys)
        limit = spec.batch_keys
        while i < n and len(items) < limit and size < spec.batch_bytes:
            k = keys[i]
            i += 1
            found = data.get(k)
            if found is None:
                if delta:  # deleted since an earlier phase sent it: delete it there too
                    items.append([k])
                    size += len(k) + 4
                continue  # the copy: deleted since the listing (a delta sends that)
            deadline = expiry.get(k)  # TTL: the deadline moves with its key
            items.append([k, found[0], found[1], deadline] if deadline
                         else [k, found[0], found[1]])
            size += len(k) + len(found[0]) + 12
        cursor = cursor_of(keys[i - 1]) if i > start else after
        self._seq += 1
        self._inflight_keys = len(items)
        return MigrateBatch(self._seq, spec.src, spec.dst, spec.new.epoch, spec.phase, v0,
                            after, cursor, i >= n, msgpack.packb(items, use_bin_type=True))

    def status(self) -> PushInfo:
        keys, spec = self.lister.keys, self.spec
        return PushInfo(spec.new.epoch, spec.dst, spec.phase, self.state,
                        int(self.lister.progress * 1000), None if keys is None else len(keys),
                        self.sent_keys, self.sent_bytes, self.batches, self.resends,
                        self.target, self.error)


def command_for(batch: MigrateBatch) -> MigrateIn:
    """The replicated command a target leader proposes for a received batch."""
    return MigrateIn(batch.new_epoch, batch.src_shard, batch.phase, batch.v0, batch.done,
                     batch.cursor, batch.items, batch.after)


def not_leader_ack(batch: MigrateBatch, leader_hint: str) -> MigrateAck:
    return MigrateAck(batch.seq, batch.dst_shard, Applied(False, not_leader=True), leader_hint)


class Drop:
    """Drop the keys not owned at ring ``epoch``: list them, then a batch at a time."""

    def __init__(self, sm: KVStateMachine, epoch: int) -> None:
        ring = sm.ownership.ring
        me = sm.ownership.shard_id
        assert ring is not None
        self.epoch = epoch
        self.lister = KeyLister(sm, lambda p: ring.owner_of_position(p) != me)
        self._next = 0

    def next_command(self) -> DropUnowned | None:
        """The next batch to propose, or None while still listing."""
        keys = self.lister.keys
        if keys is None:
            return None
        batch = tuple(keys[self._next:self._next + DROP_BATCH_KEYS])
        self._next += len(batch)
        return DropUnowned(self.epoch, batch, self._next >= len(keys))


class LeaderTasks:
    """A shard leader's running pushes and drops: soft state, cleared when it steps
    down. ``pump`` once per loop turn; it returns the batches to send."""

    def __init__(self, seq0: int = 0) -> None:
        """``seq0``: where batch numbers start; the shell picks it at random, so a late
        answer to a previous process of the same node cannot match a batch of ours
        (``Push.on_ack`` also checks the answer is this batch's)."""
        self.pushes: dict[tuple[int, int, int], Push] = {}
        self.drops: dict[int, Drop] = {}
        self._seq = seq0

    def start_push(self, spec: PushSpec, sm: KVStateMachine) -> tuple[PushInfo, bool]:
        """Start (or restart) a stream; one already running for the same epoch,
        target and phase keeps going (a retried request must not fork it). Returns its
        status and whether it was running already."""
        running = self.pushes.get(spec.key)
        if running is not None and running.state in (LISTING, SENDING):
            return running.status(), True
        for key in [k for k in self.pushes if k[0] != spec.new.epoch]:
            del self.pushes[key]  # an older migration's: long settled
        push = self.pushes[spec.key] = Push(spec, sm, self._seq)
        self._seq += 1_000_000  # keep seqs of successive pushes apart
        return push.status(), False

    def pump(self, sm: KVStateMachine, now: float) -> list[tuple[str, str, MigrateBatch]]:
        """``(node id, peer address, batch)`` to send now."""
        out: list[tuple[str, str, MigrateBatch]] = []
        for push in self.pushes.values():
            if push.state in (LISTING, SENDING):
                addrs = dict(push.spec.targets)
                out.extend((node, addrs[node], batch) for node, batch in push.pump(sm, now))
        for drop in self.drops.values():
            drop.lister.advance()
        return out

    def on_ack(self, ack: MigrateAck, now: float) -> None:
        for push in self.pushes.values():
            if push.spec.dst == ack.dst_shard:
                push.on_ack(ack, now)

    def busy(self) -> bool:
        """Still listing: the shell should come back at once rather than sleep."""
        if not self.pushes and not self.drops:  # the usual case, asked twice a turn
            return False
        return any(p.state == LISTING for p in self.pushes.values()) or any(
            not d.lister.done for d in self.drops.values())

    def status(self) -> tuple[PushInfo, ...]:
        return tuple(push.status() for _, push in sorted(self.pushes.items()))

    def drop_step(self, sm: KVStateMachine, epoch: int) -> DropUnowned | int:
        """Answer a ``drop`` request (the caller checked the ring is at ``epoch``):
        the next command, or while still listing how far, in thousandths."""
        assert sm.ownership.ring is not None and sm.ownership.epoch >= epoch
        drop = self.drops.get(epoch)
        if drop is None:
            self.drops = {epoch: Drop(sm, epoch)}
            drop = self.drops[epoch]
        cmd = drop.next_command()
        if cmd is None:
            return int(drop.lister.progress * 1000)
        if cmd.last:
            del self.drops[epoch]  # a later request lists again (and finds nothing)
        return cmd

    def clear(self) -> None:
        self.pushes.clear()
        self.drops.clear()


__all__ = [
    "PHASE_COPY", "PHASE_DELTA", "ACK_TIMEOUT_S", "LISTING", "SENDING", "DONE", "FAILED", "Drop", "KeyLister", "LeaderTasks",
    "Push", "PushSpec", "command_for", "cursor_of", "not_leader_ack",
]
