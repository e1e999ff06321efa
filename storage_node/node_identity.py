"""The storage node's data-dir identity: may this node vote, and founding a new shard.

``identity.py`` decides (pure); this mixin of ``StorageNode`` carries the decision out:
it records the identity file, tells the replica whether it votes, probes the initial
configuration while bootstrapping and answers other nodes' probes. Rules: the identity
file is written before the replica acts on a new state; a founding message from another
cluster or shard, or whose node id is not its sender's, is dropped with a warning;
``--force-new-cluster`` needs a data dir that was a voter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zkv.protocol.messages import Entry, FoundingAnswer, FoundingProbe, PeerMessage
from zkv.storage_node import identity
from zkv.storage_node import membership as mship
from zkv.storage_node.snapshot import save_snapshot

if TYPE_CHECKING:
    from loguru import Logger

    from zkv.storage_node.node import NodeConfig
    from zkv.storage_node.node_core import NodeCore
    from zkv.storage_node.replica import Replica
    from zkv.storage_node.state_machine import KVStateMachine
    from zkv.storage_node.wal import WriteAheadLog


class NodeIdentity:
    """Identity and founding methods of ``StorageNode`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: NodeConfig
        log: Logger
        core: Replica
        node: NodeCore
        state: KVStateMachine
        wal: WriteAheadLog

        def _send_peer(self, to: str, msg: PeerMessage) -> None: ...

    def _check_identity(self, has_state: bool) -> None:
        """Decide from the data dir whether we may vote (``identity.py``); record it."""
        cfg = self.config
        on_disk = identity.load(cfg.data_dir)
        self.identity = identity.decide_start(
            on_disk, has_state, cluster_id=cfg.cluster_id, shard_id=cfg.shard_id,
            node_id=cfg.node_id, bootstrap=cfg.bootstrap, incarnation=identity.new_incarnation(),
            members=tuple(cfg.peers),
        )  # fmt: skip
        if on_disk is None:
            identity.save(cfg.data_dir, self.identity)
            if self.identity.voter:
                self.log.info("adopted data dir written before identities: voter, "
                              "incarnation {}", self.identity.incarnation)
        self.founding = None
        if self.identity.state is identity.IdentityState.BOOTSTRAPPING:
            self.founding = identity.Founding(cfg.node_id, tuple(cfg.peers))
        if not self.identity.voter:
            self.log.warning("not a voter: {}", self.identity.reason)

    def _initial_members(self) -> tuple[str, ...]:
        """``identity.initial_members``, and a note when it is not what --peers says."""
        cfg = self.config
        members = identity.initial_members(self.identity, cfg.node_id, tuple(cfg.peers))
        given = tuple(sorted({cfg.node_id, *cfg.peers}))
        if members != given:
            self.log.info("the data dir's founding configuration {} (not --peers {}) is the "
                          "configuration until the log or a snapshot names one",
                          list(members), list(given))
        return members

    def _force_new_cluster(
        self, snapshot: tuple[int, int, object] | None, entries: list[Entry],
    ) -> tuple[tuple[int, int, bytes], list[Entry]]:
        """Disaster recovery when a shard's majority is gone for good: make this node's
        whole log (committed or not: it is the most anyone still knows) its state, in a
        snapshot whose configuration is this node alone; the operator then adds replicas.
        Writes acknowledged by the lost majority and missing here are lost."""
        if not self.identity.voter:
            raise RuntimeError("--force-new-cluster needs a data dir that was a voter; this "
                               f"one is {self.identity.state.value}")
        for e in entries:
            if e.index > self.state.applied_index:
                self.state.apply(e.index, e.data)
        last_index, last_term = (entries[-1].index, entries[-1].term) if entries else (
            (snapshot[0], snapshot[1]) if snapshot else (0, 0))
        conf = mship.Membership((self.config.node_id,))
        blob = mship.wrap_snapshot(conf, self.state.snapshot_bytes())
        save_snapshot(self.config.data_dir, last_index, last_term, blob)
        self.wal.reset(last_index + 1)
        self.log.warning(
            "FORCED NEW CLUSTER (--force-new-cluster): shard {} now has this node as its "
            "only voter, with its log up to index {} (term {}); the former members are out "
            "of it. Remove the flag before the next start; add replicas with "
            "`zkv admin add-replica`.", self.config.shard_id, last_index, last_term)
        return (last_index, last_term, blob), []

    def _set_identity(self, state: identity.IdentityState, reason: str = "") -> None:
        self.identity = self.identity.with_state(state, reason)
        identity.save(self.config.data_dir, self.identity)
        self.core.set_voter(self.identity.voter)
        self.founding = None
        self.node.founding_active = False
        self.node.identity_extra = self._identity_extra()

    def _identity_extra(self) -> dict[str, object]:
        """What the heartbeat says of this data dir (``zkv status``: member, incarnation)."""
        ident = self.identity
        extra: dict[str, object] = {"voter": ident.voter, "membership": ident.state.value,
                                    "incarnation": ident.incarnation}
        if ident.reason:
            extra["membership_reason"] = ident.reason
        return extra

    def _found(self) -> None:
        """Bootstrapping: probe the initial configuration; found or give up."""
        founding = self.founding
        if founding is None:
            return
        if founding.exists:
            self._set_identity(identity.IdentityState.WAITING, (
                "this shard exists already (a member is past term 0), so --bootstrap does "
                "not found it: a non-voter until a leader re-admits it, caught up"))
            self.log.warning("not a voter: {}", self.identity.reason)
        elif founding.founded:
            self._set_identity(identity.IdentityState.VOTER)
            self.log.info("founded shard {} with {} (a majority agreed): voter",
                          self.config.shard_id, sorted(founding.members))
        else:
            probe = FoundingProbe(self.config.node_id, self.config.cluster_id, self.config.shard_id)
            for peer in self.config.peers:
                self._send_peer(peer, probe)  # type: ignore[arg-type]

    def _on_founding(self, sender: str, msg: FoundingProbe | FoundingAnswer) -> None:
        cfg = self.config
        if (msg.cluster_id, msg.shard_id) != (cfg.cluster_id, cfg.shard_id) or msg.node_id != sender:
            self.log.warning("founding message from {} of another cluster or shard", sender)
            return
        if isinstance(msg, FoundingAnswer):
            if self.founding is not None:
                self.founding.on_answer(sender, msg.pristine)
                self._found()
            return
        state = self.identity.state
        pristine = state is identity.IdentityState.BOOTSTRAPPING or (
            state is identity.IdentityState.VOTER and self.core.term == 0
            and self.core.last_index == 0
        )
        self._send_peer(sender, FoundingAnswer(  # type: ignore[arg-type]
            cfg.node_id, cfg.cluster_id, cfg.shard_id, pristine, self.core.term))

    def _on_founding_events(self) -> None:
        """Founding messages the core set aside (the identity is the shell's: a file)."""
        events, self.node.founding_events = self.node.founding_events, []
        for sender, msg in events:
            if msg is None:  # a leader's append: the shard exists
                if self.founding is not None:
                    self.founding.on_answer(sender, False)
                    self._found()
            elif isinstance(msg, FoundingProbe | FoundingAnswer):
                self._on_founding(sender, msg)
