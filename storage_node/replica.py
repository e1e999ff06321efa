"""The replica core: Raft's log, votes and commit for one member of a shard. Pure.

No sockets, clock, threads or global random: the shell feeds events with the time
(``step``, ``tick``, ``propose``, ``read_index``, ``campaign``) and drains ``ready()``:

1. persist ``hard_state``; drop the log from ``truncate_from``; append ``entries``; sync
   (per the fsync policy) and report ``persisted(last_index)``;
2. only then send ``messages`` (a vote or an append ack promises durable state); a
   leader's appends may go before step 1 when no term or vote changes (the node does:
   it counts itself toward a commit only up to ``persisted``, docs/internals.md);
3. install ``snapshot`` if any, apply ``committed`` in order, then ``applied(index)``;
4. serve each of ``reads`` once the state machine has applied its read index.

Rules (Raft, with the changes zkv's design asks for). Each part of the algorithm lives in
its own module, a base class of ``Replica`` that opens with that part's rules:
- ``replica_state.py``: the state one replica keeps and its view of the log;
- ``replica_elections.py``: elections started by the broker, pre-vote, votes refused
  under a live leader, terms (``TERM_MAX``);
- ``replica_replication.py``: appends, the commit rule, check-quorum, read index;
- ``replica_membership.py``: the configuration in force, single-server changes driven
  by the leader, learner promotion, leadership transfer (``TimeoutNow``);
- ``replica_snapshots.py``: compaction, snapshots streamed to followers and installed.
This module is the shell-facing API and the dispatch of messages: any message at a
higher term makes us a follower at that term (except a vote refused under a live leader,
which is ignored whole); messages from older terms are answered with our term, so a
deposed leader learns it and can never commit; messages from non-members are ignored
(see ``step``).

Why mixins rather than helper functions: every part reads and writes the same Raft state
(term, role, log, progress), which the parts share as ``self`` exactly as the single class
did, so the split moves code without changing a line of behaviour, keeps every attribute
name the node, the simulator and the tests use, and mypy still checks each part against
the state declared once in ``ReplicaState``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from zkv.protocol.messages import (
    AppendEntries,
    AppendReply,
    Entry,
    InstallSnapshot,
    PeerMessage,
    Role,
    SnapshotReply,
    TimeoutNow,
    VoteReply,
    VoteRequest,
)
from zkv.protocol.timing import ELECTION_TIMEOUT_MS, HEARTBEAT_MS
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.replica_elections import TERM_MAX, ReplicaElections
from zkv.storage_node.replica_membership import ReplicaMembership
from zkv.storage_node.replica_replication import ReplicaReplication
from zkv.storage_node.replica_snapshots import ReplicaSnapshots

__all__ = ["TERM_MAX", "Ready", "Replica", "ReplicaConfig", "SnapshotData"]


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    node_id: str
    members: tuple[str, ...]
    heartbeat_interval_ms: int = HEARTBEAT_MS
    election_timeout_ms: int = ELECTION_TIMEOUT_MS
    #: data of the entry a new leader appends to commit something of its own term
    noop_data: bytes = b"\x91\x00"
    entries_per_append_max: int = 512
    append_bytes_max: int = 1 << 20
    #: appends in flight per follower: few, so that under load entries pile up into
    #: big batches (one fsync and one message for many writes) instead of many small ones
    inflight_appends_max: int = 2
    snapshot_chunk_bytes: int = 1 << 20
    snapshot_bytes_max: int = 4 << 30
    reads_pending_max: int = 100_000
    #: False for a node whose data dir may not vote (``identity.py``): it never votes
    #: or campaigns, and its acks say so, so no leader counts it toward a quorum
    voter: bool = True
    #: a learner within this many entries of the leader's log is promoted to voter
    promote_lag_max: int = 1000
    #: this data dir's incarnation (``identity.py``): a configuration that promoted it
    #: makes this node a voter
    incarnation: str = ""

    def __post_init__(self) -> None:
        if self.node_id not in self.members:
            raise ValueError(f"{self.node_id} is not among the members {self.members}")
        if self.election_timeout_ms < 3 * self.heartbeat_interval_ms:
            raise ValueError("election_timeout_ms must be >= 3 x heartbeat_interval_ms")


@dataclass(slots=True)
class Ready:
    hard_state: HardState | None = None
    truncate_from: int | None = None
    entries: list[Entry] = field(default_factory=list)
    messages: list[tuple[str, PeerMessage]] = field(default_factory=list)
    committed: list[Entry] = field(default_factory=list)
    reads: list[tuple[object, int]] = field(default_factory=list)
    failed_reads: list[object] = field(default_factory=list)
    #: (last_index, last_term, data): install before applying ``committed``
    snapshot: tuple[int, int, bytes | bytearray] | None = None

    def __bool__(self) -> bool:
        return bool(
            self.hard_state or self.truncate_from is not None or self.entries
            or self.messages or self.committed or self.reads or self.failed_reads
            or self.snapshot
        )  # fmt: skip


class SnapshotData(Protocol):
    """What the core keeps of its last snapshot to stream to followers: its length and
    slices. ``bytes``, or the shell's read-only map of the file (``snapshot.py``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes | bytearray: ...


