"""Shard moves under chaos, in the simulator: the real ``Rebalancer`` adds a shard, then
removes one, on simulated shards that run the production cores.

Three replica groups (the third outside the initial ring) of real node cores, the real
broker cores, clients writing and reading every key through the broker, and the
coordinator: ``Rebalancer`` from ``ops/rebalance.py`` with ``SimAdmin`` as its client.
Each admin call is a real ``AdminRequest`` sent through the broker, retried with the
same request id on refusals and timeouts like the SDK's, and runs the simulated world
until its answer comes: the coordinator is one more process of the simulation.

Chaos all along (drawn from the seed): a lossy, duplicating, reordering network (the
migration streams' ``MigrateBatch``/``MigrateAck`` included, so ack timeouts resend);
leader changes (crash, isolate or pause a leader); crashes that restart from the
simulated disk; the coordinator dies at a random step (``on_step``) or admin call
(before or after it is answered), and a fresh ``Rebalancer(...).resume()`` rolls the
change forward.

Checked: every invariant of ``cluster.py`` after every step (one leader per shard and
term, applied entries equal everywhere); every answer to one write equal to the first
(a retried write applies once, across the move); at the end, after healing: every key at
the shard the final ring names and nowhere else, no fence, migration or undropped state
left, replicas of a shard equal, every acknowledged write in a log, and the history of
every client (the final reads included) linearizable.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.sim.client import SimClient
from tests.sim.cluster import SimConfig, SimResult, Violation, World
from tests.sim.network import NetConfig
from tests.sim.ttl_client import check_ttl
from tests.support.lincheck import check
from zkv.ops.rebalance import RebalanceError, Rebalancer, ring_adding, ring_removing
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ADMIN_REPLY_CLASSES, AdminReply, AdminRequest, ErrorReply
from zkv.protocol.ring import Ring, RingConfig

ADDR = "admin"
#: an admin attempt's answer is awaited this long (simulated), then it is sent again
ADMIN_ATTEMPT_S = 1.0
#: one admin call gives up (a liveness failure) after this long
ADMIN_DEADLINE_S = 30.0
#: a livelock fails the seed instead of hanging it
ADMIN_CALLS_MAX = 20_000
#: coordinator lives per ring change; the last one is not killed
LIVES = 4
#: writes to moving keys whose replies are lost until the move is over, per move
HELD_PER_MOVE = 3
STEPS = ("begin", "copy", "batch1", "catchup", "batch2", "fence", "delta", "batch3",
         "ring_set", "drop")
RETRY = frozenset({ErrorCode.NOT_LEADER, ErrorCode.NO_LEADER, ErrorCode.UNAVAILABLE})


class Died(Exception):
    """The coordinator process was killed (injected)."""


class SimAdmin:
    """The ``KVClient`` surface the ``Rebalancer`` uses (``status``, ``admin``)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.client_id = ADDR.encode()
        self.rid = 0
        self.calls = 0
        self.steps: Counter[str] = Counter()
        self.kill: tuple[str, Any] | None = None
        self._answer: AdminReply | None = None
        self._refused = False
        self._waiting = 0
        world.endpoints[ADDR] = self

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        w = self.world
        w.run_until(w.now + 0.005)  # a round trip to the broker
        table = w.broker.table
        ring = table.ring_config()
        return {"ring": {} if ring is None else ring.as_dict(), "nodes": table.status_rows(w.now)}

    def admin(self, request: AdminRequest, timeout: float | None = None) -> AdminReply:
        self.calls += 1
        what = f"{type(request).__name__} at {request.shard_id}"
        if self.calls > ADMIN_CALLS_MAX:
            raise Violation(f"{ADDR}: more than {ADMIN_CALLS_MAX} admin calls: a livelock")
        if self.kill == ("admin", (self.calls, False)):
            raise Died(f"before admin call {self.calls} ({what})")
        reply = self._call(request)
        if self.kill == ("admin", (self.calls, True)):
            raise Died(f"after admin call {self.calls} ({what})")
        return reply

    def _call(self, req: AdminRequest) -> AdminReply:
        """Send ``req`` until answered, with one request id (every op is idempotent)."""
        w = self.world
        self.rid += 1
        frames = codec.encode(dataclasses.replace(req, client_id=self.client_id,
                                                  request_id=self.rid))
        started = w.now
        while w.now - started < ADMIN_DEADLINE_S:
            self._answer, self._refused, self._waiting = None, False, self.rid
            w.net.send(ADDR, w.brokers[0], frames, w.now)
            w.run_until(w.now + ADMIN_ATTEMPT_S,
                        stop=lambda: self._answer is not None or self._refused)
            if self._answer is not None:
                return self._answer
            if self._refused:
                w.run_until(w.now + 0.05)  # back off, then again
        raise Violation(f"{ADDR}: {type(req).__name__} at shard {req.shard_id} unanswered for "
                        f"{ADMIN_DEADLINE_S:.0f} s")

    def deliver(self, src: str, frames: list[bytes]) -> None:
        msg = codec.decode(frames)
        if getattr(msg, "request_id", None) != self._waiting:
            return  # a late or duplicated answer
        if isinstance(msg, ADMIN_REPLY_CLASSES):
            self._answer = msg
        elif type(msg) is ErrorReply:
            if msg.code not in RETRY:
                raise RebalanceError(f"admin refused: {msg}")
            self._refused = True  # no leader, or not the leader: again after a backoff

    def on_step(self, step: str) -> None:
        self.steps[step] += 1
        if self.kill == ("step", (step, self.steps[step])):
            raise Died(f"at step {step}")


