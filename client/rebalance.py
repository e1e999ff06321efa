"""The migration coordinator: add or remove a shard online (issue 4).

It holds no state of its own: every step is an idempotent ``AdminRequest`` to a shard
leader, through any broker, and the progress lives in the shards' replicated state
(``storage_node/ownership.py`` has the rules each step relies on). So a coordinator,
a broker or a shard leader may die at any point: the SDK retries through another broker
or the new leader, and ``zkv admin resume`` (``Rebalancer.resume``) rebuilds where a dead
coordinator stopped from the shards themselves and rolls the change forward.

Steps for a change from ring ``old`` (epoch E) to ``new`` (epoch E+1):
1. ``begin`` at every target (a shard gaining keys): it records what to expect.
2. Phase 1, per (source, target): the coordinator pulls batches of moving keys from the
   source leader (``scan``) and pushes each, unopened, to the target leader as one
   replicated ``migrate`` write. Sources keep serving meanwhile. (The bytes travel
   source leader -> coordinator -> target leader: the coordinator is the relay, so the
   nodes need no sockets to other shards.)
3. ``fence`` at every source: from its log position on, the moving ranges are refused
   (UNAVAILABLE, retryable) at that source; ranges that do not move are not affected.
4. Phase 2, per (source, target): the delta (values changed since phase 1, the list of
   keys still present) and then the source's session table (exactly-once retries).
5. ``ring_set`` to ``new``: targets first (each refuses unless it has everything), then
   the other shards. Brokers adopt the new epoch from heartbeats; a request that still
   reaches an old owner gets WRONG_SHARD and the SDK retries.
6. ``drop`` at every shard: keys not owned at the new epoch are deleted.

There is no rollback: before step 5 nothing is lost by stopping (fenced ranges stay
unavailable until ``resume``), and from step 5 on only rolling forward is correct.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from client.sdk import KVClient
from protocol.errors import KVError
from protocol.ring import Ring, RingConfig, plan_moves

BATCH_KEYS = 2000
BATCH_BYTES = 2 * 1024 * 1024
ADMIN_TIMEOUT_S = 30.0


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
                 on_step: Callable[[str], None] | None = None) -> None:
        self.kv = kv
        self.say = progress or (lambda _line: None)
        self.batch_keys = batch_keys
        self.batch_bytes = batch_bytes
        #: called with a step name before it starts (tests inject faults here)
        self.on_step = on_step or (lambda _step: None)
        self.stats = Stats()

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
            r = self._cmd(shard, "drop", epoch=new.epoch)
            if r.get("dropped"):
                self.say(f"shard {shard}: dropped {r['dropped']} moved keys")
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
        progress = {t: self._progress(t, new) for t in plan.targets}
        self.on_step("copy")
        for s, t in plan.pairs:
            p = progress[t][str(s)]
            if p["phase"] == 1:
                self._stream(plan, s, t, 1, p["cursor"], 0)
        self.on_step("fence")
        self.stats.fenced_s = time.monotonic()
        for s in plan.sources:
            self._cmd(s, "fence", old=ring_wire(old), new=ring_wire(new))
        self.say(f"fenced the moving ranges on shards {plan.sources}")
        progress = {t: self._progress(t, new) for t in plan.targets}
        self.on_step("delta")
        for s, t in plan.pairs:
            p = progress[t][str(s)]
            if p["phase"] == 2:
                self._stream(plan, s, t, 2, p["cursor"], p["v0"])
            if p.get("missing"):
                raise RebalanceError(f"shard {t} lacks {p['missing']} keys of shard {s}")
            if not p["sessions"]:
                result, payload = self._admin(s, "sessions", old=ring_wire(old),
                                              new=ring_wire(new))
                if result.get("flipped"):
                    raise _Flipped
                self._cmd(t, "merge_sessions", payload, new_epoch=new.epoch, src=s,
                          version_next=result["version_next"])
        for t in plan.targets:
            p = self._progress(t, new)
            bad = {s: v for s, v in p.items() if v["missing"]}
            if bad:
                raise RebalanceError(f"shard {t} is missing keys from {bad}: not flipping")

    def _stream(self, plan: Plan, src: int, dst: int, phase: int, cursor: bytes, v0: int) -> None:
        sent = 0
        while True:
            self.on_step(f"batch{phase}")
            result, payload = self._admin(
                src, "scan", old=ring_wire(plan.old), new=ring_wire(plan.new), dst=dst,
                phase=phase, after=cursor, v0=v0, limit=self.batch_keys,
                bytes_max=self.batch_bytes)
            if result.get("flipped"):
                raise _Flipped
            r = self._cmd(dst, "migrate", payload, new_epoch=plan.new.epoch, src=src,
                          phase=phase, v0=result["applied"] if phase == 1 else v0,
                          done=bool(result["done"]), cursor=result["cursor"])
            if r.get("stale"):
                return  # the phase was closed meanwhile (a retried final batch)
            cursor = result["cursor"]
            sent += int(result["count"])
            self.stats.keys += int(result["count"])
            self.stats.bytes += len(payload)
            if result["done"]:
                self.say(f"phase {phase} {src}->{dst}: {sent} keys")
                return

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
