"""The simulated shard: one seed in, one verdict out (FoundationDB / VOPR style).

Everything runs in one thread on a SimClock: node ticks, heartbeats, broker checks,
client operations and faults are timers on one heap; messages are deliveries on the
SimNetwork's heap; the loop always takes the earliest. The nodes and the broker are the
production cores (``tests/sim/node.py``, ``tests/sim/broker.py``: thin shells only), and
clients send the real request messages through the broker. All randomness comes from
``random.Random`` streams derived from the seed (one per concern, so a change in how
often clients draw does not reshuffle the fault schedule), hence ``SIM_SEED=n``
replays a run exactly.

A run: 3 replicas (5 on every fourth seed), clients issuing ~200 operations over ~20 simulated seconds while
the fault plan (drawn from the seed) crashes and restarts nodes, partitions the
network (often isolating the leader), pauses processes, half-opens and misroutes
connections, tears writes, loses snapshot renames, damages snapshots, fills and wipes
disks, and sets loss, duplication and delay, and an operator adds, removes and replaces
replicas, the leader among them (``members.py``). Then everything heals, the cluster
quiesces, clients read every key, and the verdict is taken.

Invariants, checked after every step (``check_*``, raising ``Violation``):
- at most one leader per term, ever;
- an applied entry (index, term, data) is the same on every node, forever: the first
  application of an index is recorded and every later one (any node, any incarnation,
  after snapshots) must match; no node truncates below what it applied, nor installs a
  snapshot below it, nor sees its commit index go back within an incarnation;
- a node's term never decreases across restarts (with fsync=always), except for a term
  it never persisted (its disk was full) and after it lost its disk;
- a granted vote and an append ack promise only what the disk holds (``node.py``); a
  node whose disk was lost never votes or acks as a voter before a leader re-admits it
  (invariant 7); a node restarts from whatever crashes, power losses, torn writes, lost
  renames and full disks left, unless a fault beyond its fsync policy's promise (a
  damaged snapshot, a lost disk) cost it state (invariant 9, ``faults.py``);
- the availability rule (``availability.py``): while a majority of the shard and a
  broker reach each other, the shard is never without a usable leader for longer than
  ``availability_s``;
- configurations agree (``configs.py``): a configuration entry is the same on every
  node holding it, changes are single-server and one at a time, every node's committed
  configuration is the shard's committed sequence's at that index, a leader that
  committed its removal steps down;
- at quiescence: one leader, every replica caught up, equal state digests, the
  operator's change done, every member on the leader's configuration, which names
  exactly the nodes that run, each voter voting;
- every acknowledged write is in the committed log; the client history is linearizable.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.sim.availability import AvailabilityCheck, bound_for
from tests.sim.broker import SimBroker
from tests.sim.client import SimClient
from tests.sim.clock import SimClock
from tests.sim.configs import ConfigCheck
from tests.sim.faults import FaultPlan
from tests.sim.members import PROMOTE_LAGS, Operator, Supervisor
from tests.sim.network import NetConfig, SimNetwork
from tests.sim.node import SimNode
from tests.sim.ttl_client import TTLS_S, SimTtlClient, check_ttl, ttl_stats
from tests.support.history import History
from tests.support.lincheck import check
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import Role
from zkv.protocol.ring import RingConfig
from zkv.storage_node.commands import Noop, decode_command

TRACE_LEN = 400


class Violation(AssertionError):
    """An invariant broke: most likely a bug in the replica core (or in its shell here)."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    seed: int = 0
    nodes: int = 3
    duration_s: float = 20.0
    quiesce_s_max: float = 15.0
    clients: int = 4
    keys: int = 3
    ops_max: int = 200
    heartbeat_ms: int = 100
    #: not the production default (``protocol/timing.py``, 700 ms): the nemeses' fixed
    #: delays (a message lost or late by up to 1.5 s) and the availability bounds in
    #: election timeouts (``availability.py``) were measured together at 1000 ms
    election_timeout_ms: int = 1000
    tick_ms: float = 20.0
    fsync: str = "always"
    snapshot_entries: int = 40
    client_timeout_s: float = 1.0
    client_deadline_s: float = 4.0
    faults: bool = True
    events_max: int = 2_000_000
    #: replica groups (shards); the initial ring names the first ``ring_shards`` (0: all)
    shards: int = 1
    ring_shards: int = 0
    vnodes: int = 16
    #: the availability rule's bound on a down stretch (availability.py): None, by
    #: the network's loss and delay; 0: unchecked
    availability_s: float | None = None
    #: only these fault kinds (faults.py); empty: all
    fault_kinds: tuple[str, ...] = ()
    #: clients putting keys with short TTLs and reading them (``ttl_client.py``)
    ttl_clients: int = 0
    #: the operator changes the shard's replicas under the faults (``members.py``);
    #: with ``fault_kinds``, only when they name "membership"
    membership: bool = True
    #: a learner within this many entries of the leader's log is promoted (None: drawn
    #: from the seed, ``members.PROMOTE_LAGS``)
    promote_lag_max: int | None = None


