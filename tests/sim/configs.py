"""Configuration invariants of a simulated run (issue 11), checked after every step.

Membership changes go through the log (``storage_node/membership.py``: single-server
changes, at most one in flight). What every node's replica core holds of them must
agree, whatever the faults and the operator (``members.py``) do:

- *configurations match*: a configuration entry at (index, term) is the same on every
  node that holds it, in any incarnation;
- *single-server steps*: along any node's log (from its snapshot's configuration, when
  the snapshot carried one, through each configuration entry) and along the committed
  sequence, each configuration differs from the previous one by at most one voter;
- *one change at a time*: no log holds two configuration entries above the highest
  commit index any node of the shard has reached (a leader proposes a change only once
  the previous one is committed, and logs match up to any entry they share);
- *committed configurations agree*: the committed sequence is one per shard (the first
  application of each index, ``World.check_commit``, builds it), and each node's committed
  configuration (``Replica.committed_membership``) is the one that sequence holds at
  that index;
- *a removed leader steps down*: a leader outside the voters of its own configuration
  has that change pending (once it commits its removal it hands over and steps down).

A node with neither a configuration entry nor a snapshot that carried one runs the
default configuration of its ``--peers`` (the founders' initial configuration): it is
not part of any sequence and is not compared.

At quiescence (``convergence_problem``): the leader's committed configuration names
exactly the nodes the spec runs (``World.shard_nodes``: the operator stopped every node
it removed), every one of them holds that configuration, and every voter of it votes
(a node whose disk was lost has been re-admitted).

``stats`` counts the committed changes by kind, from the committed sequence: learners
added (for a replacement or not), promotions, removals (of the leader that proposed the
removal, or of another node), re-admissions of a voter's new data dir, and nodes that
became voters with no learner stage (a leader whose log held no configuration took its
``--peers``, which named the node being added, as its configuration, and re-admitted
the node's data dir).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from typing import TYPE_CHECKING

from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import Role
from zkv.storage_node import membership as mship
from zkv.storage_node.membership import Membership

if TYPE_CHECKING:
    from tests.sim.cluster import World
    from tests.sim.node import SimNode


def voters_apart(a: Membership, b: Membership) -> int:
    return len(set(a.voters) ^ set(b.voters))


class ConfigCheck:
    def __init__(self, world: World) -> None:
        self.w = world
        #: (shard, index, term) -> the configuration entry there, as first seen
        self.entries: dict[tuple[int, int, int], Membership] = {}
        #: shard -> the committed sequence: indexes, and the configuration at each
        self.committed: dict[int, tuple[list[int], list[Membership]]] = {
            shard: ([0], [Membership(tuple(sorted(ids)))])
            for shard, ids in world.shard_nodes.items()}
        #: shard -> the highest commit index any of its nodes reached
        self.commit_max: dict[int, int] = dict.fromkeys(world.shard_nodes, 0)
        self.stats: Counter[str] = Counter()
        #: node -> what was last checked of its log's configurations (see ``on_node``)
        self._seen: dict[str, tuple[int, int, int, int]] = {}
        self._from_snapshot: dict[str, tuple[int, int, bool]] = {}
        self._committed_seen: dict[str, Membership] = {}

    # ------------------------------------------------------------------ committed

    def on_commit(self, shard: int, index: int, term: int, data: bytes) -> None:
        """The first application of ``index`` anywhere: extend the committed sequence."""
        if not mship.is_config(data):
            return
        try:
            conf = mship.decode(data)
        except RemoteProtocolError:
            return  # a malformed entry is a no-op everywhere
        indexes, confs = self.committed[shard]
        at = bisect_right(indexes, index)
        prev = confs[at - 1]
        if voters_apart(prev, conf) > 1:
            self.w.violation(
                f"committed configurations of shard {shard} change two voters at once: "
                f"{sorted(prev.voters)} -> {sorted(conf.voters)} at index {index}")
        if at < len(indexes):
            self.w.violation(f"configuration at {index} committed after the one at "
                             f"{indexes[at]}")
        indexes.append(index)
        confs.append(conf)
        self._count(shard, index, term, prev, conf)

    def _count(self, shard: int, index: int, term: int, prev: Membership,
               conf: Membership) -> None:
        stats = self.stats
        for node in set(conf.members) - set(prev.members):
            if node in conf.voters:  # a leader whose log held no configuration took
                stats["added as a voter (--peers)"] += 1  # its --peers, naming it
            else:
                stats["learner added (replace)" if node in dict(conf.replaces)
                      else "learner added"] += 1
        stats["promoted"] += len(set(conf.voters) & set(prev.learners))
        leader = self.w.leaders_by_term.get((shard, term))
        for node in set(prev.members) - set(conf.members):
            if node in prev.voters:
                replaced = any(old == node for _new, old in prev.replaces)
                kind = "removed (replaced)" if replaced else "removed"
                stats[f"{kind}, the leader itself" if node == leader else kind] += 1
            else:
                stats["learner removed"] += 1
        old_incs = dict(prev.incarnations)
        for node, inc in conf.incarnations:
            if node in prev.voters and old_incs.get(node) != inc:
                stats["re-admitted"] += 1

    def committed_at(self, shard: int, index: int) -> Membership:
        indexes, confs = self.committed[shard]
        return confs[bisect_right(indexes, index) - 1]

    def latest(self, shard: int) -> Membership:
        return self.committed[shard][1][-1]

    # ------------------------------------------------------------------ every step

    def on_node(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        w, shard = self.w, node.shard_id
        commit_max = self.commit_max[shard]
        if core.commit_index > commit_max:
            commit_max = self.commit_max[shard] = core.commit_index
        confs = core._confs
        key = (id(core), id(confs), len(confs), core.snap_index)
        if self._seen.get(node.id) != key:  # the log's configurations changed
            self._seen[node.id] = key
            self._check_log(node, confs)
        if len(confs) > 1 and confs[-2][0] > commit_max:  # indexes ascend
            above = [i for i, _ in confs if i > commit_max]
            w.violation(f"{node.id} holds configuration entries at {above}, all above the "
                        f"shard's highest commit index {commit_max}: two changes at once")
        index, conf = core.committed_membership()
        if conf is not self._committed_seen.get(node.id):
            self._committed_seen[node.id] = conf
            if index > 0 and (index != core.snap_index or self._snapshot_conf(node)):
                want = self.committed_at(shard, index)
                if conf != want:
                    w.violation(f"{node.id}'s committed configuration at {index} is "
                                f"{mship.describe(conf)}, the committed sequence has "
                                f"{mship.describe(want)}")
        if core.role is Role.LEADER and node.id not in core.membership.voters and (
                not confs or confs[-1][0] <= core.commit_index):  # (not change_pending())
            w.violation(f"{node.id} still leads after committing its removal")

    def _check_log(self, node: SimNode, confs: list[tuple[int, Membership]]) -> None:
        """Configurations match across nodes; single-server steps along this log."""
        core = node.core
        assert core is not None
        w, shard = self.w, node.shard_id
        prev = core._snap_conf if self._snapshot_conf(node) else None
        for index, conf in confs:
            term = core.term_at(index)
            assert term is not None
            first = self.entries.setdefault((shard, index, term), conf)
            if first != conf:
                w.violation(f"{node.id} holds configuration {mship.describe(conf)} at "
                            f"index {index} term {term}; another node holds "
                            f"{mship.describe(first)} there")
            if prev is not None and voters_apart(prev, conf) > 1:
                w.violation(f"{node.id}'s log changes two voters at once at index "
                            f"{index}: {sorted(prev.voters)} -> {sorted(conf.voters)}")
            prev = conf

    def _snapshot_conf(self, node: SimNode) -> bool:
        """Whether the node's snapshot carried its configuration (else: none, or no
        snapshot, and the configuration at its index is the ``--peers`` default)."""
        core = node.core
        assert core is not None
        key = (id(core), core.snap_index)
        seen = self._from_snapshot.get(node.id)
        if seen is None or seen[:2] != key:
            carried = mship.snapshot_config(core._snap_wire) is not None
            seen = self._from_snapshot[node.id] = (*key, carried)
        return seen[2]

    # ------------------------------------------------------------------ quiescence

    def convergence_problem(self, shard: int, leader: SimNode) -> str:
        lc = leader.core
        assert lc is not None
        index, conf = lc.committed_membership()
        spec = set(self.w.shard_nodes[shard])
        if set(conf.members) != spec:
            return (f"shard {shard}'s configuration {mship.describe(conf)} is not the nodes "
                    f"that run: {sorted(spec)}")
        for nid in sorted(spec):
            node = self.w.nodes[nid]
            core = node.core
            if core is None:
                return f"{nid} is down after healing everything"
            if core.committed_membership()[1] != conf:
                return (f"{nid}'s configuration {mship.describe(core.membership)} is not "
                        f"the leader's {mship.describe(conf)}")
            if nid in conf.voters and not core.voter:
                return f"{nid} is a voter of shard {shard} yet not admitted"
        return ""