class Mover:
    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = world.fault_rng
        self.admin = SimAdmin(world)
        self.stats: Counter[str] = Counter()
        self.chaos = False

    # ------------------------------------------------------------------ chaos

    def start_chaos(self) -> None:
        rng = self.rng
        self.world.net.config = NetConfig(
            delay_ms_min=rng.choice([0.2, 1.0]),
            delay_ms_mean=rng.choice([1.0, 5.0, 20.0]),
            spike_p=rng.choice([0.01, 0.05]),
            spike_ms=rng.choice([100.0, 500.0, 1500.0]),
            loss_p=rng.choice([0.0, 0.02, 0.08]),
            dup_p=rng.choice([0.0, 0.05]),
        )
        self.chaos = True
        self.world.at(self.world.now + rng.uniform(0.2, 1.5), self._fault)

    def _fault(self) -> None:
        if not self.chaos:
            return
        w, rng = self.world, self.rng
        kind = rng.choices(["crash_leader", "isolate_leader", "pause_leader", "crash"],
                           weights=[3, 3, 2, 1])[0]
        w.faults.fault(kind, rng.uniform(0.3, 2.5), rng.random())
        self.stats[kind] += 1
        w.at(w.now + rng.uniform(0.5, 3.0), self._fault)

    def stop_chaos(self) -> None:
        self.chaos = False
        self.world.faults.heal_everything()

    # ------------------------------------------------------------------ moves

    def plan_death(self, alive: bool) -> None:
        a, rng = self.admin, self.rng
        a.steps.clear()
        roll = rng.random()
        if alive or roll < 0.2:
            a.kill = None
        elif roll < 0.6:
            step = rng.choice(STEPS)
            a.kill = ("step", (step, rng.randint(1, 3) if "batch" in step else 1))
        else:
            a.kill = ("admin", (a.calls + rng.randint(1, 150), rng.random() < 0.5))

    def move(self, goal: RingConfig, start: Callable[[Rebalancer], Any]) -> None:
        """Drive one ring change to ``goal``: coordinators die and are resumed."""
        w, a = self.world, self.admin
        held = self.hold_moving_writes(goal)
        for life in range(LIVES):
            self.plan_death(alive=life == LIVES - 1)
            r = Rebalancer(a, batch_keys=self.rng.randint(2, 9),  # type: ignore[arg-type]
                           on_step=a.on_step, poll_s=0, clock=lambda: w.now,
                           sleep=lambda s: w.run_until(w.now + s))
            try:
                if life == 0:
                    start(r)
                elif r.resume() is None and self.newest() != goal:
                    start(r)  # it died before anything was recorded: start again
                break
            except Died as exc:
                self.stats["coordinator_deaths"] += 1
                w.trace.append((w.now, "COORDINATOR DIED", str(exc)))
        a.kill = None
        w.run_until(w.now + 0.5)  # the broker hears the new epoch from heartbeats
        if self.newest() != goal:
            w.violation(f"the change to {goal} ended at {self.newest()}")
        if Rebalancer(a, poll_s=0).pending() is not None:  # type: ignore[arg-type]
            w.violation("a change is still pending after the coordinator finished")
        self.release(held)

    def hold_moving_writes(self, goal: RingConfig) -> list[SimClient]:
        """Puts to keys about to move, applied at their old owner with their replies
        lost: each is sent again, with its request id, only after the move, and must
        get the first reply (the sessions moved with the keys), not apply again."""
        w = self.world
        old, new = Ring(self.newest()), Ring(goal)
        keys = [f"k{i}" for i in range(w.cfg.keys)]
        moving = [k for k in keys if old.shard_for(k.encode()) != new.shard_for(k.encode())]
        held = []
        for key in self.rng.sample(moving, min(HELD_PER_MOVE, len(moving))):
            c = SimClient(w, len(w.endpoints), keys=[key], auto=False)
            w.endpoints[c.addr] = c
            c.held = True
            c.seq += 1
            c.start("put", key, f"{c.addr}.held")
            w.run_until(w.now + 3.0, stop=lambda c=c: (c.client_id, c.seq) in w.write_replies)
            held.append(c)
        return held

    def release(self, held: list[SimClient]) -> None:
        w = self.world
        for c in held:
            applied = (c.client_id, c.seq) in w.write_replies
            c.release()
            w.run_until(w.now + 30.0, stop=lambda c=c: c.idle)
            if not c.idle:
                w.violation(f"{c.addr}: a held write was never answered after the move")
            self.stats["cached_after_move"] += applied

    def newest(self) -> RingConfig:
        return self.admin.world.broker.table.ring.config  # type: ignore[union-attr]

    # ------------------------------------------------------------------ checks

    def check_final(self, goal: RingConfig) -> None:
        w = self.world
        ring = Ring(goal)
        for shard, ids in w.shard_nodes.items():
            for nid in ids:
                state = w.nodes[nid].state
                own = state.ownership
                if own.ring is None or own.ring.config != goal:
                    w.violation(f"{nid}: ring {own.info()} is not {goal}")
                if own.fence is not None or own.incoming is not None or own.outgoing is not None:
                    w.violation(f"{nid}: migration state left: {own.info()}")
                if own.undropped:
                    w.violation(f"{nid}: keys not dropped: {own.info()}")
                stray = [k for k in state.data if ring.shard_for(k) != shard]
                if stray:
                    w.violation(f"{nid} (shard {shard}) still holds {sorted(stray)[:5]}")


