"""The decisions of an online ring change (add or remove a shard), as a pure core.

``RingChange.step(infos, peers, now)`` takes what the coordinator just learned from the
shards (every shard's ``AdminInfoReply``, the target shards' nodes) and the time, and
returns the admin requests to make next (``Step``); ``on_reply`` folds in the replies
that carry something the next step needs. No sockets, no clock reads, no sleeps, no
randomness: ``ops/rebalance.py`` is the thin loop that fetches, performs and waits.

Theory of operation. Every step is an idempotent admin request to a shard leader, and
the progress lives in the shards' replicated state (``storage_node/ownership.py`` has
the rules each step relies on). So the next step is a function of what the shards say
now, not of what this coordinator did before: a coordinator that died is replaced by
one that looks again (``pending_plan`` finds the change from the shards), and one step
computed from slightly stale answers is harmless, because each shard checks a request
against its own state (a second ``AdminPush`` for a running stream keeps it, a
``RING_SET`` that would own keys not yet here is refused). Infos are to be fetched
sources first (``look_order``): a stream may finish between two looks, and its target
is then seen past the phase rather than seen behind with no stream running.

The stages for a change from ring ``old`` (epoch E) to ``new`` (E+1), each entered only
once the previous one is complete on every shard involved:
1. ``begin``: ``AdminBegin`` at every target (it records what to expect), then
   ``AdminTrack`` at every source (from there on it notes each write to a leaving key).
2. ``copy``, ``catchup``: every (source, target) pair streams, source leader to target
   leader (``AdminPush``); a stream the source does not run (a leader change ended it)
   or that failed is started again from the cursor the target recorded. Unfenced.
3. ``fence``: ``AdminFence`` at every source: the moving ranges are refused from then on.
4. ``delta``: the final delta, streamed the same way (only what the catch-up missed).
5. ``sessions``: each source's session table (``AdminSessions``, once fenced) merged at
   each of its targets (``AdminMergeSessions``): exactly-once retries survive the move.
6. ``ring_set``: ``AdminRingSet`` to ``new``, targets first (each refuses unless it has
   everything), then the other shards. Once any shard is at ``new`` only this and the
   drop remain (there is no rollback).
7. ``drop``: ``AdminDrop`` at every shard still holding keys it no longer owns, a batch
   per request, until none does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zkv.protocol.admin import (
    AdminAppliedReply,
    AdminBegin,
    AdminDrop,
    AdminFence,
    AdminInfoReply,
    AdminMergeSessions,
    AdminPush,
    AdminReply,
    AdminRequest,
    AdminRingSet,
    AdminSessions,
    AdminSessionsReply,
    AdminTrack,
    Phase,
    SourceInfo,
    StreamState,
    Target,
)
from zkv.protocol.errors import KVError
from zkv.protocol.ring import Ring, RingConfig, plan_moves

BATCH_KEYS = 2000
BATCH_BYTES = 2 * 1024 * 1024
#: How often to look at the streams, and to say how far they are.
POLL_S = 0.05
PROGRESS_EVERY_S = 1.0
#: A phase whose streams move no key for this long is reported, not waited on forever.
STALL_S = 60.0
_STAGE_OF_PHASE = {Phase.COPY: "copy", Phase.CATCHUP: "catchup", Phase.DELTA: "delta"}


class RebalanceError(KVError):
    """A step was refused; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Who sends keys to whom when ``old`` becomes ``new``."""

    old: RingConfig
    new: RingConfig
    pairs: tuple[tuple[int, int], ...]
    shares: dict[tuple[int, int], float]

    @classmethod
    def of(cls, old: RingConfig, new: RingConfig) -> Plan:
        if new.epoch != old.epoch + 1 or new.vnodes != old.vnodes:
            raise ValueError("a ring change goes to the next epoch with the same vnodes")
        shares: dict[tuple[int, int], float] = {}
        for m in plan_moves(Ring(old), Ring(new)):
            shares[(m.src, m.dst)] = shares.get((m.src, m.dst), 0.0) + m.share
        return cls(old, new, tuple(sorted(shares)), shares)

    @property
    def sources(self) -> list[int]:
        return sorted({s for s, _ in self.pairs})

    @property
    def targets(self) -> list[int]:
        return sorted({d for _, d in self.pairs})

    @property
    def shards(self) -> list[int]:
        return sorted(set(self.old.shards) | set(self.new.shards))


def ring_adding(old: RingConfig, shard: int) -> RingConfig:
    if shard in old.shards:
        raise RebalanceError(f"shard {shard} is already in the ring")
    return RingConfig(old.epoch + 1, tuple(sorted((*old.shards, shard))), old.vnodes)


def ring_removing(old: RingConfig, shard: int) -> RingConfig:
    if shard not in old.shards:
        raise RebalanceError(f"shard {shard} is not in the ring {list(old.shards)}")
    if len(old.shards) == 1:
        raise RebalanceError("cannot remove the last shard")
    return RingConfig(old.epoch + 1, tuple(s for s in old.shards if s != shard), old.vnodes)


def _epoch(info: AdminInfoReply) -> int:
    return info.ring.epoch if info.ring is not None else 0


def _plan_to(infos: dict[int, AdminInfoReply], new: RingConfig) -> Plan:
    olds = [i.ring for i in infos.values() if i.ring is not None and i.ring.epoch == new.epoch - 1]
    if not olds:  # every shard flipped already: only ring_set and drop remain, on all
        heard = tuple(sorted(set(infos) | set(new.shards)))
        return Plan.of(RingConfig(new.epoch - 1, heard, new.vnodes), new)
    return Plan.of(olds[0], new)


def pending_plan(infos: dict[int, AdminInfoReply]) -> Plan | None:
    """The change a dead coordinator left unfinished, read from the shards' infos."""
    for info in infos.values():
        if info.fence is not None:
            return _plan_to(infos, info.fence)
        if info.incoming is not None:
            return Plan.of(info.incoming.old, info.incoming.new)
    rings = {s: i.ring for s, i in infos.items() if i.ring is not None}
    if not rings:
        return None
    newest = max(rings.values(), key=lambda r: r.epoch)
    if any(r.epoch < newest.epoch for s, r in rings.items() if s in newest.shards):
        return _plan_to(infos, newest)
    if any(i.undropped for i in infos.values()):
        return _plan_to(infos, newest)  # flipped, not yet dropped
    return None


