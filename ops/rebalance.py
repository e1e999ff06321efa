"""The migration coordinator: add or remove a shard online.

It holds no state of its own: every step is an idempotent ``AdminRequest`` to a shard
leader, through any broker, and the progress lives in the shards' replicated state
(``storage_node/ownership.py`` has the rules each step relies on). So a coordinator,
a broker or a shard leader may die at any point: the SDK retries through another broker
or the new leader, and ``zkv admin resume`` (``Rebalancer.resume``) rebuilds where a dead
coordinator stopped from the shards themselves and rolls the change forward.

Steps for a change from ring ``old`` (epoch E) to ``new`` (epoch E+1):
1. ``begin`` at every target (a shard gaining keys): it records what to expect; then
   ``track`` at every source: from there on it notes each write to a leaving key.
2. Phase 1: every source leader streams its moving keys straight to each target's
   leader (``push``; ``storage_node/push.py``), all pairs at once; the coordinator
   only watches progress (``info`` on both ends) and restarts a stream that a leader
   change ended, from the cursor the target recorded. Sources keep serving meanwhile.
   Phase 2 (catch-up), the same way and still unfenced: the keys written during the
   copy. So what the fence must wait for is only what was written during the catch-up.
3. ``fence`` at every source: from its log position on, the moving ranges are refused
   (UNAVAILABLE, retryable) at that source; ranges that do not move are not affected.
4. Phase 3, the same way: the final delta (only the keys written since the catch-up
   read: their value, or a delete), then the source's session table (exactly-once
   retries) through the coordinator (small).
5. ``ring_set`` to ``new``: targets first (each refuses unless it has everything), then
   the other shards. Brokers adopt the new epoch from heartbeats; a request that still
   reaches an old owner is handed back to the broker, which re-routes it.
6. ``drop`` at every shard, a batch at a time: keys not owned at the new epoch.

There is no rollback: before step 5 nothing is lost by stopping (fenced ranges stay
unavailable until ``resume``), and from step 5 on only rolling forward is correct.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zkv.client.sdk import KVClient
from zkv.protocol.errors import KVError
from zkv.protocol.ring import Ring, RingConfig, plan_moves

BATCH_KEYS = 2000
BATCH_BYTES = 2 * 1024 * 1024
ADMIN_TIMEOUT_S = 30.0
#: How often the coordinator looks at the streams, and says how far they are.
POLL_S = 0.05
PROGRESS_EVERY_S = 1.0
#: A phase whose streams move no key for this long is reported, not waited on forever.
STALL_S = 60.0


class RebalanceError(KVError):
    """A step was refused; the message says which and why."""


class _Flipped(Exception):
    """A shard is already at the new epoch: only rolling forward remains."""


def ring_wire(r: RingConfig) -> list[Any]:
    return [r.epoch, list(r.shards), r.vnodes]


def ring_of(v: Any) -> RingConfig:
    if isinstance(v, dict):
        return RingConfig(int(v["epoch"]), tuple(sorted(int(s) for s in v["shards"])),
                          int(v["vnodes"]))
    return RingConfig(int(v[0]), tuple(int(s) for s in v[1]), int(v[2]))


@dataclass(frozen=True, slots=True)
class Plan:
    """Pure: who sends keys to whom when ``old`` becomes ``new``."""

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


@dataclass
class Stats:
    keys: int = 0
    bytes: int = 0
    started: float = 0.0
    fenced_s: float = 0.0
    elapsed_s: float = 0.0


class Rebalancer:
    def __init__(self, kv: KVClient, progress: Callable[[str], None] | None = None,
                 batch_keys: int = BATCH_KEYS, batch_bytes: int = BATCH_BYTES,
                 on_step: Callable[[str], None] | None = None, poll_s: float = POLL_S,
                 rate_bytes_s: int = 0) -> None:
        """``rate_bytes_s``: what all streams together may send per second (0: no
        bound); each of the streams running at once gets an equal part."""
        self.kv = kv
        self.say = progress or (lambda _line: None)
        self.batch_keys = batch_keys
        self.batch_bytes = batch_bytes
        #: called with a step name before it starts (tests inject faults here)
        self.on_step = on_step or (lambda _step: None)
        self.stats = Stats()
        self.poll_s = poll_s
        self.rate_bytes_s = rate_bytes_s

    # ------------------------------------------------------------------ public

    def current_ring(self) -> RingConfig:
        """The broker's ring, once it has heard every shard of it (a broker restarted a
        moment ago learns the cluster from heartbeats within a few intervals)."""
        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        while True:
            status = self.kv.status(timeout=ADMIN_TIMEOUT_S)
            ring = status["ring"]
            heard = {int(n["shard_id"]) for n in status.get("nodes", [])}
            if ring and set(ring["shards"]) <= heard:
                return ring_of(ring)
            if time.monotonic() >= deadline:
                raise RebalanceError("the broker has not heard every shard of its ring")
            time.sleep(0.1)

    def add_shard(self, shard: int) -> RingConfig:
        old = self._settled_ring()
        return self.migrate(Plan.of(old, ring_adding(old, shard)))

    def remove_shard(self, shard: int) -> RingConfig:
        old = self._settled_ring()
        return self.migrate(Plan.of(old, ring_removing(old, shard)))

    def pending(self) -> Plan | None:
        """The change a dead coordinator left unfinished, read from the shards."""
        ring = self.current_ring()
        shards = sorted(set(ring.shards) | set(self._heard_shards()))
        infos = {s: self._info(s) for s in shards}
        for info in infos.values():
            for name in ("fence",):
                if info.get(name):
                    return self._plan_to(infos, ring_of(info[name]))
            inc = info.get("incoming")
            if inc:
                return Plan.of(ring_of(inc["old"]), ring_of(inc["new"]))
        epochs = {s: ring_of(i["ring"]) for s, i in infos.items() if i.get("ring")}
        newest = max(epochs.values(), key=lambda r: r.epoch)
        if any(r.epoch < newest.epoch for s, r in epochs.items() if s in newest.shards):
            return self._plan_to(infos, newest)
        if any(i.get("undropped") for i in infos.values()):
            return self._plan_to(infos, newest)  # flipped, not yet dropped
        return None

    def resume(self) -> RingConfig | None:
        plan = self.pending()
        if plan is None:
            self.say("no migration in flight")
            return None
        self.say(f"resuming the change to ring epoch {plan.new.epoch}")
        return self.migrate(plan)

    def migrate(self, plan: Plan) -> RingConfig:
        self.stats = Stats(started=time.monotonic())
        old, new = plan.old, plan.new
        self.say(f"ring epoch {old.epoch} -> {new.epoch}: shards {list(old.shards)} -> "
                 f"{list(new.shards)}; moves: " + ", ".join(
                     f"{s}->{d} {plan.shares[(s, d)] * 100:.1f}%" for s, d in plan.pairs))
        try:
            self._copy_phases(plan)
        except _Flipped:
            self.say("a shard is already at the new epoch: rolling forward")
        self.on_step("ring_set")
        for shard in [*plan.targets, *[s for s in plan.shards if s not in plan.targets]]:
            self._cmd(shard, "ring_set", ring=ring_wire(new))
        self.stats.fenced_s = time.monotonic() - self.stats.fenced_s if self.stats.fenced_s else 0.0
        self.say(f"ring epoch {new.epoch} in force on every shard")
        self.on_step("drop")
        for shard in plan.shards:
            self._drop(shard, new.epoch)
        self.stats.elapsed_s = time.monotonic() - self.stats.started
        self.say(f"done: {self.stats.keys} keys, {self.stats.bytes / 1e6:.1f} MB in "
                 f"{self.stats.elapsed_s:.1f} s")
        return new

    # ------------------------------------------------------------------ steps

    def _copy_phases(self, plan: Plan) -> None:
        old, new = plan.old, plan.new
        self.on_step("begin")
        for t in plan.targets:
            self._cmd(t, "begin", old=ring_wire(old), new=ring_wire(new))
        for s in plan.sources:  # note writes to leaving keys from now: the final delta
            self._cmd(s, "track", old=ring_wire(old), new=ring_wire(new))
        self.on_step("copy")
        self._run_phase(plan, 1)
        self.on_step("catchup")
        self._run_phase(plan, 2)
        self.on_step("fence")
        self.stats.fenced_s = time.monotonic()
        for s in plan.sources:
            self._cmd(s, "fence", old=ring_wire(old), new=ring_wire(new))
        self.say(f"fenced the moving ranges on shards {plan.sources}")
        self.on_step("delta")
        self._run_phase(plan, 3)
        progress = {t: self._progress(t, new) for t in plan.targets}
        for s, t in plan.pairs:
            p = progress[t][str(s)]
            if not p["sessions"]:
                result, payload = self._admin(s, "sessions", old=ring_wire(old),
                                              new=ring_wire(new))
                if result.get("flipped"):
                    raise _Flipped
                self._cmd(t, "merge_sessions", payload, new_epoch=new.epoch, src=s,
                          version_next=result["version_next"])

    def _run_phase(self, plan: Plan, phase: int) -> None:
        """Run ``phase`` of every (source, target) stream at once, straight from source
        leader to target leader; return once every target recorded the phase done."""
        new = plan.new
        todo = set(plan.pairs)
        rate = -(-self.rate_bytes_s // len(todo)) if self.rate_bytes_s and todo else 0
        sent: dict[tuple[int, int], tuple[int, int]] = {}
        last_change = time.monotonic()
        next_report = last_change + PROGRESS_EVERY_S
        while True:
            # the sources' counts first: a stream may finish between two looks
            pushes: dict[tuple[int, int], dict[str, Any] | None] = {}
            for s in sorted({s for s, _ in todo}):
                running = self._info(s).get("pushes") or {}
                for t in (t for src, t in todo if src == s):
                    st = pushes[(s, t)] = running.get(f"{new.epoch}:{t}:{phase}")
                    if self._count(sent, (s, t), st):
                        last_change = time.monotonic()
                        self.on_step(f"batch{phase}")
            progress = {t: self._progress(t, new) for t in sorted({t for _, t in todo})}
            for s, t in sorted(todo):
                if progress[t][str(s)]["phase"] > phase:
                    todo.discard((s, t))
                    # the final count: the stream may have ended since we looked
                    self._count(sent, (s, t), (self._info(s).get("pushes") or {}).get(
                        f"{new.epoch}:{t}:{phase}"))
                    self.say(f"phase {phase} {s}->{t}: {sent.get((s, t), (0, 0))[0]} keys")
            if not todo:
                return
            for s, t in sorted(todo):
                st = pushes.get((s, t))
                if st is None or st["state"] == "failed":
                    if st is not None:
                        self.say(f"stream {s}->{t} failed ({st['error']}): restarting")
                    self._start_push(plan, s, t, phase, progress[t][str(s)], rate)
            now = time.monotonic()
            if now >= next_report:
                next_report = now + PROGRESS_EVERY_S
                self.say(f"phase {phase}: " + ", ".join(
                    f"{s}->{t} {sent.get((s, t), (0, 0))[0]} keys" for s, t in sorted(todo)))
            if now - last_change > STALL_S:
                raise RebalanceError(f"phase {phase} streams {sorted(todo)} made no progress "
                                     f"for {STALL_S:.0f} s; run `zkv admin resume` to retry")
            # under the fence every poll interval is unavailability: look more often
            time.sleep(self.poll_s if phase < 3 else self.poll_s / 5)

    def _count(self, sent: dict[tuple[int, int], tuple[int, int]], pair: tuple[int, int],
               status: dict[str, Any] | None) -> bool:
        """Fold a stream's (keys, bytes) so far into the stats; True if it moved."""
        if status is None:
            return False
        now = (int(status["sent"]), int(status["bytes"]))
        before = sent.get(pair, (0, 0))
        if now == before:
            return False
        if now[0] < before[0]:  # a restarted stream counts from zero again
            before = (0, 0)
        self.stats.keys += now[0] - before[0]
        self.stats.bytes += now[1] - before[1]
        sent[pair] = now
        return True

    def _start_push(self, plan: Plan, src: int, dst: int, phase: int,
                    progress: dict[str, Any], rate: int = 0) -> None:
        targets = self._peers(dst)
        if not targets:
            raise RebalanceError(f"no node of shard {dst} is known to the broker")
        result, _ = self._admin(
            src, "push", old=ring_wire(plan.old), new=ring_wire(plan.new), dst=dst,
            phase=phase, v0=int(progress["v0"]) if phase > 1 else 0,
            after=progress["cursor"], targets=targets, limit=self.batch_keys,
            bytes_max=self.batch_bytes, rate=rate)
        if result.get("flipped"):
            raise _Flipped

    def _peers(self, shard: int) -> list[list[str]]:
        """``[node id, peer address]`` of the shard's live nodes, from the broker."""
        nodes = self.kv.status(timeout=ADMIN_TIMEOUT_S).get("nodes", [])
        return [[str(n["node_id"]), str(n["peer_addr"])] for n in nodes
                if int(n["shard_id"]) == shard and n.get("live", True) and n.get("peer_addr")]

    def _drop(self, shard: int, epoch: int) -> None:
        """Drop the keys ``shard`` no longer owns: its leader lists them off its hot
        path, then each request deletes a batch, until the last."""
        dropped = 0
        while True:
            r = self._cmd(shard, "drop", epoch=epoch)
            dropped += int(r.get("dropped", 0))
            if r.get("done"):
                break
            if r.get("listing") is not None:
                time.sleep(self.poll_s)
        if dropped:
            self.say(f"shard {shard}: dropped {dropped} moved keys")

    # ------------------------------------------------------------------ plumbing

    def _settled_ring(self) -> RingConfig:
        plan = self.pending()
        if plan is not None:
            raise RebalanceError(f"a change to ring epoch {plan.new.epoch} is unfinished: "
                                 "run `zkv admin resume` first")
        return self.current_ring()

    def _plan_to(self, infos: dict[int, dict[str, Any]], new: RingConfig) -> Plan:
        olds = [ring_of(i["ring"]) for i in infos.values()
                if i.get("ring") and ring_of(i["ring"]).epoch == new.epoch - 1]
        if not olds:  # every shard flipped already: only ring_set and drop remain, on all
            heard = tuple(sorted(set(infos) | set(new.shards)))
            return Plan.of(RingConfig(new.epoch - 1, heard, new.vnodes), new)
        return Plan.of(olds[0], new)

    def _heard_shards(self) -> list[int]:
        nodes = self.kv.status(timeout=ADMIN_TIMEOUT_S).get("nodes", [])
        return sorted({int(n["shard_id"]) for n in nodes if n.get("live", True)})

    def _info(self, shard: int) -> dict[str, Any]:
        return self._admin(shard, "info")[0]

    def _progress(self, target: int, new: RingConfig) -> dict[str, Any]:
        info = self._info(target)
        if ring_of(info["ring"]).epoch >= new.epoch:
            raise _Flipped
        inc = info.get("incoming")
        if not inc or ring_of(inc["new"]) != new:
            raise RebalanceError(f"shard {target} does not expect ring epoch {new.epoch}")
        return dict(inc["sources"])

    def _admin(self, shard: int, op: str, payload: bytes = b"",
               **args: Any) -> tuple[dict[str, Any], bytes]:
        result, out = self.kv.admin(shard, op, args, payload, timeout=ADMIN_TIMEOUT_S)
        if not result.get("ok"):
            raise RebalanceError(f"shard {shard} refused {op}: {result.get('error')}")
        return result, out

    def _cmd(self, shard: int, op: str, payload: bytes = b"", **args: Any) -> dict[str, Any]:
        result = self._admin(shard, op, payload, **args)[0]
        if result.get("noop") and op not in ("ring_set", "drop"):
            raise _Flipped
        return result
