"""The fault plan of a simulated run, drawn from the seed (``World.fault_rng``).

Network settings (delay, spikes, loss, duplication) for the whole run, then a fault
every 0.5-4 s until 2 s before the end: crash a node (or the leader, or every node)
and restart it later from its SimDisk; isolate the leader from everyone (brokers
included); split the nodes in two; cut one link one way; pause a process (its messages
wait); cut the leader from every broker one way only (``mute_leader``: the brokers stop
hearing it; ``deaf_leader``: nothing from the brokers reaches it) while it still
reaches its followers, for 2-8 s, so that the availability rule (``availability.py``)
has to act. ``heal_everything`` ends them all and restarts what is down.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from tests.sim.network import NetConfig
from zkv.protocol.messages import Role

if TYPE_CHECKING:
    from tests.sim.cluster import World
    from tests.sim.node import SimNode

#: fault kind -> weight of its draw
KINDS = {"crash": 3, "crash_leader": 3, "crash_all": 1, "isolate_leader": 4, "split": 2,
         "cut": 1, "pause": 2, "pause_leader": 2, "mute_leader": 2, "deaf_leader": 2}
#: one-way cuts between the leader and every broker
ONE_WAY = ("mute_leader", "deaf_leader")


class FaultPlan:
    def __init__(self, world: World) -> None:
        self.w = world
        #: one-way leader/broker cuts in force (another fault's heal leaves them)
        self._one_way: set[tuple[str, str]] = set()

    def plan(self) -> None:
        w = self.w
        rng, cfg = w.fault_rng, w.cfg
        w.net.config = NetConfig(
            delay_ms_min=rng.choice([0.2, 1.0, 2.0]),
            delay_ms_mean=rng.choice([1.0, 3.0, 10.0, 25.0]),
            spike_p=rng.choice([0.0, 0.01, 0.05]),
            spike_ms=rng.choice([100.0, 500.0, 1500.0]),
            loss_p=rng.choice([0.0, 0.0, 0.01, 0.05, 0.15]),
            dup_p=rng.choice([0.0, 0.0, 0.02, 0.1]),
        )
        kinds, weights = list(KINDS), list(KINDS.values())
        if cfg.fault_kinds:
            weights = [KINDS[k] if k in cfg.fault_kinds else 0 for k in kinds]
        t = rng.uniform(1.0, 3.0)
        end = cfg.duration_s - 2.0
        while t < end:
            kind = rng.choices(kinds, weights=weights)[0]
            length = rng.uniform(2.0, 8.0) if kind in ONE_WAY else rng.uniform(0.3, 4.0)
            w.at(t, self.fault, kind, length, rng.random())
            t += rng.uniform(0.5, 4.0)

    def _leader_or_random(self, draw: float) -> SimNode:
        w = self.w
        leaders = [n for n in w.nodes.values()
                   if n.core is not None and n.core.role is Role.LEADER]
        if leaders:
            return leaders[int(draw * len(leaders))]
        return w.nodes[w.node_ids[int(draw * len(w.node_ids))]]

    def fault(self, kind: str, length: float, draw: float) -> None:
        w = self.w
        ids = w.node_ids
        victim = (
            self._leader_or_random(draw)
            if kind.endswith("_leader")
            else w.nodes[ids[int(draw * len(ids))]]
        )
        if w.availability is not None:
            w.availability.on_fault()
        w.faults_log.append(f"{w.now:.2f}s {kind} {victim.id} for {length:.2f}s")
        w.trace.append((w.now, "FAULT", (kind, victim.id, round(length, 2))))
        if kind in ("crash", "crash_leader"):
            if victim.up:
                victim.crash()
                w.at(w.now + length, self._restart, victim.id)
        elif kind == "crash_all":
            for node in w.nodes.values():
                if node.up:
                    node.crash()
                    w.at(w.now + length + w.fault_rng.uniform(0, 0.5), self._restart, node.id)
        elif kind == "isolate_leader":
            others = [n for n in ids if n != victim.id] + w.brokers
            w.net.isolate(victim.id, others)
            w.at(w.now + length, self._heal)
        elif kind == "split":
            shuffled = ids[:]
            w.fault_rng.shuffle(shuffled)
            cut_at = w.fault_rng.randrange(1, len(ids))
            w.net.partition(shuffled[:cut_at], shuffled[cut_at:])
            w.at(w.now + length, self._heal)
        elif kind == "cut":
            dst = w.fault_rng.choice([n for n in ids if n != victim.id])
            w.net.cut(victim.id, dst)
            w.at(w.now + length, self._heal)
        elif kind.startswith("pause"):
            victim.pause(w.now + length)
        elif kind in ONE_WAY:
            links = [(victim.id, b) if kind == "mute_leader" else (b, victim.id)
                     for b in w.brokers]
            for src, dst in links:
                w.net.cut(src, dst)
            self._one_way.update(links)
            w.at(w.now + length, self._uncut, links)

    def _restart(self, node_id: str) -> None:
        w = self.w
        node = w.nodes[node_id]
        if not node.up:
            w.trace.append((w.now, "RESTART", node_id))
            node.start()

    def _uncut(self, links: list[tuple[str, str]]) -> None:
        w = self.w
        w.trace.append((w.now, "UNCUT", links))
        for src, dst in links:
            w.net.uncut(src, dst)
            self._one_way.discard((src, dst))

    def _heal(self) -> None:
        """End the partitions of the other kinds (a one-way cut lasts its own length)."""
        w = self.w
        w.trace.append((w.now, "HEAL", None))
        w.net.heal()
        for src, dst in self._one_way:
            w.net.cut(src, dst)

    def heal_everything(self) -> None:
        w = self.w
        w._timers = [t for t in w._timers if t[2] != self.fault]
        heapq.heapify(w._timers)
        self._one_way.clear()
        w.net.heal()
        w.net.config = NetConfig()
        for node in w.nodes.values():
            node.paused_until = 0.0
            if not node.up:
                node.start()
        w.trace.append((w.now, "HEAL ALL", None))
