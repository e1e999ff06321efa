"""The broker's view of the cluster, built only from storage-node heartbeats.

Theory of operation:

- Every node publishes a ``Heartbeat`` every ``heartbeat_ms``. The table keeps, per node,
  its latest heartbeat and the (monotonic) time it was received. Nothing else feeds it,
  so a restarted broker knows everything again after a few heartbeats.
- A node is *live* while ``now - last_seen < election_timeout``.
- The leader of a shard is the live node claiming ``Role.LEADER`` with the highest term
  (a stale claim at a lower term loses; equal terms, which Raft forbids, go to the lower
  node id so every broker decides alike).
- The ring config is the one with the highest ``ring_epoch`` ever seen, in a heartbeat
  or in a node's ``Redirect`` (``adopt_ring``); the ``Ring`` is rebuilt only when the
  epoch rises. Configs too large to build quickly are refused.
- Nodes silent for ``forget_after`` (default 30 x election timeout) are dropped.
- The hot-path maps ``leaders`` (shard -> node identity bytes) and ``replicas``
  (shard -> identities of live nodes) are mutated in place so the router can hold them.
  They are refreshed on every heartbeat of the shard and on every ``tick``.

Pure: no clock reads, no sockets; ``now`` is monotonic seconds passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zkv.protocol.limits import NODE_ID_BYTES_MAX, RING_TOKENS_MAX
from zkv.protocol.messages import Heartbeat, Role
from zkv.protocol.ring import Ring, RingConfig

#: Bound on the table: heartbeats from more distinct nodes than this are ignored.
#: (Node ids are zmq routing ids: 1..``NODE_ID_BYTES_MAX`` bytes, no leading zero byte.)
NODES_MAX = 4096


@dataclass(slots=True)
class NodeRecord:
    heartbeat: Heartbeat
    ident: bytes
    last_seen: float


@dataclass(slots=True)
class ShardView:
    """What the broker knows of one shard (recomputed from its nodes' records)."""

    shard_id: int
    first_heard: float
    leader_id: str | None = None
    leader_term: int = 0
    #: Receive time of the last heartbeat of a live leader; None if never seen one.
    leader_last_seen: float | None = None
    #: The node whose claim that was (kept when the shard loses its leader).
    last_leader_id: str | None = None
    max_term: int = 0
    members: tuple[str, ...] = ()
    node_ids: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class LeaderChange:
    shard_id: int
    leader_id: str  # "" when the shard lost its leader
    term: int


@dataclass(frozen=True, slots=True)
class RingAdopted:
    config: RingConfig


@dataclass(frozen=True, slots=True)
class HeartbeatRefused:
    node_id: str
    reason: str


TableEvent = LeaderChange | RingAdopted | HeartbeatRefused


class NodeTable:
    """Per-node latest heartbeats, liveness, leaders, live replicas and the ring."""

    def __init__(
        self,
        election_timeout_s: float,
        forget_after_s: float | None = None,
        nodes_max: int = NODES_MAX,
    ) -> None:
        if election_timeout_s <= 0:
            raise ValueError("election_timeout_s must be > 0")
        self.election_timeout_s = election_timeout_s
        self.forget_after_s = (
            forget_after_s if forget_after_s is not None else 30 * election_timeout_s
        )
        self.nodes_max = nodes_max
        self.nodes: dict[str, NodeRecord] = {}
        self.shards: dict[int, ShardView] = {}
        self.ring: Ring | None = None
        #: shard -> identity of its live leader (mutated in place; the router holds it).
        self.leaders: dict[int, bytes] = {}
        #: shard -> identities of its live nodes, for STALE reads.
        self.replicas: dict[int, tuple[bytes, ...]] = {}
        self._events: list[TableEvent] = []

    # ------------------------------------------------------------------ input

    def observe(self, hb: Heartbeat, now: float) -> bool:
        """Record a heartbeat received at ``now``. Returns False if it was refused."""
        reason = self._refusal(hb)
        if reason:
            self._events.append(HeartbeatRefused(hb.node_id[:64], reason))
            return False
        rec = self.nodes.get(hb.node_id)
        if rec is None:
            rec = NodeRecord(hb, hb.node_id.encode(), now)
            self.nodes[hb.node_id] = rec
        else:
            old_shard = rec.heartbeat.shard_id
            rec.heartbeat = hb
            rec.last_seen = now
            if old_shard != hb.shard_id:  # a node id reused for another shard
                self._detach(hb.node_id, old_shard, now)
        view = self.shards.get(hb.shard_id)
        if view is None:
            view = self.shards[hb.shard_id] = ShardView(hb.shard_id, first_heard=now)
        view.node_ids.add(hb.node_id)
        self._adopt_ring(hb)
        self._recompute(view, now)
        return True

    def adopt_ring(self, config: RingConfig) -> bool:
        """Adopt ``config`` if its epoch is above the current ring's; True if adopted.

        Heartbeats and a refusing node's ``Redirect`` both carry a node's ring; either may
        be the first to bring a newer epoch, and a lower or equal one never replaces what
        we have (a lagging node cannot roll the broker back). A config without shards or
        vnodes (a node with no ring yet) or over ``RING_TOKENS_MAX`` is refused.
        """
        if self.ring is not None and config.epoch <= self.ring.config.epoch:
            return False
        shards = tuple(sorted(set(config.shards)))
        if not shards or config.vnodes < 1 or len(shards) * config.vnodes > RING_TOKENS_MAX:
            return False
        config = RingConfig(config.epoch, shards, config.vnodes)
        self.ring = Ring(config)
        self._events.append(RingAdopted(config))
        return True

    def tick(self, now: float) -> list[TableEvent]:
        """Expire liveness, forget long-silent nodes; return events since the last tick."""
        for node_id in [n for n, r in self.nodes.items() if now - r.last_seen > self.forget_after_s]:
            rec = self.nodes.pop(node_id)
            self._detach(node_id, rec.heartbeat.shard_id, now)
        for view in self.shards.values():
            self._recompute(view, now)
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ queries

    def is_live(self, node_id: str, now: float) -> bool:
        rec = self.nodes.get(node_id)
        return rec is not None and now - rec.last_seen < self.election_timeout_s

    def live_nodes(self, shard_id: int, now: float) -> list[NodeRecord]:
        view = self.shards.get(shard_id)
        if view is None:
            return []
        timeout = self.election_timeout_s
        recs = (self.nodes[n] for n in sorted(view.node_ids))
        return [r for r in recs if now - r.last_seen < timeout]

    def leader_of(self, shard_id: int) -> str | None:
        view = self.shards.get(shard_id)
        return view.leader_id if view is not None else None

    def ring_config(self) -> RingConfig | None:
        return self.ring.config if self.ring is not None else None

    def status_rows(self, now: float) -> list[dict[str, Any]]:
        """One dict per known node: its heartbeat fields plus ``age_ms`` and ``live``."""
        rows = []
        for rec in sorted(self.nodes.values(), key=lambda r: (r.heartbeat.shard_id, r.heartbeat.node_id)):
            hb = rec.heartbeat
            age_s = now - rec.last_seen
            rows.append(
                {
                    "node_id": hb.node_id,
                    "shard_id": hb.shard_id,
                    "role": int(hb.role),
                    "role_name": hb.role.name,
                    "term": hb.term,
                    "leader_id": hb.leader_id,
                    "last_log_term": hb.last_log_term,
                    "last_index": hb.last_index,
                    "commit_index": hb.commit_index,
                    "applied_index": hb.applied_index,
                    "key_count": hb.key_count,
                    "pid": hb.pid,
                    "peer_addr": hb.peer_addr,
                    "members": list(hb.members),
                    "ring_epoch": hb.ring.epoch,
                    "ring": hb.ring.to_wire(),
                    "heartbeat_ms": hb.heartbeat_ms,
                    "extra": dict(hb.extra),
                    "age_ms": max(0, int(age_s * 1000)),
                    "live": age_s < self.election_timeout_s,
                }
            )
        return rows

    # ------------------------------------------------------------------ internals

    def _refusal(self, hb: Heartbeat) -> str:
        node_id = hb.node_id
        if not node_id or node_id[0] == "\x00":
            return "empty node id or leading NUL (not a valid zmq identity)"
        if len(node_id.encode()) > NODE_ID_BYTES_MAX:
            return "node id longer than 255 bytes"
        if node_id not in self.nodes and len(self.nodes) >= self.nodes_max:
            return f"node table full ({self.nodes_max} nodes)"
        return ""

    def _adopt_ring(self, hb: Heartbeat) -> None:
        # Nearly every heartbeat repeats the ring we have: decide that before building
        # a RingConfig for it.
        if self.ring is not None and hb.ring.epoch <= self.ring.config.epoch:
            return
        self.adopt_ring(hb.ring)

    def _detach(self, node_id: str, shard_id: int, now: float) -> None:
        view = self.shards.get(shard_id)
        if view is None:
            return
        view.node_ids.discard(node_id)
        if not view.node_ids:
            del self.shards[shard_id]
            self.leaders.pop(shard_id, None)
            self.replicas.pop(shard_id, None)
            if view.leader_id is not None:
                self._events.append(LeaderChange(shard_id, "", view.leader_term))
        else:
            self._recompute(view, now)

    def _recompute(self, view: ShardView, now: float) -> None:
        timeout = self.election_timeout_s
        best: NodeRecord | None = None
        live: list[bytes] = []
        max_term = 0
        members: tuple[str, ...] = ()
        for node_id in sorted(view.node_ids):
            rec = self.nodes[node_id]
            hb = rec.heartbeat
            if hb.term > max_term:
                max_term = hb.term
            if now - rec.last_seen >= timeout:
                continue
            live.append(rec.ident)
            if len(hb.members) > len(members):
                members = hb.members
            if hb.role == Role.LEADER and (best is None or hb.term > best.heartbeat.term):
                best = rec
        view.max_term = max_term
        # the leader's configuration is the shard's (membership changes go through its
        # log); without one, the largest heard
        view.members = best.heartbeat.members if best is not None else members
        sid = view.shard_id
        if live:
            self.replicas[sid] = tuple(live)
        else:
            self.replicas.pop(sid, None)
        old = (view.leader_id, view.leader_term)
        if best is None:
            view.leader_id = None
            self.leaders.pop(sid, None)
        else:
            view.leader_id = best.heartbeat.node_id
            view.leader_term = best.heartbeat.term
            view.leader_last_seen = best.last_seen
            view.last_leader_id = view.leader_id
            self.leaders[sid] = best.ident
        if (view.leader_id, view.leader_term) != old:
            self._events.append(LeaderChange(sid, view.leader_id or "", view.leader_term))
