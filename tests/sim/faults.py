"""The fault plan of a simulated run, drawn from the seed (``World.fault_rng``).

Network settings (delay, spikes, loss, duplication) for the whole run, then a fault
every 0.5-4 s until 2 s before the end: crash a node (or the leader, or every node)
and restart it later from its SimDisk; isolate the leader from everyone (brokers
included); split the nodes in two; cut one link one way; pause a process (its messages
wait); cut the leader from every broker one way only (``mute_leader``: the brokers stop
hearing it; ``deaf_leader``: nothing from the brokers reaches it) while it still
reaches its followers, for 2-8 s, so that the availability rule (``availability.py``)
has to act. ``heal_everything`` ends them all and restarts what is down.

Connections (issue 10): ``half_open`` drops one direction between any node and one
peer or broker (a half-open connection: the reverse still works) for 2-8 s;
``misroute`` delivers what a node or the broker sends to one node to another node of
the shard instead (a connection to an address another node now has), for 0.3-4 s.

Disks (``disk.py``; the restart is the production recovery plan, ``restart.py``):
``torn_write`` makes the victim's next WAL write fail mid-way with a power loss (a torn
record at the tail); ``snapshot_power_loss`` loses the rename of its next snapshot
(power off before the directory fsync); ``disk_full`` makes its writes fail with ENOSPC
for 2-8 s; ``corrupt_snapshot`` damages its newest snapshot file and power-cycles it;
``lose_disk`` power-cycles it with an empty disk. A powered-off node restarts after
0.3-4 s. The last two may cost a node state beyond what any fsync policy allows, so at
most a minority of a shard is ever in that state (``whole``/``at_risk``): a node whose
recovery refuses is repaired as the refusal says (the operator moves its data dir
aside and restarts it empty: a non-voter until re-admitted). A refusal of a node that
saw no such fault is a violation: invariant 9, every state a crash or power loss can
leave recovers.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from tests.sim.network import NetConfig
from zkv.protocol.messages import Role
from zkv.storage_node.recovery import Refusal

if TYPE_CHECKING:
    from tests.sim.cluster import World
    from tests.sim.node import SimNode

#: fault kind -> weight of its draw
KINDS = {"crash": 3, "crash_leader": 3, "crash_all": 1, "isolate_leader": 4, "split": 2,
         "cut": 1, "pause": 2, "pause_leader": 2, "mute_leader": 2, "deaf_leader": 2,
         "half_open": 2, "misroute": 2, "torn_write": 2, "snapshot_power_loss": 1,
         "disk_full": 2, "corrupt_snapshot": 1, "lose_disk": 2}
#: drawn only when a run names them (``fault_kinds``): appended with weight 0 otherwise,
#: so every seed of the full plan draws the faults it drew before they existed.
#: ``stop``/``stop_leader``: SIGTERM, a leader handing over first (``graceful_stop.py``)
OPT_IN = {"stop_leader": 3, "stop": 1}
#: one-way cuts between the leader and every broker
ONE_WAY = ("mute_leader", "deaf_leader")
#: faults that last 2-8 s (the others 0.3-4 s)
LONG = (*ONE_WAY, "half_open", "disk_full")
#: faults that may cost a node state beyond its fsync policy's promise
LOSSY = ("corrupt_snapshot", "lose_disk")
#: how long the operator takes to repair a node whose recovery refused
REPAIR_S = 1.0


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
        kinds, weights = [*KINDS, *OPT_IN], [*KINDS.values(), *[0] * len(OPT_IN)]
        if cfg.fault_kinds:
            every = {**KINDS, **OPT_IN}
            weights = [every[k] if k in cfg.fault_kinds else 0 for k in kinds]
        t = rng.uniform(1.0, 3.0)
        end = cfg.duration_s - 2.0 if any(weights) else 0.0  # ("membership",) alone
        while t < end:
            kind = rng.choices(kinds, weights=weights)[0]
            length = rng.uniform(2.0, 8.0) if kind in LONG else rng.uniform(0.3, 4.0)
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
        if kind in ("stop", "stop_leader"):  # SIGTERM: a leader hands over first
            if victim.up and victim.stopping is None:
                victim.terminate(length)
        elif kind in ("crash", "crash_leader"):
            if victim.up:
                victim.crash()
                w.at(w.now + length, self.restart, victim.id)
        elif kind == "crash_all":
            for node in w.nodes.values():
                if node.up:
                    node.crash()
                    w.at(w.now + length + w.fault_rng.uniform(0, 0.5), self.restart, node.id)
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
        elif kind in ("half_open", "misroute"):
            self._connection_fault(kind, victim, length)
        else:
            self._disk_fault(kind, victim, length)

    def _connection_fault(self, kind: str, victim: SimNode, length: float) -> None:
        w = self.w
        rng = w.fault_rng
        peers = [n for n in w.shard_nodes[victim.shard_id] if n != victim.id]
        if kind == "half_open":
            other = rng.choice(peers + w.brokers)
            link = (victim.id, other) if rng.random() < 0.5 else (other, victim.id)
            w.net.cut(*link)
            self._one_way.add(link)
            w.at(w.now + length, self._uncut, [link])
            return
        # what ``src`` sends to the victim reaches ``wrong`` instead, for a while
        src = rng.choice(peers + w.brokers)
        wrong = rng.choice([n for n in peers if n != src] or peers)
        if wrong == src:
            return
        w.net.misroute(src, victim.id, wrong)
        w.at(w.now + length, self._unmisroute, src, victim.id)

    def _unmisroute(self, src: str, dst: str) -> None:
        self.w.trace.append((self.w.now, "UNMISROUTE", (src, dst)))
        self.w.net.unmisroute(src, dst)

    def _disk_fault(self, kind: str, victim: SimNode, length: float) -> None:
        w = self.w
        if kind in LOSSY and not self._may_lose(victim):
            return
        if kind == "disk_full":
            victim.disk.full = True
            w.at(w.now + length, self._disk_space, victim.id)
        elif kind in ("torn_write", "snapshot_power_loss"):
            if victim.up:
                victim.disk.arm("torn" if kind == "torn_write" else "snapshot",
                                w.fault_rng.random())
                w.at(w.now + length, self._disarm, victim.id)
        else:
            if victim.up:
                victim.crash()
                w.at(w.now + length, self.restart, victim.id)
            if kind == "lose_disk":
                victim.lose_disk()
            elif victim.disk.damage_snapshot():
                victim.at_risk = True

    def _may_lose(self, victim: SimNode) -> bool:
        """A fault that may cost state is drawn only while the rest of the shard keeps
        a whole majority: at most a minority is ever short of state, in every
        configuration that may be in force (any running node's, the latest committed,
        and the one the operator's change is heading for, ``members.py``)."""
        w = self.w
        shard = victim.shard_id
        sets = {frozenset(w.shard_nodes[shard]), frozenset(w.configs.latest(shard).voters)}
        sets.update(frozenset(w.nodes[n].core.membership.voters)  # type: ignore[union-attr]
                    for n in w.shard_nodes[shard] if w.nodes[n].up)
        target = w.operator.target_voters(shard)
        if target is not None:
            sets.add(target)
        for voters in sets:
            if victim.id not in voters:
                continue
            short = {n for n in voters if w.short(n)}
            if len(short | {victim.id}) > (len(voters) - 1) // 2:
                return False
        return True

    def _disk_space(self, node_id: str) -> None:
        self.w.trace.append((self.w.now, "DISK SPACE", node_id))
        if node_id in self.w.nodes:
            self.w.nodes[node_id].disk.full = False

    def _disarm(self, node_id: str) -> None:
        if node_id in self.w.nodes:
            self.w.nodes[node_id].disk.armed = None

    def powered_off(self, node: SimNode) -> None:
        """The node lost power in the middle of a write (``SimDisk.arm``)."""
        w = self.w
        w.at(w.now + w.fault_rng.uniform(0.3, 4.0), self.restart, node.id)

    def restart(self, node_id: str) -> None:
        w = self.w
        node = w.nodes.get(node_id)  # None: the operator removed it and stopped it
        if node is not None and not node.up:
            w.trace.append((w.now, "RESTART", node_id))
            if self._start(node) is not None:
                w.at(w.now + REPAIR_S, self._repair, node_id)

    def _start(self, node: SimNode) -> Refusal | None:
        """Start ``node``; a refusal it had no reason for is a violation (invariant 9)."""
        w = self.w
        refusal = node.start()
        if refusal is not None:
            w.faults_log.append(f"{w.now:.2f}s {node.id} refuses to start: "
                                f"{refusal.path} {refusal.reason}")
            if node.whole and not node.at_risk:
                w.violation(f"{node.id} cannot restart after faults within its fsync "
                            f"policy's promise: {refusal.message()}")
        return refusal

    def _repair(self, node_id: str) -> None:
        """The operator follows the refusal: the data dir is moved aside, the node
        restarts empty (a non-voter until a leader re-admits it)."""
        w = self.w
        node = w.nodes.get(node_id)
        if node is not None and not node.up:
            w.trace.append((w.now, "REPAIR", node_id))
            node.at_risk = False
            node.lose_disk()
            self._start(node)

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
        w.net.unmisroute_all()
        for node in w.nodes.values():
            node.paused_until = 0.0
            node.disk.full = False
            node.disk.armed = None
            if not node.up and self._start(node) is not None:
                node.at_risk = False
                node.lose_disk()
                self._start(node)
        w.trace.append((w.now, "HEAL ALL", None))
