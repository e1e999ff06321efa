"""The membership nemesis: an operator changing a shard's replicas under the fault plan
(issue 11), the way ``zkv admin add-replica / remove-replica / replace-replica
--data-dir`` does it (``ops/membership.py``).

One change at a time, drawn from the seed (``World.operator_rng``) every 0.5-3 s of the
fault window, each one carried to its end:

- *add*: the supervisor starts a new node (``World.add_node``: an empty data dir, no
  ``--bootstrap``, the spec's members as ``--peers``: a waiting non-voter), then
  ``AdminAddReplica``; done once the leader reports it a voter with nothing pending.
  The leader promotes it by the real rule (``replica_membership.py``: once within
  ``promote_lag_max`` entries, which the seed draws small so that catching up matters);
- *remove*: ``AdminRemoveReplica`` of a voter, the leader itself ``LEADER_P`` of the
  time (it must commit its removal, hand over and step down); done once the leader's
  configuration no longer names it; then the supervisor stops it for good
  (``World.retire_node``);
- *replace*: a new node as for *add*, then ``AdminReplaceReplica`` (the leader itself
  as the old node ``LEADER_P`` of the time): the new node is a learner, promoted once
  caught up, then the leader removes the old one; done, and the old one stopped, once
  the new one votes and the old one is gone.

Each request is the real admin message, sent to the broker, which routes it to the
shard's leader, whose node core proposes the change (``admin_requests.py``). As with the
SDK, an unanswered request is sent again with the same request id (each op is
idempotent) and ``NOT_LEADER``/``NO_LEADER``/``UNAVAILABLE`` are retried after a short
backoff; so is a change refused because another is in flight or the leader has not
committed an entry of its term yet (counted in ``stats`` as ``refused: ...``). Then the
operator polls ``AdminMembers`` every ``POLL_S``, as ``ops/membership._wait`` does, and
asks again for a change that is neither made, pending nor under way: it was lost with
the leader that proposed it (counted as ``asked again``).

A careful operator: the shard keeps ``VOTERS_MIN``-``VOTERS_MAX`` voters, and a change
is made only if the voters it heads for keep a majority that is whole and votes
(``World.short``: a node whose disk was lost and is not re-admitted yet does not, nor a
new node before its promotion); the faults that cost a node its state (``faults.py``)
stay within that minority of every configuration, the one a change heads for included
(``target_voters``). More would leave a shard that can never elect or commit again,
which no membership rule can undo. Why a new node counts as short even for an add:
a node restarting with no configuration in its log or snapshot takes its ``--peers``,
which name the node being added, as its configuration (``World.spec_members``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tests.sim.node import SimNode
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode, RemoteProtocolError
from zkv.protocol.messages import (
    AdminAddReplica,
    AdminMembers,
    AdminMembersReply,
    AdminRemoveReplica,
    AdminReplaceReplica,
    AdminRequest,
    ErrorReply,
)

if TYPE_CHECKING:
    from tests.sim.cluster import SimConfig, World
    from zkv.protocol.ring import RingConfig

ADDR = "operator"
#: ``ops/membership.POLL_S``
POLL_S = 0.2
#: an unanswered request is sent again after this long (simulated)
ATTEMPT_S = 1.0
BACKOFF_S = 0.1
#: the share of removals and replacements aimed at the leader itself
LEADER_P = 0.4
VOTERS_MIN, VOTERS_MAX = 3, 5
RETRY = frozenset({ErrorCode.NOT_LEADER, ErrorCode.NO_LEADER, ErrorCode.UNAVAILABLE})
#: ``promote_lag_max`` drawn per seed: the logs of a run are far shorter than the
#: production 1000 entries, so a small lag is what makes a learner catch up first
PROMOTE_LAGS = (0, 5, 30, 1000)


@dataclass(slots=True)
class Change:
    kind: str  # add | remove | replace
    shard: int
    old: str
    new: str
    #: the voters once done (the careful operator's plan; ``faults._may_lose``)
    target: frozenset[str]
    started: float
    asked: bool = False  # the change request was answered; now polling


class Operator:
    def __init__(self, world: World, rng: random.Random) -> None:
        self.w = world
        self.rng = rng
        self.client_id = ADDR.encode()
        self.change: Change | None = None
        self.until = 0.0
        self.rid = 0
        #: the request last sent, the request id whose answer we wait for (0: none),
        #: and a count of attempts (a timer acts only for the attempt it was set for)
        self._req: Any = None
        self._waiting = 0
        self._attempt = 0
        self.stats: Counter[str] = Counter()
        world.endpoints[ADDR] = self

    @property
    def idle(self) -> bool:
        return self.change is None

    def plan(self, until: float) -> None:
        """Start changes from 0.5-4 s on, one at a time, none after ``until``."""
        self.until = until
        w = self.w
        w.at(self.rng.uniform(0.5, 4.0), self._next)

    def target_voters(self, shard: int) -> frozenset[str] | None:
        ch = self.change
        return ch.target if ch is not None and ch.shard == shard else None

    # ------------------------------------------------------------------ choosing

    def _keeps_majority(self, voters: set[str]) -> bool:
        """A majority of ``voters`` is whole and votes (``World.short``)."""
        short = sum(1 for n in voters if self.w.short(n))
        return short <= (len(voters) - 1) // 2

    def _next(self) -> None:
        w, rng = self.w, self.rng
        if self.change is not None or w.now >= self.until:
            return
        shard = rng.choice(sorted(w.shard_nodes))
        voters = set(w.shard_nodes[shard])  # between changes every member votes
        leader = w.leader(shard)
        removable = sorted(n for n in voters if len(voters) > VOTERS_MIN
                           and self._keeps_majority(voters - {n}))
        # a new node counts for nothing until promoted, and a node restarting with no
        # configuration in its log or snapshot takes --peers, which name the new node,
        # as its configuration: the voters with it must keep a majority that votes
        # (with one of 3 short, 2 of 4 would not)
        grows = self._keeps_majority(voters | {""})
        addable = len(voters) < VOTERS_MAX and grows
        replaceable = sorted(n for n in voters
                             if grows and self._keeps_majority(voters - {n} | {""}))
        kinds = [k for k, ok in (("add", addable), ("remove", removable),
                                 ("replace", replaceable)) if ok]
        if not kinds:
            self.stats["skipped: no safe change"] += 1
            w.at(w.now + rng.uniform(0.5, 3.0), self._next)
            return
        kind = rng.choice(kinds)
        old = new = ""
        if kind != "add":
            pool = removable if kind == "remove" else replaceable
            lead = leader.id if leader is not None else ""
            old = lead if lead in pool and rng.random() < LEADER_P else rng.choice(pool)
        if kind != "remove":
            new = w.add_node(shard).id  # the supervisor starts it first
        target = (voters - {old}) | ({new} if new else set())
        self.change = Change(kind, shard, old, new, frozenset(target), w.now)
        self.stats[f"{kind} started"] += 1
        if old and leader is not None and old == leader.id:
            self.stats[f"{kind} started on the leader"] += 1
        w.trace.append((w.now, "OPERATOR", (kind, shard, old, new)))
        w.faults_log.append(f"{w.now:.2f}s operator: {kind} {old} {new}".rstrip())
        self._ask()

    # ------------------------------------------------------------------ requests

    def _request(self, ch: Change) -> AdminRequest:
        cid, rid = self.client_id, self.rid
        if ch.kind == "add":
            return AdminAddReplica(cid, rid, ch.shard, ch.new, ch.new)
        if ch.kind == "remove":
            return AdminRemoveReplica(cid, rid, ch.shard, ch.old)
        return AdminReplaceReplica(cid, rid, ch.shard, ch.old, ch.new, ch.new)

    def _ask(self) -> None:
        """The change request, with a new request id (retries keep it)."""
        ch = self.change
        if ch is None:
            return
        self.rid += 1
        self._send(self._request(ch))

    def _poll(self) -> None:
        ch = self.change
        if ch is None:
            return
        self.rid += 1
        self._send(AdminMembers(self.client_id, self.rid, ch.shard))

    def _send(self, req: Any) -> None:
        w = self.w
        self._req, self._waiting = req, req.request_id
        self._attempt += 1
        w.net.send(ADDR, w.brokers[0], codec.encode(req), w.now)
        w.at(w.now + ATTEMPT_S, self._unanswered, self._attempt)

    def _unanswered(self, attempt: int) -> None:
        if attempt == self._attempt and self._waiting:
            self.stats["requests unanswered"] += 1
            self._send(self._req)

    def _again(self, attempt: int) -> None:
        if attempt == self._attempt:
            self._send(self._req)

    def deliver(self, src: str, frames: list[bytes]) -> None:
        w = self.w
        try:
            msg = codec.decode(frames)
        except RemoteProtocolError:
            w.violation(f"{ADDR} got undecodable frames from {src}")
            return
        ch = self.change
        if ch is None or not self._waiting or getattr(msg, "request_id", None) != self._waiting:
            return  # a late or duplicated answer
        self._waiting = 0  # answered: the attempt's timer lapses
        if type(msg) is ErrorReply:
            self._refused(ch, msg)
        elif type(msg) is AdminMembersReply:
            self._answered(ch, msg)
        else:
            w.violation(f"{ADDR}: unexpected answer {msg!r}")

    def _refused(self, ch: Change, msg: ErrorReply) -> None:
        """No leader, not the leader, or a change the rules refuse for now: again after a
        backoff, with the same request id."""
        w = self.w
        if msg.code == ErrorCode.UNAVAILABLE and "retry" in msg.message:
            self.stats[f"refused: {msg.message.split(';')[0]}"] += 1
        elif msg.code not in RETRY:
            w.violation(f"{ADDR}: {ch.kind} {ch.old} {ch.new} refused: {msg}")
        self._attempt += 1
        w.at(w.now + BACKOFF_S, self._again, self._attempt)

    def _answered(self, ch: Change, m: AdminMembersReply) -> None:
        w = self.w
        if type(self._req) is not AdminMembers:  # the change request's answer
            ch.asked = True
            if m.index:
                self.stats[f"{ch.kind} proposed"] += 1
            w.at(w.now + POLL_S, self._poll)
            return
        members = set(m.voters) | set(m.learners)
        if ch.kind == "add":
            done, under_way = ch.new in m.voters, ch.new in members
        elif ch.kind == "remove":
            done, under_way = ch.old not in members, False
        else:
            done = ch.new in m.voters and ch.old not in members
            under_way = ch.new in members and m.replaces.get(ch.new) == ch.old
        if not done and not m.pending and not under_way:
            # lost with the leader that proposed it (``ops/membership._wait``): again
            self.stats["asked again"] += 1
            w.at(w.now + POLL_S, self._ask)
            return
        if not done or m.pending:
            w.at(w.now + POLL_S, self._poll)
            return
        if ch.old:
            w.retire_node(ch.old)  # the supervisor stops it; its data dir stays
        self.stats[f"{ch.kind} done"] += 1
        self.stats["change seconds, longest"] = max(self.stats["change seconds, longest"],
                                                    round(w.now - ch.started))
        w.trace.append((w.now, "OPERATOR DONE", (ch.kind, ch.old, ch.new)))
        self.change = None
        w.at(w.now + self.rng.uniform(0.5, 3.0), self._next)


class Supervisor:
    """``World``'s part that runs the nodes the spec names (``zkv cluster up``'s
    supervisor and its ``cluster.json``: ``shard_nodes``), as the operator changes it."""

    if TYPE_CHECKING:
        cfg: SimConfig
        ring: RingConfig
        shard_nodes: dict[int, list[str]]
        nodes: dict[str, SimNode]
        retired: dict[str, SimNode]
        endpoints: dict[str, Any]
        node_ids: list[str]
        _node_list: list[SimNode]
        _next_replica: dict[int, int]
        trace: Any
        now: float

    def spec_members(self, node: SimNode) -> tuple[str, ...]:
        """A node's ``--peers`` and itself, as the supervisor starts it: the nodes of its
        shard in the spec (empty for a node the spec no longer names)."""
        ids = self.shard_nodes.get(node.shard_id, [])
        return tuple(ids) if node.id in ids else ()

    def add_node(self, shard: int) -> SimNode:
        """``spec_add_replica``: name a new node in the spec and start it (an empty data
        dir without --bootstrap: it waits as a non-voter until a leader promotes it)."""
        k = self._next_replica[shard]
        self._next_replica[shard] = k + 1
        nid = f"n{k}" if self.cfg.shards == 1 else f"s{shard}n{k}"
        self.shard_nodes[shard].append(nid)
        node = SimNode(self, nid, tuple(self.shard_nodes[shard]), shard, self.ring,
                       joining=True)
        self.nodes[nid] = self.endpoints[nid] = node
        self._nodes_changed()
        node.start()
        return node

    def retire_node(self, node_id: str) -> None:
        """``spec_remove_replica``: the supervisor stops a node the shard removed."""
        node = self.nodes.pop(node_id)
        if node.up:
            node.crash()
        self.retired[node_id] = node
        self.shard_nodes[node.shard_id].remove(node_id)
        self._nodes_changed()
        self.trace.append((self.now, "RETIRED", node_id))

    def short(self, node_id: str) -> bool:
        """Whether a node counts toward no majority: it lost state (a lost disk not yet
        re-admitted, a fault that may have cost it state), or it is new and not promoted
        yet, or it is gone ("": a node the operator is about to add)."""
        node = self.nodes.get(node_id)
        return node is None or not node.whole or node.at_risk or node.joining

    def _nodes_changed(self) -> None:
        self.node_ids = list(self.nodes)
        self._node_list = list(self.nodes.values())
