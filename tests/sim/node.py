"""SimNode: one storage node in the simulation — the real replica core inside a tiny shell.

The shell follows the core's contract (storage_node/replica.py docstring) in one place,
``_drain``: persist hard state, truncation and entries to the SimDisk, report
``persisted``, send messages, install a snapshot, apply committed entries to the KV,
serve reads whose index is applied, answer failed reads NOT_LEADER, and take a snapshot
every ``snapshot_entries`` applied entries. One deviation is deliberate and documented:
a Ready carrying both a snapshot and entries writes the snapshot to disk first, because
those entries follow the snapshot's index.

Client requests are tuples (the simulator does not need the wire codec):
  ("put"|"delete"|"cas", client, seq, key, value, expected) and ("get", client, seq, key);
replies are ("ok", seq, result) or ("not_leader", seq, leader_hint).
The node heartbeats to the broker every ``heartbeat_ms`` through the simulated network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tests.sim import kv as kvmod
from tests.sim.disk import SimDisk
from tests.sim.kv import KV
from zkv.protocol.messages import Role
from zkv.storage_node.replica import Replica, ReplicaConfig

if TYPE_CHECKING:
    from tests.sim.cluster import World


class SimNode:
    def __init__(self, world: World, node_id: str, members: tuple[str, ...]) -> None:
        self.world = world
        self.id = node_id
        self.cfg = ReplicaConfig(
            node_id=node_id,
            members=members,
            heartbeat_interval_ms=world.cfg.heartbeat_ms,
            election_timeout_ms=world.cfg.election_timeout_ms,
        )
        self.disk = SimDisk(world.cfg.fsync)
        self.core: Replica | None = None
        self.kv = KV()
        self.incarnation = 0
        self.paused_until = 0.0
        self.applied_term = 0
        self.snap_index = 0
        self.max_term = 0  # highest term any incarnation reached (durable with fsync=always)
        self.max_commit = 0  # highest commit index this incarnation reported
        self._pending_writes: dict[int, tuple[str, int, int]] = {}
        self._pending_reads: list[tuple[int, Any]] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def up(self) -> bool:
        return self.core is not None

    def start(self) -> None:
        img = self.disk.recover()
        snap = img.snapshot
        self.core = Replica(self.cfg, img.hard_state, img.log, snap)
        self.kv = KV.restore(snap[2]) if snap else KV()
        self.applied_term = snap[1] if snap else 0
        self.snap_index = snap[0] if snap else 0
        self.max_commit = self.core.commit_index
        self._pending_writes.clear()
        self._pending_reads.clear()
        self.incarnation += 1
        self.paused_until = 0.0
        inc = self.incarnation
        self.world.at(self.world.now + self.world.rng.uniform(0, 0.02), self._tick, inc)
        self.world.at(self.world.now + self.world.rng.uniform(0, 0.1), self._heartbeat, inc)

    def crash(self) -> None:
        self.core = None
        self.disk.crash()

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)

    def paused(self) -> bool:
        return self.world.now < self.paused_until

    # ------------------------------------------------------------------ events

    def _tick(self, inc: int) -> None:
        if inc != self.incarnation or self.core is None:
            return
        w = self.world
        if not self.paused():
            self.core.tick(w.now)
            self._drain()
            if w.cfg.fsync == "never" and w.rng.random() < 0.05:
                self.disk.flush()
        w.at(max(w.now, self.paused_until) + w.cfg.tick_ms / 1000, self._tick, inc)

    def _heartbeat(self, inc: int) -> None:
        if inc != self.incarnation or self.core is None:
            return
        w = self.world
        if not self.paused():
            c = self.core
            w.net.send(self.id, "broker", (
                "hb", self.id, c.role, c.term, c.leader_id, c.last_term, c.last_index,
                c.commit_index, self.kv.applied,
            ), w.now)  # fmt: skip
        w.at(max(w.now, self.paused_until) + w.cfg.heartbeat_ms / 1000, self._heartbeat, inc)

    def deliver(self, src: str, msg: Any) -> None:
        core = self.core
        if core is None:
            return  # the process is down; its socket buffers died with it
        w = self.world
        if self.paused():
            w.net.requeue(src, self.id, msg, self.paused_until)
            return
        if isinstance(msg, tuple):
            if msg[0] == "campaign":
                core.campaign(w.now, msg[1])
            else:
                self._on_client(src, msg)
        else:
            core.step(src, msg, w.now)
        core.tick(w.now)
        self._drain()

    def _on_client(self, src: str, req: tuple) -> None:
        core = self.core
        assert core is not None
        op, client, seq = req[0], req[1], req[2]
        now = self.world.now
        if op == "get":
            if not core.read_index((src, seq, req[3]), now):
                self._reply(src, ("not_leader", seq, core.leader_id))
            return
        if core.role is not Role.LEADER:
            self._reply(src, ("not_leader", seq, core.leader_id))
            return
        last = self.kv.sessions.get(client)
        if last is not None and last[0] == seq:
            self._reply(src, ("ok", seq, last[1]))  # a retry of something already applied
            return
        index = core.propose(kvmod.encode(op, client, seq, req[3], req[4], req[5]), now)
        if index is None:
            self._reply(src, ("not_leader", seq, core.leader_id))
        else:
            self._pending_writes[index] = (src, client, seq)

    def _reply(self, dst: str, msg: tuple) -> None:
        self.world.net.send(self.id, dst, msg, self.world.now)

    # ------------------------------------------------------------------ the shell

    def _drain(self) -> None:
        core = self.core
        assert core is not None
        w = self.world
        for _ in range(1000):  # a limit on everything: a core that never settles is a bug
            if not core.has_ready():
                break
            rd = core.ready()
            if rd.truncate_from is not None and rd.truncate_from <= self.kv.applied:
                w.violation(
                    f"{self.id} truncates its log from {rd.truncate_from} but has applied "
                    f"up to {self.kv.applied}: a committed entry would disappear"
                )
            if rd.snapshot is not None:
                self._install(*rd.snapshot)
            if rd.hard_state is not None or rd.truncate_from is not None or rd.entries:
                last = self.disk.write(rd.hard_state, rd.truncate_from, rd.entries)
                core.persisted(last)
            for to, m in rd.messages:
                w.net.send(self.id, to, m, w.now)
            for e in rd.committed:
                if e.index > self.kv.applied:
                    self._apply(e.index, e.term, e.data)
            core.applied(self.kv.applied)
            for token in rd.failed_reads:
                self._reply(token[0], ("not_leader", token[1], core.leader_id))
            self._pending_reads.extend((index, token) for token, index in rd.reads)
            self._serve_reads()
            self._maybe_compact()
        else:
            w.violation(f"{self.id}: ready() still has work after 1000 rounds")
        w.check_node(self)

    def _install(self, index: int, term: int, data: bytes) -> None:
        w = self.world
        if index < self.kv.applied:
            w.violation(f"{self.id} installs snapshot at {index} below applied {self.kv.applied}")
        kv = KV.restore(data)
        if kv.applied != index:
            w.violation(f"{self.id}: snapshot at {index} holds state applied to {kv.applied}")
        w.check_snapshot(self, index, term, kv)
        self.disk.save_snapshot(index, term, data, keep_log=False)
        self.kv = kv
        self.applied_term = term
        self.snap_index = index

    def _apply(self, index: int, term: int, data: bytes) -> None:
        self.world.check_commit(self, index, term, data)
        res = self.kv.apply(index, data)
        self.applied_term = term
        pending = self._pending_writes.pop(index, None)
        if pending is not None and res is not None and res[:2] == pending[1:]:
            self._reply(pending[0], ("ok", pending[2], res[2]))

    def _serve_reads(self) -> None:
        if not self._pending_reads:
            return
        keep = []
        for index, token in self._pending_reads:
            if self.kv.applied >= index:
                self._reply(token[0], ("ok", token[1], self.kv.get(token[2])))
            else:
                keep.append((index, token))
        self._pending_reads = keep

    def _maybe_compact(self) -> None:
        every = self.world.cfg.snapshot_entries
        core = self.core
        if every <= 0 or core is None or self.kv.applied - self.snap_index < every:
            return
        index, term, data = self.kv.applied, self.applied_term, self.kv.snapshot()
        self.disk.save_snapshot(index, term, data, keep_log=True)
        core.compacted(index, term, data)
        self.snap_index = index
