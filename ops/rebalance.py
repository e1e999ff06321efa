"""The migration coordinator: add or remove a shard online (``zkv admin``).

A thin loop around the pure core ``ops/ring_change.py`` (which holds the stages and
why each is safe): look at every shard (``AdminInfo``, sources first) and at the
broker's node list, ask the core for the next step, make its admin requests in order
through the SDK, tell the hooks, wait as long as the core says, again, until done.

It holds no state of its own that matters: the progress lives in the shards'
replicated state, so a coordinator, a broker or a shard leader may die at any point.
The SDK retries through another broker or the new leader, and ``zkv admin resume``
(``Rebalancer.resume``) finds the change a dead coordinator left from the shards
themselves (``ring_change.pending_plan``) and rolls it forward. There is no rollback:
before the flip nothing is lost by stopping (fenced ranges stay unavailable until
``resume``), and from the flip on only rolling forward is correct.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from zkv.client.sdk import KVClient
from zkv.ops.ring_change import (
    BATCH_BYTES,
    BATCH_KEYS,
    POLL_S,
    Plan,
    RebalanceError,
    RingChange,
    Stats,
    pending_plan,
    ring_adding,
    ring_removing,
)
from zkv.protocol.admin import (
    AdminAppliedReply,
    AdminInfo,
    AdminInfoReply,
    AdminReply,
    AdminRequest,
    Target,
)
from zkv.protocol.ring import RingConfig

ADMIN_TIMEOUT_S = 30.0

__all__ = [
    "ADMIN_TIMEOUT_S", "Plan", "RebalanceError", "Rebalancer", "ring_adding", "ring_removing",
]


class Rebalancer:
    def __init__(self, kv: KVClient, progress: Callable[[str], None] | None = None,
                 batch_keys: int = BATCH_KEYS, batch_bytes: int = BATCH_BYTES,
                 on_step: Callable[[str], None] | None = None, poll_s: float = POLL_S,
                 rate_bytes_s: int = 0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``rate_bytes_s``: what all streams together may send per second (0: no
        bound); each of the streams running at once gets an equal part. ``clock`` and
        ``sleep`` are the loop's time (the simulator passes its own)."""
        self.kv = kv
        self.say = progress or (lambda _line: None)
        self.batch_keys = batch_keys
        self.batch_bytes = batch_bytes
        #: called with a step name before it starts (tests inject faults here)
        self.on_step = on_step or (lambda _step: None)
        self.stats = Stats()
        self.poll_s = poll_s
        self.rate_bytes_s = rate_bytes_s
        self.clock, self.sleep = clock, sleep

    # ------------------------------------------------------------------ public

    def current_ring(self) -> RingConfig:
        """The broker's ring, once it has heard every shard of it (a broker restarted a
        moment ago learns the cluster from heartbeats within a few intervals)."""
        deadline = self.clock() + ADMIN_TIMEOUT_S
        while True:
            status = self.kv.status(timeout=ADMIN_TIMEOUT_S)
            ring = status["ring"]
            heard = {int(n["shard_id"]) for n in status.get("nodes", [])}
            if ring and set(ring["shards"]) <= heard:
                return RingConfig(int(ring["epoch"]), tuple(ring["shards"]), int(ring["vnodes"]))
            if self.clock() >= deadline:
                raise RebalanceError("the broker has not heard every shard of its ring")
            self.sleep(0.1)

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
        return pending_plan({s: self._info(s) for s in shards})

    def resume(self) -> RingConfig | None:
        plan = self.pending()
        if plan is None:
            self.say("no migration in flight")
            return None
        self.say(f"resuming the change to ring epoch {plan.new.epoch}")
        return self.migrate(plan)

    def migrate(self, plan: Plan) -> RingConfig:
        core = RingChange(plan, self.clock(), batch_keys=self.batch_keys,
                          batch_bytes=self.batch_bytes, rate_bytes_s=self.rate_bytes_s,
                          poll_s=self.poll_s)
        self.stats = core.stats
        while True:
            infos = {s: self._info(s) for s in core.look_order()}
            step = core.step(infos, self._peers(plan.targets), self.clock())
            for line in step.say:
                self.say(line)
            for name in step.entered:
                self.on_step(name)
            if step.done:
                break
            for call in step.calls:
                core.on_reply(call, self._admin(call))
            if step.wait_s > 0:
                self.sleep(step.wait_s)
        s = self.stats
        self.say(f"done: {s.keys} keys, {s.bytes / 1e6:.1f} MB in {s.elapsed_s:.1f} s")
        return plan.new

    # ------------------------------------------------------------------ plumbing

    def _settled_ring(self) -> RingConfig:
        plan = self.pending()
        if plan is not None:
            raise RebalanceError(f"a change to ring epoch {plan.new.epoch} is unfinished: "
                                 "run `zkv admin resume` first")
        return self.current_ring()

    def _peers(self, shards: list[int]) -> dict[int, tuple[Target, ...]]:
        """The live nodes of ``shards`` (and their peer addresses), from the broker."""
        nodes = self.kv.status(timeout=ADMIN_TIMEOUT_S).get("nodes", [])
        return {s: tuple(Target(str(n["node_id"]), str(n["peer_addr"])) for n in nodes
                         if int(n["shard_id"]) == s and n.get("live", True)
                         and n.get("peer_addr"))
                for s in shards}

    def _heard_shards(self) -> list[int]:
        nodes = self.kv.status(timeout=ADMIN_TIMEOUT_S).get("nodes", [])
        return sorted({int(n["shard_id"]) for n in nodes if n.get("live", True)})

    def _info(self, shard: int) -> AdminInfoReply:
        reply = self._admin(AdminInfo(b"", 0, shard))
        if not isinstance(reply, AdminInfoReply):
            raise RebalanceError(f"shard {shard} answered AdminInfo with {type(reply).__name__}")
        return reply

    def _admin(self, call: AdminRequest) -> AdminReply:
        reply = self.kv.admin(call, timeout=ADMIN_TIMEOUT_S)
        if isinstance(reply, AdminAppliedReply) and not reply.result.ok:
            raise RebalanceError(f"shard {call.shard_id} refused {type(call).__name__}: "
                                 f"{reply.result.error}")
        return reply
