"""SimBroker: the broker's failure detector and router, as the simulation needs them.

It knows the nodes only through heartbeats that crossed the simulated network (so a
partition between a node and the broker makes that node look dead). Rules, as in the
real broker: the leader is the live node claiming LEADER with the highest term; live =
a heartbeat within ``3 x heartbeat``. When no live leader was seen for an election
timeout, ask the most up-to-date live follower (last log term, then last index) to
campaign, at most once per election timeout; if the same node was asked last time and
no leader came of it, ask the next best, so one unelectable node cannot stall the shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zkv.protocol.messages import Role

if TYPE_CHECKING:
    from tests.sim.cluster import World

ADDR = "broker"
LIVENESS_HEARTBEATS = 3


class SimBroker:
    def __init__(self, world: World) -> None:
        self.world = world
        self.table: dict[str, tuple[float, tuple[Any, ...]]] = {}
        self.last_leader_seen = 0.0
        self.last_campaign_at = -1e9
        self.last_campaign_to = ""
        self.campaigns = 0
        self._hb_s = world.cfg.heartbeat_ms / 1000
        self._election_s = world.cfg.election_timeout_ms / 1000
        world.at(self._hb_s, self._check)

    def deliver(self, src: str, msg: Any) -> None:
        if isinstance(msg, tuple) and msg[0] == "hb":
            self.table[msg[1]] = (self.world.now, msg)

    def live(self) -> list[tuple[Any, ...]]:
        horizon = self.world.now - LIVENESS_HEARTBEATS * self._hb_s
        return [hb for at, hb in self.table.values() if at >= horizon]

    def leader(self) -> str:
        best = ("", -1)
        for hb in self.live():
            if hb[2] == Role.LEADER and hb[3] > best[1]:
                best = (hb[1], hb[3])
        return best[0]

    def _check(self) -> None:
        w = self.world
        w.at(w.now + self._hb_s, self._check)
        if self.leader():
            self.last_leader_seen = w.now
            return
        if w.now - self.last_leader_seen < self._election_s:
            return
        if w.now - self.last_campaign_at < self._election_s:
            return
        followers = [hb for hb in self.live() if hb[2] != Role.LEADER]
        if not followers:
            return
        followers.sort(key=lambda hb: (hb[5], hb[6], hb[1]), reverse=True)
        pick = followers[0]
        if pick[1] == self.last_campaign_to and len(followers) > 1:
            pick = followers[1]
        term = max(hb[3] for _, hb in self.table.values())
        self.last_campaign_at = w.now
        self.last_campaign_to = pick[1]
        self.campaigns += 1
        w.net.send(ADDR, pick[1], ("campaign", term), w.now)
