"""What every peer connection says about itself, and what to do when it reached the wrong node.

A node's DEALER to a peer dials an address, and an address can go stale: a container
came back elsewhere and another node (of this shard, another shard or another cluster)
now answers there. Raft traffic that lands on the wrong node used to be ignored in
silence (the replica drops non-members' messages), so the sender kept talking into the
void and its shard could stay without a quorum with nothing in any log. Now:

- Each peer connection **announces** in its ZMTP handshake (a ``ZMQ_METADATA``
  property, so nothing is added to any message) who dials (node id, shard, cluster id,
  incarnation of its data dir) and whom it means to reach. The receiving node reads it
  off every message's frame at the cost of one C call.
- A connection meant for another node, or coming from another cluster, is **refused
  loudly**: its traffic is dropped, the receiving node logs why (rate-limited), and it
  answers on that same connection with ``WrongNode`` (who it really is).
- The dialing node, told ``WrongNode``, logs the stale address and **redials** (a new
  socket resolves the peer's name again), at most once per ``REDIAL_INTERVAL_S``.

Under Curve the key already proves the sender (``node_core``); the announcement adds the
intended target and the cluster, which a key does not say. A new incarnation of a peer
(same node id, new data dir) takes over the old connection through ``ROUTER_HANDOVER``.
Pure: no sockets, the caller passes the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from zkv.protocol import codec
from zkv.protocol.messages import WrongNode

if TYPE_CHECKING:
    from zkv.storage_node.node_requests import NodeCoreConfig
    from zkv.storage_node.replica import Replica

#: the ZMTP metadata property (``X-`` names are the application's)
PROPERTY = "X-Zkv-Peer"
#: at most one redial of a peer per this many seconds (a literal IP that stays wrong
#: would otherwise make a redial loop)
REDIAL_INTERVAL_S = 1.0
_SEP = "|"
#: distinct announcements whose verdict a node remembers (a few per peer; cleared when full)
LINK_VERDICTS_MAX = 1024


@dataclass(frozen=True, slots=True)
class Announcement:
    """Who dials (``sender``, ``shard``, ``cluster_id``, ``incarnation``) and whom it
    means to reach (``to``). Empty strings are unknowns (a node still founding its
    cluster knows no cluster id)."""

    sender: str
    to: str
    shard: int
    cluster_id: str
    incarnation: str

    def option(self) -> bytes:
        """The ``ZMQ_METADATA`` socket option value that announces this."""
        fields = (self.sender, self.to, str(self.shard), self.cluster_id, self.incarnation)
        if any(_SEP in f for f in fields):
            raise ValueError(f"a peer announcement field contains {_SEP!r}: {fields}")
        return f"{PROPERTY}:{_SEP.join(fields)}".encode()

    @classmethod
    def parse(cls, value: str | None) -> Announcement | None:
        """The property's value as received; None if absent or not ours (an older
        node announces nothing: it is let through as before)."""
        if not value:
            return None
        parts = value.split(_SEP)
        if len(parts) != 5 or not parts[2].lstrip("-").isdigit():
            return None
        return cls(parts[0], parts[1], int(parts[2]), parts[3], parts[4])


def refusal(announced: Announcement | None, node_id: str, cluster_id: str) -> str | None:
    """Why this node (``node_id`` of ``cluster_id``) must refuse a connection that
    announced ``announced``; None to take its traffic."""
    if announced is None:
        return None
    if announced.to and announced.to != node_id:
        return (f"{announced.sender} (shard {announced.shard}) dialed {announced.to} but "
                f"reached {node_id}: its address for {announced.to} is stale")
    if announced.cluster_id and cluster_id and announced.cluster_id != cluster_id:
        return (f"{announced.sender} is a node of cluster {announced.cluster_id}, this is "
                f"cluster {cluster_id}")
    return None


class Redials:
    """When to redial a peer that turned out to be the wrong node: at most once per
    ``interval`` per peer."""

    def __init__(self, interval: float = REDIAL_INTERVAL_S) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def due(self, peer: str, now: float) -> bool:
        last = self._last.get(peer)
        if last is not None and now - last < self.interval:
            return False
        self._last[peer] = now
        return True


class PeerLinks:
    """The node core's side: refuse a misrouted connection, redial on ``WrongNode``. A
    mixin of ``NodeCore`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: NodeCoreConfig
        replica: Replica
        misrouted: int
        notes: list[str]
        redials: Redials
        _link_verdicts: dict[str, str | None]
        _direct: list[tuple[object, tuple[bytes, ...]]]

    def _refuse_link(self, origin: object, ident: bytes, announced: str, now: float) -> bool:
        """Whether a connection's announcement says it reached the wrong node; if so,
        answer ``WrongNode`` on it and say why (first ten times, then every hundredth).
        Verdicts are cached per announcement: every message of a connection repeats it."""
        cache = self._link_verdicts
        if announced in cache:
            reason = cache[announced]
        else:
            if len(cache) >= LINK_VERDICTS_MAX:
                cache.clear()
            reason = cache[announced] = refusal(
                Announcement.parse(announced), self.config.node_id,
                self.config.cluster_id)
        if reason is None:
            return False
        self.misrouted += 1
        if self.misrouted <= 10 or self.misrouted % 100 == 0:
            self.notes.append(f"refused peer connection #{self.misrouted}: {reason}")
        self._direct.append((origin, (ident, *codec.encode(WrongNode(
            self.config.node_id, self.config.shard_id, self.config.cluster_id, reason)))))
        return True

    def vouch_for(self, sender: str, announced: str) -> None:
        """``sender``'s connection (``announced``: not refused) says it is a node of
        this shard and cluster dialing us: the replica hears it like a member even while
        our configuration does not name it (``Replica.step``: we lagged behind the
        change that added it, maybe our new leader or the candidate that must win)."""
        if sender in self.replica.vouched:
            return
        a = Announcement.parse(announced)
        cfg = self.config
        if (a is not None and a.sender == sender and a.to == cfg.node_id
                and a.shard == cfg.shard_id and a.cluster_id and a.cluster_id == cfg.cluster_id):
            self.replica.vouch(sender)

    def on_wrong_node(self, peer: str, msg: WrongNode, now: float) -> bool:
        """A peer's answer that our connection to ``peer`` reached ``msg.node_id``
        instead: say so; True when the shell should redial (rate-limited)."""
        due = self.redials.due(peer, now)
        if due:
            self.notes.append(f"our connection to {peer} reached {msg.node_id} (shard "
                              f"{msg.shard_id}, cluster {msg.cluster_id!r}): {msg.reason}; "
                              f"redialing {peer}")
        return due