@dataclass(slots=True)
class SimResult:
    seed: int
    ok: bool
    kind: str = "ok"  # ok | violation | crash | liveness | linearizability | unknown
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    trace: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = f"seed {self.seed}: {self.kind}"
        return head if self.ok else f"{head}: {self.message.splitlines()[0] if self.message else ''}"


class World(Supervisor):
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        master = random.Random(cfg.seed)
        self.rng = random.Random(master.getrandbits(64))  # node timer jitter
        self.fault_rng = random.Random(master.getrandbits(64))
        self.client_rng = random.Random(master.getrandbits(64))
        self.net = SimNetwork(random.Random(master.getrandbits(64)), NetConfig())
        operator_rng = random.Random(master.getrandbits(64))
        self.promote_lag_max = (cfg.promote_lag_max if cfg.promote_lag_max is not None
                                else operator_rng.choice(PROMOTE_LAGS))
        self.clock = SimClock()
        self.history = History(clock=self.clock.ns)
        self._timers: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._timer_seq = 0
        self.trace: deque[tuple[float, str, Any]] = deque(maxlen=TRACE_LEN)
        self.ring = RingConfig(1, tuple(range(cfg.ring_shards or cfg.shards)), cfg.vnodes)
        #: shard -> the nodes the supervisor runs (cluster.json): the members, plus a
        #: node the operator is adding, until it stops one it removed
        self.shard_nodes: dict[int, list[str]] = {}
        self.nodes: dict[str, SimNode] = {}
        #: nodes the operator removed and stopped, never to start again
        self.retired: dict[str, SimNode] = {}
        self._next_replica: dict[int, int] = {}
        for shard in range(cfg.shards):
            ids = [f"n{i + 1}" if cfg.shards == 1 else f"s{shard}n{i + 1}"
                   for i in range(cfg.nodes)]
            self.shard_nodes[shard] = ids
            self._next_replica[shard] = cfg.nodes + 1
            for nid in ids:
                self.nodes[nid] = SimNode(self, nid, tuple(ids), shard, self.ring)
        self.node_ids = list(self.nodes)
        self._node_list = list(self.nodes.values())
        self.broker = SimBroker(self)
        self.brokers = [self.broker.addr]
        self.clients = [SimClient(self, i) for i in range(cfg.clients)]
        self.endpoints: dict[str, Any] = {**self.nodes, self.broker.addr: self.broker}
        self.endpoints.update({c.addr: c for c in self.clients})
        self.ttl_clients = [SimTtlClient(self, i, cfg.seed) for i in range(cfg.ttl_clients)]
        #: TTL clients start nothing new from then on (a run's end; moves set their own)
        self.ttl_until = cfg.duration_s
        self.endpoints.update({c.addr: c for c in self.ttl_clients})
        self.configs = ConfigCheck(self)
        self.operator = Operator(self, operator_rng)
        self.ops_left = cfg.ops_max
        self.acked: list[tuple[bytes, int, str, str, Any]] = []
        #: (client id, request id) -> the first reply to that write
        self.write_replies: dict[tuple[bytes, int], Any] = {}
        self.leaders_by_term: dict[tuple[int, int], str] = {}  # (shard, term) -> node
        self.committed: dict[tuple[int, int], tuple[int, bytes]] = {}  # (shard, index) ->
        self.events = 0
        self.faults_log: list[str] = []
        #: what the disk and connection faults did (power losses, refusals, ...): stats
        self.disk_events: dict[str, int] = {}
        self.faults = FaultPlan(self)
        self.availability: AvailabilityCheck | None = None
        for node in self.nodes.values():
            node.start()

    # ------------------------------------------------------------------ scheduling

    @property
    def now(self) -> float:
        return self.clock.now

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, fn, args))

    def take_op_budget(self) -> bool:
        if self.ops_left <= 0:
            return False
        self.ops_left -= 1
        return True

    def run_until(self, t_end: float, stop: Callable[[], bool] | None = None) -> None:
        net, timers = self.net, self._timers
        while True:
            t_net = net.next_time()
            t_timer = timers[0][0] if timers else None
            if t_net is None and t_timer is None:
                self.clock.advance_to(max(self.now, t_end))
                return
            if t_timer is None or (t_net is not None and t_net <= t_timer):
                t = t_net
                is_net = True
            else:
                t, is_net = t_timer, False
            assert t is not None
            if t > t_end:
                self.clock.advance_to(t_end)
                return
            self.clock.advance_to(t)
            self.events += 1
            if self.events > self.cfg.events_max:
                raise Violation(f"more than {self.cfg.events_max} events: runaway simulation")
            if is_net:
                item = net.pop_due(t)
                if item is not None:
                    src, dst, msg = item
                    if dst not in self.brokers:  # heartbeats would drown the trace
                        self.trace.append((t, f"{src}->{dst}", msg))
                    self.endpoints[dst].deliver(src, msg)
            else:
                _, _, fn, args = heapq.heappop(timers)
                fn(*args)
            self.check_leaders()
            if stop is not None and stop():
                return

    # ------------------------------------------------------------------ invariants

    def count(self, event: str) -> None:
        self.disk_events[event] = self.disk_events.get(event, 0) + 1

    def violation(self, message: str) -> None:
        raise Violation(f"t={self.now:.3f}s: {message}")

    def check_leaders(self) -> None:
        leader = Role.LEADER
        for node in self._node_list:
            nc = node.node
            if nc is None:
                continue
            core = nc.replica
            if core.role is leader:
                other = self.leaders_by_term.setdefault((node.shard_id, core.term), node.id)
                if other != node.id:
                    self.violation(f"two leaders in term {core.term}: {other} and {node.id}")

    def check_node(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        if core.commit_index < node.max_commit:
            self.violation(
                f"{node.id}: commit index went back from {node.max_commit} to {core.commit_index}"
            )
        node.max_commit = core.commit_index
        if core.term < node.max_term and self.cfg.fsync == "always":
            self.violation(f"{node.id}: term went back from {node.max_term} to {core.term}")
        # a term the core reached while its disk was full was never persisted: nothing
        # was promised on it (disk_full.py), and a crash may take it back
        hard = node.disk.durable.hard_state
        term = core.term if not node.unpersisted else hard.term if hard else 0
        node.max_term = max(node.max_term, term)
        self.configs.on_node(node)

    def check_commit(self, node: SimNode, index: int, term: int, data: bytes) -> None:
        seen = self.committed.get((node.shard_id, index))
        if seen is None:
            seen = self.committed[(node.shard_id, index)] = (term, data)
            self.configs.on_commit(node.shard_id, index, term, data)
        if seen != (term, data):
            self.violation(
                f"{node.id} applies index {index} as (term {term}, {_cmd(data)}) but it was "
                f"applied elsewhere as (term {seen[0]}, {_cmd(seen[1])})"
            )
        self.trace.append((self.now, f"{node.id} apply", (index, term, _cmd(data))))

    def check_snapshot(self, node: SimNode, index: int, term: int, data: bytes) -> None:
        seen = self.committed.get((node.shard_id, index))
        if seen is not None and seen[0] != term:
            self.violation(f"{node.id}: snapshot at {index} has term {term}, applied {seen[0]}")
        self.trace.append((self.now, f"{node.id} install snapshot", (index, term)))

    # ------------------------------------------------------------------ the run

    def run(self) -> SimResult:
        cfg = self.cfg
        if cfg.faults:
            self.faults.plan()
            if cfg.membership and (not cfg.fault_kinds or "membership" in cfg.fault_kinds):
                self.operator.plan(cfg.duration_s - 2.0)
        if cfg.availability_s != 0:
            bound = cfg.availability_s if cfg.availability_s else bound_for(self)
            self.availability = AvailabilityCheck(self, bound)
        self.run_until(cfg.duration_s)
        self.ops_left = 0
        self.faults.heal_everything()
        self.run_until(self.now + cfg.client_deadline_s + 0.5, stop=self._clients_idle)
        self.run_until(self.now + cfg.quiesce_s_max, stop=self._converged)
        self.let_keys_expire()
        problem = self._convergence_problem()
        if problem:
            return self._result(False, "liveness", problem)
        self._final_reads()
        # a request a broker held (no leader then) may still land after the final reads
        self.run_until(self.now + cfg.quiesce_s_max, stop=self._converged)
        self._check_acked_writes()
        self._check_states_equal()
        if self.ttl_clients:
            check_ttl(self, self.ttl_clients)
        res = check(self.history)
        if not res.ok:
            kind = "unknown" if res.unknown else "linearizability"
            return self._result(res.unknown, kind, res.explanation)
        return self._result(True, "ok", "")

    def let_keys_expire(self) -> None:
        """With TTL clients: every key expires and the sweep ends, then quiescence."""
        if self.ttl_clients:
            self.run_until(self.now + max(TTLS_S) + 0.5)
            self.run_until(self.now + self.cfg.quiesce_s_max, stop=self._converged)

    def _clients_idle(self) -> bool:
        return all(c.idle for c in self.clients) and all(c.idle for c in self.ttl_clients)

    def leader(self, shard: int = 0) -> SimNode | None:
        best = None
        for nid in self.shard_nodes[shard]:
            node = self.nodes[nid]
            core = node.core
            if core is not None and core.role is Role.LEADER and (
                best is None or core.term > best.core.term  # type: ignore[union-attr]
            ):
                best = node
        return best

    def _converged(self) -> bool:
        return not self._convergence_problem()

    def _convergence_problem(self) -> str:
        ch = self.operator.change
        if ch is not None:
            return (f"the operator's {ch.kind} {ch.old} {ch.new} (started at "
                    f"{ch.started:.2f}s) has not taken effect after healing everything")
        for shard, ids in self.shard_nodes.items():
            leader = self.leader(shard)
            if leader is None or leader.core is None:
                return f"no leader of shard {shard} after healing everything"
            lc = leader.core
            if lc.commit_index < lc.last_index or lc.term_at(lc.commit_index) != lc.term:
                return f"leader {leader.id} has not committed its log ({lc.commit_index}/{lc.last_index})"
            for nid in ids:
                applied = self.nodes[nid].state.applied_index
                if applied != lc.last_index:
                    return (
                        f"{nid} applied {applied}, leader {leader.id} at {lc.last_index} "
                        f"(term {lc.term}) after healing everything"
                    )
            problem = self.configs.convergence_problem(shard, leader)
            if problem:
                return problem
        return ""

    def _final_reads(self) -> None:
        """Read every key through the normal path so a lost write shows in the history."""
        client = self.clients[0]
        for k in range(self.cfg.keys):
            client.seq += 1
            client.start("get", f"k{k}")
            self.run_until(self.now + self.cfg.client_deadline_s + 0.5, stop=self._clients_idle)

    def _check_acked_writes(self) -> None:
        applied_cmds = set()
        for _, data in self.committed.values():
            cmd = decode_command(data)
            if not isinstance(cmd, Noop):
                applied_cmds.add((getattr(cmd, "client_id", b""), getattr(cmd, "request_id", 0)))
        for client, seq, op, key, result in self.acked:
            if op != "get" and (client, seq) not in applied_cmds:
                self.violation(f"acknowledged {op} {client!r}#{seq} on {key} -> {result} is not in the log")

    def _check_states_equal(self) -> None:
        for ids in self.shard_nodes.values():
            states = [self.nodes[n].state for n in ids]
            if any(st != states[0] for st in states):
                applied = {n: (self.nodes[n].state.applied_index, self.nodes[n].state.key_count)
                           for n in ids}
                self.violation(f"replicas differ at quiescence: {applied}")

    def _result(self, ok: bool, kind: str, message: str) -> SimResult:
        return SimResult(self.cfg.seed, ok, kind, message, self.stats(), self.format_trace())

    def stats(self) -> dict[str, Any]:
        ops = self.history.operations()
        by_status: dict[str, int] = {}
        for op in ops:
            by_status[op.status] = by_status.get(op.status, 0) + 1
        return {
            "sim_s": round(self.now, 2),
            "events": self.events,
            "ops": by_status,
            "terms": len(self.leaders_by_term),
            "committed": len(self.committed),
            "campaigns": self.broker.campaigns,
            "down_s_max": round(self.availability.down_s_max, 2) if self.availability else None,
            "net": self.net.stats,
            "disk": dict(sorted(self.disk_events.items())),
            "faults": list(self.faults_log),
            "membership": dict(sorted((self.configs.stats + self.operator.stats).items())),
            "promote_lag_max": self.promote_lag_max,
            **(ttl_stats(self.ttl_clients) if self.ttl_clients else {}),
        }

    def format_trace(self, last: int = 80) -> list[str]:
        return [f"{t:9.4f} {what:>20} {_short(msg)}" for t, what, msg in list(self.trace)[-last:]]


def _cmd(data: bytes) -> Any:
    try:
        return decode_command(data)
    except RemoteProtocolError:
        return data


def _short(msg: Any) -> str:
    text = repr(msg)
    return text if len(text) < 200 else text[:197] + "..."


def run_seed(seed: int, **overrides: Any) -> SimResult:
    """Run one seed; never raises: a violation or a core exception becomes the result.

    Every fourth seed runs a 5-replica group (quorum 3) instead of 3."""
    overrides.setdefault("nodes", 5 if seed % 4 == 3 else 3)
    world: World | None = None
    try:
        world = World(SimConfig(seed=seed, **overrides))
        return world.run()
    except Violation as exc:
        if world is None:
            raise
        return world._result(False, "violation", str(exc))
    except Exception:  # noqa: BLE001 - a core crash is a finding, not a harness error
        text = traceback.format_exc()
        if world is None:
            return SimResult(seed, False, "crash", text)
        return world._result(False, "crash", f"t={world.now:.3f}s: exception\n{text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="replay one simulation seed")
    parser.add_argument("seed", type=int)
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--trace", type=int, default=80, help="trace lines to print")
    args = parser.parse_args(argv)
    res = run_seed(args.seed, fsync=args.fsync)
    print(res.summary())
    for k, v in res.stats.items():
        print(f"  {k}: {v}")
    if not res.ok:
        print(res.message)
        print("--- last events ---")
        print("\n".join(res.trace[-args.trace :]))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
