"""Decides when the broker asks a storage node to stand for election, and which nodes
it confirms hearing.

Theory of operation (elections are started by brokers, voted by nodes under Raft rules):

- A shard is *due* for an election when it has live nodes but no live leader and
  * it had a leader known to this broker whose last heartbeat is ``election_timeout`` old
    (when the leader's heartbeats stop, it stops being live at exactly that moment, so the
    campaign goes out at the first tick after), or
  * that leader is heard again, at its term or above, claiming no leadership: it stepped
    down (it lost its quorum, or no broker confirmed it). Asking at once costs nothing
    when the followers still hear it (they ignore the request until their lease runs
    out) and saves an election timeout when they stopped hearing it long ago. Unless it
    handed leadership over (heartbeat ``handed_to`` names a node we hear): its target
    is standing already, and a second candidate could only depose it (the transfer
    vote names no leader, so no lease protects it); if it does not win, the leader's
    silence makes the shard due an election timeout after its last claim, or
  * it never had a leader known to this broker, and either a majority of its members
    (``Heartbeat.members``) has been heard while none of them names a leader that might
    still lead (a fresh cluster elects at once, a 1-replica shard too; a name is stale
    when we hear that node and it does not claim to lead: a leader that stepped down
    because no broker heard it), or ``election_timeout`` has passed since the broker
    first heard the shard (a restarted broker first waits to hear the leader that the
    followers name).
- The request goes to the most up-to-date live member: highest
  ``(last_log_term, last_index)``, ties by node id. A member is a node the view's
  configuration names (the leader's; without one, the largest heard) or one that is a
  voter of the configuration it holds (heartbeat ``config_role``): without a leader,
  nodes may hold different configurations, a change having been under way. Never a node
  whose data dir may not vote, nor one outside the voters of its own configuration
  (removed, or a learner), nor one that is stopping (heartbeat ``leaving``): it would
  ignore the request. It carries the highest term the
  broker has seen in the shard; a node above that term, or hearing a live leader, ignores
  it, so a redundant request (several brokers, stale view) is harmless.
- While the shard stays leaderless, the request is repeated at most once per heartbeat
  interval; after ``tries_per_candidate`` unanswered tries the candidate is skipped in
  favour of the next best, so one stuck node cannot block the shard. When every live
  member has been skipped, the rotation starts again from the best.
- A leader appearing ends the episode and clears its state.

Confirmations (the availability rule, issue 10): every heartbeat interval the broker
sends ``Heard`` to each node whose latest heartbeat is under ``CONFIRM_HEARTBEATS``
intervals old. A leader that no broker confirms for an election timeout steps down
(``storage_node/node_core.py``), because only brokers start elections and followers
refuse to campaign while they hear a live leader: a leader the brokers cannot hear (or
cannot reach: our ``Heard`` never arrives) would otherwise block its shard for as long as
the cut lasts. Why a short window and not liveness (``election_timeout``): a leader whose
heartbeats stop is then unconfirmed within a few intervals, so it steps down about one
election timeout after the cut, its followers' lease on it runs out one more election
timeout later, and the campaigns this broker has been sending since succeed: the shard
serves again ~2 election timeouts after the cut. Three intervals tolerate two lost or
late heartbeats in a row; losing ten rounds of either message is what an election
timeout of silence means. The stepped-down leader is not asked to stand again while
the cut lasts: a broker that cannot hear it never picks it, and one that hears it but
cannot reach it skips it after ``tries_per_candidate`` unanswered tries (above).

Config relation: ``election_timeout_ms >= 3 x heartbeat_ms`` (ValueError otherwise), so
one or two lost heartbeats never look like a dead leader.

Pure: no clock, no sockets; ``now`` is monotonic seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zkv.broker.node_table import NodeRecord, NodeTable, ShardView
from zkv.protocol.messages import Campaign, Heard, Role
from zkv.protocol.timing import ELECTION_TIMEOUT_MS, HEARTBEAT_MS

TRIES_PER_CANDIDATE = 3
#: A node is confirmed (``Heard``) while its latest heartbeat is younger than this many
#: heartbeat intervals (see the module docstring).
CONFIRM_HEARTBEATS = 3


def check_timing(heartbeat_ms: int, election_timeout_ms: int) -> None:
    """Raise ValueError unless the heartbeat and election timeout fit together."""
    if heartbeat_ms <= 0:
        raise ValueError(f"heartbeat_ms must be > 0, got {heartbeat_ms}")
    if election_timeout_ms < 3 * heartbeat_ms:
        raise ValueError(
            f"election_timeout_ms ({election_timeout_ms}) must be >= 3 x heartbeat_ms "
            f"({heartbeat_ms}): a leader must be able to miss two heartbeats without "
            "being declared dead"
        )


@dataclass(frozen=True, slots=True)
class CampaignOrder:
    """Ask ``node_id`` (routing id ``ident``) to stand; ``reason`` is for the log."""

    node_id: str
    ident: bytes
    campaign: Campaign
    reason: str


@dataclass(frozen=True, slots=True)
class HeardOrder:
    """Tell ``node_id`` (routing id ``ident``) that this broker hears it."""

    node_id: str
    ident: bytes
    heard: Heard


@dataclass(slots=True)
class _Episode:
    """One leaderless stretch of a shard, from the first campaign to a leader."""

    candidate: str | None = None
    tries: int = 0
    last_sent: float | None = None
    skipped: set[str] = field(default_factory=set)


class FailureDetector:
    def __init__(
        self,
        broker_id: str,
        heartbeat_ms: int = HEARTBEAT_MS,
        election_timeout_ms: int = ELECTION_TIMEOUT_MS,
        tries_per_candidate: int = TRIES_PER_CANDIDATE,
    ) -> None:
        check_timing(heartbeat_ms, election_timeout_ms)
        if tries_per_candidate < 1:
            raise ValueError("tries_per_candidate must be >= 1")
        self.broker_id = broker_id
        self.heartbeat_s = heartbeat_ms / 1000
        self.election_timeout_s = election_timeout_ms / 1000
        self.tries_per_candidate = tries_per_candidate
        self._episodes: dict[int, _Episode] = {}

    def tick(self, table: NodeTable, now: float) -> list[CampaignOrder]:
        """Campaign requests to send now (call after ``table.tick(now)``)."""
        orders: list[CampaignOrder] = []
        for shard_id in [s for s in self._episodes if s not in table.shards]:
            del self._episodes[shard_id]
        for shard_id, view in table.shards.items():
            if view.leader_id is not None:
                self._episodes.pop(shard_id, None)
                continue
            live = table.live_nodes(shard_id, now)
            if not live:
                continue
            reason = self._due(view, live, now)
            if not reason:
                continue
            order = self._order(view, live, now, reason)
            if order is not None:
                orders.append(order)
        return orders

    def confirmations(self, table: NodeTable, now: float) -> list[HeardOrder]:
        """``Heard`` for every node heard within ``CONFIRM_HEARTBEATS`` intervals."""
        window_s = min(CONFIRM_HEARTBEATS * self.heartbeat_s, self.election_timeout_s)
        broker_id = self.broker_id
        return [
            HeardOrder(node_id, rec.ident, Heard(broker_id, rec.heartbeat.term))
            for node_id, rec in table.nodes.items()
            if now - rec.last_seen < window_s
        ]

    # ------------------------------------------------------------------ internals

    def _due(self, view: ShardView, live: list[NodeRecord], now: float) -> str:
        timeout = self.election_timeout_s
        if view.leader_last_seen is not None:
            if now - view.leader_last_seen >= timeout:
                return "leader silent"
            last = view.last_leader_id
            live_ids = {r.heartbeat.node_id for r in live}
            for r in live:
                hb = r.heartbeat
                if (hb.node_id == last and hb.role is not Role.LEADER
                        and hb.term >= view.leader_term and r.last_seen > view.leader_last_seen):
                    target = hb.extra.get("handed_to")
                    if isinstance(target, str) and target in live_ids:
                        return ""  # a handover: its target stands now ("leader silent" if not)
                    return "leader stepped down"
            return ""
        members = set(view.members)
        if members:
            heard = sum(1 for r in live if r.heartbeat.node_id in members)
            claims = {r.heartbeat.node_id: r.heartbeat.role is Role.LEADER for r in live}
            named = any(
                r.heartbeat.leader_id and claims.get(r.heartbeat.leader_id, True)
                for r in live
            )
            if heard >= len(members) // 2 + 1 and not named:
                return "new shard, majority heard"
        if now - view.first_heard >= timeout:
            return "no leader"
        return ""

    def _order(
        self, view: ShardView, live: list[NodeRecord], now: float, reason: str
    ) -> CampaignOrder | None:
        ep = self._episodes.get(view.shard_id)
        if ep is None:
            ep = self._episodes[view.shard_id] = _Episode()
        elif ep.last_sent is not None and now - ep.last_sent < self.heartbeat_s:
            return None
        members = set(view.members)
        # the view's members, and any node that is a voter of the configuration it holds:
        # with no leader, nodes may hold different ones (a change was under way) and the
        # view's (the largest heard) may name only nodes that cannot win
        pool = [r for r in live if r.heartbeat.node_id in members
                or r.heartbeat.extra.get("config_role") == "voter"] or live
        # a node whose data dir may not vote (storage_node/identity.py), or that is no
        # voter of its own configuration (removed, or a learner), would ignore us
        pool = [r for r in pool if r.heartbeat.extra.get("voter", True) is not False
                and r.heartbeat.extra.get("config_role", "voter") == "voter"
                and not r.heartbeat.extra.get("leaving")]  # stopping: it never stands
        if not pool:
            return None
        pool.sort(key=_rank)
        pick = self._pick(ep, [r.heartbeat.node_id for r in pool])
        rec = next(r for r in pool if r.heartbeat.node_id == pick)
        ep.last_sent = now
        campaign = Campaign(view.shard_id, view.max_term, self.broker_id)
        if ep.tries > 1:
            reason = f"{reason}, try {ep.tries}"
        return CampaignOrder(pick, rec.ident, campaign, reason)

    def _pick(self, ep: _Episode, ranked: list[str]) -> str:
        if ep.candidate is not None and ep.tries >= self.tries_per_candidate:
            ep.skipped.add(ep.candidate)
        choices = [n for n in ranked if n not in ep.skipped]
        if not choices:  # everyone had their tries: start the rotation again
            ep.skipped.clear()
            ep.candidate = None
            choices = ranked
        pick = choices[0]
        if pick == ep.candidate:
            ep.tries += 1
        else:
            ep.candidate = pick
            ep.tries = 1
        return pick


def _rank(rec: NodeRecord) -> tuple[int, int, str]:
    hb = rec.heartbeat
    return (-hb.last_log_term, -hb.last_index, hb.node_id)