@dataclass(frozen=True, slots=True)
class Step:
    """What to do now: make ``calls`` in order (each an admin request whose
    ``client_id``/``request_id`` the SDK fills in), report ``say``, tell the hooks
    about ``entered`` (stage names, and ``batch<phase>`` when a stream moved), then
    come back after ``wait_s``. ``done``: the change is complete everywhere."""

    calls: tuple[AdminRequest, ...] = ()
    entered: tuple[str, ...] = ()
    say: tuple[str, ...] = ()
    wait_s: float = 0.0
    done: bool = False


@dataclass(slots=True)
class Stats:
    keys: int = 0
    bytes: int = 0
    started_s: float = 0.0
    fenced_at_s: float | None = None
    fenced_s: float = 0.0
    elapsed_s: float = 0.0


@dataclass(slots=True)
class _Out:
    calls: list[AdminRequest] = field(default_factory=list)
    entered: list[str] = field(default_factory=list)
    say: list[str] = field(default_factory=list)
    wait_s: float = 0.0


class RingChange:
    """The pure core of one ring change; see the module docstring."""

    def __init__(self, plan: Plan, now: float, *, batch_keys: int = BATCH_KEYS,
                 batch_bytes: int = BATCH_BYTES, rate_bytes_s: int = 0,
                 poll_s: float = POLL_S) -> None:
        """``rate_bytes_s``: what all streams of a phase together may send per second
        (0: no bound); each of the streams running at once gets an equal part."""
        self.plan = plan
        self.batch_keys = batch_keys
        self.batch_bytes = batch_bytes
        self.rate_bytes_s = rate_bytes_s
        self.poll_s = poll_s
        self.stats = Stats(started_s=now)
        self._stage = ""
        #: (src, dst, phase) -> (keys, bytes) the stream reported last
        self._sent: dict[tuple[int, int, Phase], tuple[int, int]] = {}
        self._last_change_s = now
        self._next_report_s = now + PROGRESS_EVERY_S
        self._seen_phase: dict[tuple[int, int], Phase] = {}
        #: a source's (version_next, session table), fetched for its targets
        self._sessions: dict[int, tuple[int, bytes]] = {}
        #: keys dropped per shard so far, and lines to say at the next step
        self._dropped: dict[int, int] = {}
        self._notes: list[str] = []

    def look_order(self) -> list[int]:
        """The shards whose info ``step`` needs, in the order to ask them."""
        p = self.plan
        rest = [s for s in p.shards if s not in p.sources and s not in p.targets]
        return [*p.sources, *[t for t in p.targets if t not in p.sources], *rest]

    def on_reply(self, call: AdminRequest, reply: AdminReply) -> None:
        """Fold in a reply (the shell raises for a refusal before calling this)."""
        if isinstance(call, AdminSessions) and isinstance(reply, AdminSessionsReply):
            if not reply.flipped:
                self._sessions[call.shard_id] = (reply.version_next, reply.sessions)
        elif isinstance(call, AdminDrop) and isinstance(reply, AdminAppliedReply):
            shard = call.shard_id
            self._dropped[shard] = self._dropped.get(shard, 0) + reply.result.dropped
            if reply.result.done and self._dropped[shard]:
                self._notes.append(f"shard {shard}: dropped {self._dropped.pop(shard)} "
                                   "moved keys")

    # ------------------------------------------------------------------ the step

    def step(self, infos: dict[int, AdminInfoReply], peers: dict[int, tuple[Target, ...]],
             now: float) -> Step:
        """The next requests, from every shard's info and the target shards' nodes."""
        missing = [s for s in self.plan.shards if s not in infos]
        if missing:
            raise ValueError(f"no info from shards {missing}")
        out = _Out()
        out.say.extend(self._notes)
        self._notes.clear()
        if not self._stage:
            plan = self.plan
            out.say.append(
                f"ring epoch {plan.old.epoch} -> {plan.new.epoch}: shards "
                f"{list(plan.old.shards)} -> {list(plan.new.shards)}; moves: " + ", ".join(
                    f"{s}->{d} {plan.shares[(s, d)] * 100:.1f}%" for s, d in plan.pairs))
        done = self._decide(infos, peers, now, out)
        return Step(tuple(out.calls), tuple(out.entered), tuple(out.say), out.wait_s, done)

    def _enter(self, stage: str, out: _Out, now: float) -> None:
        if stage == self._stage:
            return
        if stage == "fence" and self.stats.fenced_at_s is None:
            self.stats.fenced_at_s = now
        if stage in ("ring_set", "drop") and self.stats.fenced_at_s is not None:
            self.stats.fenced_s = now - self.stats.fenced_at_s
            self.stats.fenced_at_s = None
        if stage == "ring_set" and self._stage in ("", "begin"):
            out.say.append("a shard is already at the new epoch: rolling forward")
        if self._stage == "fence":
            out.say.append(f"fenced the moving ranges on shards {self.plan.sources}")
        self._stage = stage
        self._last_change_s = now
        out.entered.append(stage)

    def _decide(self, infos: dict[int, AdminInfoReply], peers: dict[int, tuple[Target, ...]],
                now: float, out: _Out) -> bool:
        plan, new = self.plan, self.plan.new
        if any(_epoch(infos[s]) >= new.epoch for s in plan.shards):
            return self._roll_forward(infos, now, out)
        targets = [t for t in plan.targets
                   if infos[t].incoming is None or infos[t].incoming.new != new]  # type: ignore[union-attr]
        sources = [s for s in plan.sources
                   if infos[s].outgoing is None or infos[s].outgoing.new != new]  # type: ignore[union-attr]
        if targets or sources:
            self._enter("begin", out, now)
            out.calls.extend(AdminBegin(b"", 0, t, plan.old, new) for t in targets)
            out.calls.extend(AdminTrack(b"", 0, s, plan.old, new) for s in sources)
            return False
        progress = {(s, t): self._progress(infos[t], s) for s, t in plan.pairs}
        self._count(infos, progress, now, out)
        phase = min(p.phase for p in progress.values())
        if phase == Phase.DELTA:
            unfenced = [s for s in plan.sources if infos[s].fence != new]
            if unfenced:
                self._enter("fence", out, now)
                out.calls.extend(AdminFence(b"", 0, s, plan.old, new) for s in unfenced)
                return False
        if phase != Phase.DONE:
            self._stream(phase, infos, progress, peers, now, out)
            return False
        todo = [(s, t) for (s, t), p in progress.items() if not p.sessions]
        if todo:
            self._enter("sessions", out, now)
            for s, t in todo:
                got = self._sessions.get(s)
                if got is None:
                    if AdminSessions(b"", 0, s, plan.old, new) not in out.calls:
                        out.calls.append(AdminSessions(b"", 0, s, plan.old, new))
                else:
                    out.calls.append(AdminMergeSessions(b"", 0, t, new.epoch, s, got[0], got[1]))
            return False
        return self._roll_forward(infos, now, out)

    def _progress(self, info: AdminInfoReply, src: int) -> SourceInfo:
        p = info.incoming.source(src) if info.incoming is not None else None
        if p is None:
            raise RebalanceError(f"shard {info.shard} does not expect keys from shard {src} "
                                 f"at ring epoch {self.plan.new.epoch}")
        return p

    def _stream(self, phase: Phase, infos: dict[int, AdminInfoReply],
                progress: dict[tuple[int, int], SourceInfo],
                peers: dict[int, tuple[Target, ...]], now: float, out: _Out) -> None:
        """Keep a stream running for every pair still in ``phase``."""
        plan, new = self.plan, self.plan.new
        self._enter(_STAGE_OF_PHASE[phase], out, now)
        todo = sorted(pair for pair, p in progress.items() if p.phase == phase)
        rate = -(-self.rate_bytes_s // len(todo)) if self.rate_bytes_s else 0
        for s, t in todo:
            push = infos[s].push(new.epoch, t, phase)
            if push is not None and push.state != StreamState.FAILED:
                continue
            if push is not None:
                out.say.append(f"stream {s}->{t} failed ({push.error}): restarting")
            targets = peers.get(t, ())
            if not targets:
                raise RebalanceError(f"no node of shard {t} is known to the broker")
            p = progress[(s, t)]
            out.calls.append(AdminPush(
                b"", 0, s, plan.old, new, t, phase, p.v0 if phase > Phase.COPY else 0,
                p.cursor, targets, self.batch_keys, self.batch_bytes, rate))
        if now >= self._next_report_s:
            self._next_report_s = now + PROGRESS_EVERY_S
            out.say.append(f"phase {int(phase)}: " + ", ".join(
                f"{s}->{t} {self._sent.get((s, t, phase), (0, 0))[0]} keys" for s, t in todo))
        if now - self._last_change_s > STALL_S:
            raise RebalanceError(f"phase {int(phase)} streams {todo} made no progress for "
                                 f"{STALL_S:.0f} s; run `zkv admin resume` to retry")
        # under the fence every poll interval is unavailability: look more often
        out.wait_s = self.poll_s if phase < Phase.DELTA else self.poll_s / 5

    def _count(self, infos: dict[int, AdminInfoReply],
               progress: dict[tuple[int, int], SourceInfo], now: float, out: _Out) -> None:
        """Fold every stream's (keys, bytes) so far into the stats; note what moved."""
        for (s, t), p in progress.items():
            for phase in (Phase.COPY, Phase.CATCHUP, Phase.DELTA):
                push = infos[s].push(self.plan.new.epoch, t, phase)
                if push is None:
                    continue
                key, got = (s, t, phase), (push.sent, push.sent_bytes)
                before = self._sent.get(key, (0, 0))
                if got == before:
                    continue
                if got[0] < before[0]:  # a restarted stream counts from zero again
                    before = (0, 0)
                self.stats.keys += got[0] - before[0]
                self.stats.bytes += got[1] - before[1]
                self._sent[key] = got
                self._last_change_s = now
                out.entered.append(f"batch{int(phase)}")
            seen = self._seen_phase.get((s, t))
            if seen is not None and p.phase > seen:
                out.say.append(f"phase {int(seen)} {s}->{t}: "
                               f"{self._sent.get((s, t, seen), (0, 0))[0]} keys")
            self._seen_phase[(s, t)] = p.phase

    def _roll_forward(self, infos: dict[int, AdminInfoReply], now: float, out: _Out) -> bool:
        plan, new = self.plan, self.plan.new
        behind = [s for s in plan.shards if _epoch(infos[s]) < new.epoch]
        if behind:
            self._enter("ring_set", out, now)
            first = [s for s in plan.targets if s in behind]
            out.calls.extend(AdminRingSet(b"", 0, s, new) for s in
                             [*first, *[s for s in behind if s not in first]])
            return False
        if self._stage not in ("drop", "done"):
            out.say.append(f"ring epoch {new.epoch} in force on every shard")
        undropped = [s for s in plan.shards if infos[s].undropped]
        if undropped:
            self._enter("drop", out, now)
            out.calls.extend(AdminDrop(b"", 0, s, new.epoch) for s in undropped)
            out.wait_s = self.poll_s  # a leader may still be listing what to drop
            return False
        self._stage = "done"
        self.stats.elapsed_s = now - self.stats.started_s
        return True