def run_moves(seed: int, **overrides: Any) -> SimResult:
    """Add shard 2, then remove a random shard, under chaos; never raises."""
    cfg = SimConfig(seed=seed, shards=3, ring_shards=2, keys=24, clients=4, ops_max=10**6,
                    faults=False, **overrides)
    world: World | None = None
    try:
        world = World(cfg)
        world.ttl_until = float("inf")
        mover = Mover(world)
        world.run_until(2.0)  # leaders, a first ring at the broker, first writes
        mover.start_chaos()
        first = ring_adding(mover.newest(), 2)
        mover.move(first, lambda r: r.add_shard(2))
        gone = mover.rng.choice([0, 1, 2])
        final = ring_removing(first, gone)
        mover.move(final, lambda r: r.remove_shard(gone))
        world.run_until(world.now + 1.0)
        world.ops_left = 0
        world.ttl_until = world.now
        mover.stop_chaos()
        return _verdict(world, mover, final)
    except Violation as exc:
        if world is None:
            raise
        return world._result(False, "violation", str(exc))
    except Exception:  # noqa: BLE001 - a core or coordinator crash is a finding
        text = traceback.format_exc()
        if world is None:
            return SimResult(seed, False, "crash", text)
        return world._result(False, "crash", f"t={world.now:.3f}s: exception\n{text}")


def _verdict(world: World, mover: Mover, final: RingConfig) -> SimResult:
    cfg = world.cfg
    world.run_until(world.now + cfg.client_deadline_s + 0.5, stop=world._clients_idle)
    world.run_until(world.now + cfg.quiesce_s_max, stop=world._converged)
    world.let_keys_expire()
    problem = world._convergence_problem()
    if problem:
        return world._result(False, "liveness", problem)
    mover.check_final(final)
    world._final_reads()
    # a duplicate of an old write, delayed in the network, may land during the final
    # reads (proposed, then found expired in the sessions): compare once it is applied
    world.run_until(world.now + cfg.quiesce_s_max, stop=world._converged)
    world._check_acked_writes()
    world._check_states_equal()
    if world.ttl_clients:
        check_ttl(world, world.ttl_clients)
    res = check(world.history)
    if not res.ok:
        kind = "unknown" if res.unknown else "linearizability"
        return world._result(res.unknown, kind, res.explanation)
    result = world._result(True, "ok", "")
    result.stats.update(mover.stats)
    result.stats["admin_calls"] = mover.admin.calls
    result.stats["rerouted"] = world.broker.rerouted
    return result
