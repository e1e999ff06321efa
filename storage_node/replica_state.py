"""The state one replica keeps, and its view of the log. Pure.

``ReplicaState`` is the base of every part of ``Replica`` (``replica.py`` lists them): it
builds the state from what the shell recovered (hard state, log, last snapshot) and
answers questions about the log. Rules and invariants of the state:
- The log holds the entries after the snapshot: ``_log[i]`` has index
  ``snap_index + 1 + i``, contiguous (checked on recovery); ``term_at(snap_index)`` is the
  snapshot's term, anything compacted away or beyond the end has no term (None).
- ``commit_index >= _delivered >= snap_index``: entries up to ``_delivered`` were handed to
  the shell in ``Ready.committed``; ``_persisted <= last_index`` is what the shell said is
  durable; entries from ``_unstable_from`` on were not handed to the shell yet.
- Term and vote change only with ``_hard_state_dirty`` set, so the next ``Ready`` carries
  them to disk before any message that depends on them.
- Every message goes out through ``_send`` into the next ``Ready``: one place sends.

The methods one part calls on another are declared here for the type checker only
(under ``TYPE_CHECKING``; the parts define them), so each part is checked on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zkv.protocol.messages import AppendReply, Entry, PeerMessage, Role, VoteRequest
from zkv.storage_node import membership as mship
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.membership import Membership
from zkv.storage_node.progress import Progress

if TYPE_CHECKING:
    from zkv.storage_node.replica import ReplicaConfig, SnapshotData


class ReplicaState:
    """The state of one member of a shard's replica group (see the module docstring)."""

    def __init__(
        self,
        config: ReplicaConfig,
        hard_state: HardState,
        entries: list[Entry],
        snapshot: tuple[int, int, SnapshotData] | None = None,
    ) -> None:
        self.config = config
        self.node_id = config.node_id
        self._peers: tuple[str, ...] = ()
        self._voters: frozenset[str] = frozenset()
        self._quorum = 1
        self._heartbeat_s = config.heartbeat_interval_ms / 1000
        self._election_s = config.election_timeout_ms / 1000
        self.term = hard_state.term
        self.voted_for = hard_state.voted_for
        self.role = Role.FOLLOWER
        self.leader_id = ""
        self.voter = config.voter
        #: nodes the shell vouches are of this shard (their connection announced it,
        #: ``peer_link``) though our configuration may not name them: we lagged behind
        #: the change that added them. Heard like members (a leader's appends, a
        #: candidate's vote requests); their votes count only as our voters'.
        self.vouched: set[str] = set()
        #: set when a configuration in the log promoted this data dir: the shell records
        #: the identity as a voter
        self.promoted = False
        #: the last snapshot as it travels and sits on disk: the configuration at its
        #: index (membership.wrap_snapshot), then the state; bytes or the shell's map
        self._snap_wire: SnapshotData
        self.snap_index, self.snap_term, self._snap_wire = snapshot or (0, 0, b"")
        snap_conf = mship.snapshot_config(self._snap_wire)
        #: the configuration at ``snap_index``, then every configuration entry after it
        self._snap_conf = snap_conf or Membership(tuple(sorted(config.members)))
        self._confs: list[tuple[int, Membership]] = []
        self._log: list[Entry] = [e for e in entries if e.index > self.snap_index]
        for offset, e in enumerate(self._log):
            assert e.index == self.snap_index + 1 + offset, "log indexes must be contiguous"
        self._note_configs(self._log)
        self.commit_index = self.snap_index
        self._delivered = self.snap_index  # highest index handed out in Ready.committed
        self._persisted = self.last_index  # what we recovered was durable
        self._unstable_from = self.last_index + 1  # first index not yet handed to the shell
        self._truncate_from: int | None = None
        self._hard_state_dirty = False
        self._messages: list[tuple[str, PeerMessage]] = []
        self._install: tuple[int, int, bytes | bytearray] | None = None
        self._last_heard_leader = -1e18
        # candidate / pre-candidate
        self._prevote = False
        #: a broker's campaign that came while we still heard the leader: (until,
        #: known_term), started as soon as our lease runs out (``Replica.tick``)
        self._campaign_due: tuple[float, int] | None = None
        self._prevote_term = 0
        self._votes: set[str] = set()
        self._election_started = 0.0
        #: the (pre-)vote request of the election running, asked again every heartbeat
        #: of the peers that have not granted it (``ReplicaElections.ask_again``)
        self._vote_request: VoteRequest | None = None
        self._vote_asked_at = 0.0
        # leader
        self._progress: dict[str, Progress] = {}
        self._became_leader_at = 0.0
        self._noop_index = 0
        self._transfer_to = ""
        self._transfer_started = 0.0
        self._frozen_at = 0  # > 0: replicate nothing past it (TimeoutNow sent)
        #: whom our last TimeoutNow went to, and our term then (``handed_to``)
        self._handed: tuple[str, int] = ("", 0)
        #: the node is stopping (``leave``): it never stands again
        self.leaving = False
        self._last_heartbeat = -1e18
        self._read_seq = 0
        self._reads_unsent: list[tuple[object, int]] = []  # (token, commit at arrival)
        self._reads_waiting: list[tuple[object, int, int]] = []  # (token, index, seq)
        self._reads_ready: list[tuple[object, int]] = []
        self._reads_failed: list[object] = []
        # follower snapshot reception
        self._incoming: tuple[int, int] | None = None
        self._incoming_data = bytearray()
        self._now = 0.0  # time of the latest event, for work done in ready()

    # ------------------------------------------------------------------ log view

    @property
    def last_index(self) -> int:
        return self._log[-1].index if self._log else self.snap_index

    @property
    def last_term(self) -> int:
        return self._log[-1].term if self._log else self.snap_term

    def term_at(self, index: int) -> int | None:
        """Term of the entry at ``index``; None if compacted away or beyond the log."""
        if index == self.snap_index:
            return self.snap_term
        if index < self.snap_index or index > self.last_index:
            return None
        return self._log[index - self.snap_index - 1].term

    def _send(self, to: str, msg: PeerMessage) -> None:
        self._messages.append((to, msg))

    if TYPE_CHECKING:
        # defined by the parts (replica*.py); declared so each part type-checks alone

        def propose(self, data: bytes, now: float) -> int | None: ...

        @property
        def membership(self) -> Membership: ...

        def membership_at(self, index: int) -> Membership: ...

        def change_pending(self) -> bool: ...

        def _note_configs(self, entries: list[Entry]) -> None: ...

        def _check_admitted(self, conf: Membership) -> None: ...

        def _apply_membership(self) -> None: ...

        def transfer_leadership(self, target: str, now: float) -> bool: ...

        def _maybe_send_timeout_now(self) -> None: ...

        def _become_follower(self, term: int, leader: str, now: float) -> None: ...

        def _broadcast_append(self, now: float) -> None: ...

        def _send_append(self, peer: str, now: float, heartbeat: bool = False) -> None: ...

        def _append_reply(self, success: bool, match_index: int, read_seq: int) -> AppendReply: ...

        def _maybe_commit(self) -> None: ...

        def _send_snapshot_chunk(self, peer: str, pr: Progress, now: float) -> None: ...