class Replica(ReplicaElections, ReplicaReplication, ReplicaMembership, ReplicaSnapshots):
    """One member of a shard's replica group. See the module docstrings for the rules;
    the state and ``__init__`` are in ``replica_state.py``."""

    def propose(self, data: bytes, now: float) -> int | None:
        """Append a command as leader; its index, or None when not the leader."""
        if self.role is not Role.LEADER:
            return None
        self._now = now
        index = self.last_index + 1
        self._log.append(Entry(self.term, index, data))
        return index

    def read_index(self, token: object, now: float) -> bool:
        """Queue a linearizable read; False when not the leader or too many are pending."""
        if self.role is not Role.LEADER:
            return False
        if len(self._reads_unsent) + len(self._reads_waiting) >= self.config.reads_pending_max:
            return False
        self._reads_unsent.append((token, self.commit_index))
        return True

    def read_index_now(self) -> int | None:
        """The index a linearizable read arriving now may be served at, when no round
        is needed to confirm our leadership: we are the only voter (quorum 1, counting
        a voter being added), so ``_confirm_reads`` would confirm it in this turn's
        ready round, and a commit of our own term (so at or past our no-op) says our
        commit index is current. None otherwise: the read goes through ``read_index``."""
        if (self.role is Role.LEADER and self._quorum == 1 and self.node_id in self._voters
                and self.term_at(self.commit_index) == self.term):
            return self.commit_index
        return None

    def vouch(self, node: str) -> None:
        """The shell knows ``node`` is of this shard (see ``step``); idempotent."""
        self.vouched.add(node)

    def set_voter(self, voter: bool) -> None:
        """The shell's identity check decided (founding agreed, or admission)."""
        self.voter = voter

    def step_down(self, now: float) -> None:
        """Stop leading, staying at our term (the node core's availability rule: no
        broker hears us). Pending reads fail; the followers' lease on us runs out."""
        if self.role is Role.LEADER:
            self._now = now
            self._become_follower(self.term, "", now)

    def tick(self, now: float) -> None:
        self._now = now
        if self.role is Role.LEADER:
            self._leader_tick(now)
            if self.role is Role.LEADER:
                self._drive_membership(now)
                if (self._transfer_to or self._frozen_at) and (
                    now - self._transfer_started >= self._election_s):
                    self._transfer_to, self._frozen_at = "", 0  # no takeover: give up
        elif self._prevote or self.role is Role.CANDIDATE:
            if now - self._election_started >= self._election_s:
                self._prevote = False
                if self.role is Role.CANDIDATE:
                    self.role = Role.FOLLOWER
            else:
                self.ask_again(now)
        due = self._campaign_due
        if due is not None and self.role is not Role.LEADER:
            if now >= due[0]:
                self._campaign_due = None  # lapsed: the leader was heard all along
            elif not self._in_lease(now):
                self.campaign(now, due[1])  # asked while the lease ran: stand now

    def persisted(self, index: int) -> None:
        self._persisted = max(self._persisted, min(index, self.last_index))
        if self.role is Role.LEADER:
            self._maybe_commit()

    def applied(self, index: int) -> None:
        """The state machine reached ``index`` (informational; reads are served by the
        shell once applied >= their read index)."""

    def ready(self) -> Ready:
        if self.role is Role.LEADER:
            if self._unstable_from <= self.last_index:
                self._broadcast_append(self._now)  # one batched append per follower
            if self._reads_unsent:
                self._start_read_round()
        rd = Ready()
        if self._hard_state_dirty:
            rd.hard_state = HardState(self.term, self.voted_for)
            self._hard_state_dirty = False
        rd.truncate_from, self._truncate_from = self._truncate_from, None
        if self._unstable_from <= self.last_index:
            rd.entries = self._log[self._unstable_from - self.snap_index - 1 :]
            self._unstable_from = self.last_index + 1
        rd.messages, self._messages = self._messages, []
        rd.snapshot, self._install = self._install, None
        if self.commit_index > self._delivered:
            lo = self._delivered - self.snap_index
            rd.committed = self._log[lo : self.commit_index - self.snap_index]
            self._delivered = self.commit_index
        rd.reads, self._reads_ready = self._reads_ready, []
        rd.failed_reads, self._reads_failed = self._reads_failed, []
        return rd

    def match_indexes(self) -> dict[str, int]:
        """Leader only: each follower's match index (empty otherwise), for metrics."""
        return {peer: pr.match_index for peer, pr in self._progress.items()}

    def has_ready(self) -> bool:
        return bool(
            self._hard_state_dirty or self._truncate_from is not None
            or self._unstable_from <= self.last_index or self._messages or self._install
            or self.commit_index > self._delivered or self._reads_ready or self._reads_failed
            or (self._reads_unsent and self.role is Role.LEADER)
        )  # fmt: skip

    # ------------------------------------------------------------------ messages in

    def step(self, sender: str, msg: PeerMessage, now: float) -> None:
        self._now = now
        if msg.term >= TERM_MAX:
            return  # a forged term: ignore rather than trust
        if sender not in self._peers and sender not in self.vouched and not (
            isinstance(msg, TimeoutNow)
            or (isinstance(msg, (AppendEntries, InstallSnapshot))
                and self.node_id not in self._voters)
        ):
            # Not a member, nor a node the shell vouches is of this shard (one we may
            # know nothing of: we lagged behind the change that added it, maybe our new
            # leader or the only candidate that can win; its votes count only where our
            # configuration names it a voter). A leader's appends are taken only by a
            # node that is not a voter of its configuration (a new learner knows no
            # members yet); a voter ignores the rest, so a connection that reached the
            # wrong node (an address another group now uses) cannot feed it another
            # group's log. TimeoutNow is checked against the leader we follow (a
            # removed leader hands over).
            return
        if isinstance(msg, TimeoutNow):
            if (msg.term == self.term and sender == self.leader_id and self.voter
                    and self.node_id in self._voters and self.role is Role.FOLLOWER
                    and not self.leaving):
                self._become_candidate(now, transfer=True)
            return
        if isinstance(msg, VoteRequest):
            if self.voter:  # a non-voter has no vote to give: ignore it whole
                self._on_vote_request(sender, msg, now)
            return
        if isinstance(msg, VoteReply) and msg.pre_vote:
            self._on_prevote_reply(sender, msg, now)
            return
        if msg.term > self.term:
            leader = sender if isinstance(msg, (AppendEntries, InstallSnapshot)) else ""
            self._become_follower(msg.term, leader, now)
        elif msg.term < self.term:
            if isinstance(msg, (AppendEntries, InstallSnapshot)):
                # tell a deposed leader about the newer term
                self._send(sender, self._append_reply(False, self.last_index, 0))
            return
        if isinstance(msg, AppendEntries):
            self._on_append(sender, msg, now)
        elif isinstance(msg, AppendReply):
            self._on_append_reply(sender, msg, now)
        elif isinstance(msg, VoteReply):
            self._on_vote_reply(sender, msg, now)
        elif isinstance(msg, InstallSnapshot):
            self._on_snapshot(sender, msg, now)
        elif isinstance(msg, SnapshotReply):
            self._on_snapshot_reply(sender, msg, now)
