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

Rules (Raft, with the changes zkv's design asks for):
- Elections are started by the broker (``campaign``), never by a local timer. A campaign
  first runs a pre-vote at term+1 that changes nobody's state; only a candidate that a
  majority would elect bumps its term, so a node cut off from the group cannot inflate
  terms and depose a healthy leader when it returns.
- A voter refuses (ignores) any vote while it hears a live leader: it is the leader, or
  it heard one within ``election_timeout``. It refuses a candidate whose log is behind
  its own (last term, then last index). Term and vote are persisted before answering.
- Any message at a higher term makes us a follower at that term (except a vote refused
  under a live leader, which is ignored whole). Messages from older terms are answered
  with our term, so a deposed leader learns it and can never commit.
- The leader commits index N once a majority (itself counted only up to what it has
  persisted) holds N and ``term_at(N) == term``; followers learn the commit index from
  appends, bounded by what the append proved they match.
- A leader that has not heard a majority for ``election_timeout`` steps down.
- Linearizable reads (read index): a read arriving at commit index C is given the next
  ``read_seq``; it is safe once a majority echoed that seq at our term (we were still
  leader after it arrived) and we have committed an entry of our term (so C covers
  every write acknowledged by any earlier leader). Reads are batched per ``ready()``.
- Membership (``membership.py``: single-server changes through the log, their rules and
  why): the configuration in force is the latest in the log; quorums are majorities of
  its voters; learners replicate but never vote or count; a node outside the voters
  never campaigns; a leader removed by a committed configuration steps down.
- Leadership transfer (``transfer_leadership``): once the target's log matches ours the
  leader sends it ``TimeoutNow``; it campaigns at once (no pre-vote) and its vote
  requests say ``transfer``, so voters grant them despite the live leader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from zkv.protocol.errors import RemoteProtocolError
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
from zkv.storage_node import membership as mship
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.membership import Membership, MembershipError
from zkv.storage_node.progress import Progress, ProgressState

#: Terms stop here: the codec refuses integers from 2**63 on, so a term must always have
#: room for +1 below that. Only a forged message could bring a term near it.
TERM_MAX = (1 << 62)


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    node_id: str
    members: tuple[str, ...]
    heartbeat_interval_ms: int = 100
    election_timeout_ms: int = 1000
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
    snapshot: tuple[int, int, bytes] | None = None

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

    def __getitem__(self, index: slice, /) -> bytes: ...


class Replica:
    """One member of a shard's replica group. See the module docstring for the rules."""

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
        self._install: tuple[int, int, bytes] | None = None
        self._last_heard_leader = -1e18
        # candidate / pre-candidate
        self._prevote = False
        self._prevote_term = 0
        self._votes: set[str] = set()
        self._election_started = 0.0
        # leader
        self._progress: dict[str, Progress] = {}
        self._became_leader_at = 0.0
        self._noop_index = 0
        self._transfer_to = ""
        self._transfer_started = 0.0
        self._frozen_at = 0  # > 0: replicate nothing past it (TimeoutNow sent)
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

    # ------------------------------------------------------------------ log access

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

    def entries_from(self, index: int, count_max: int, bytes_max: int) -> list[Entry]:
        start = index - self.snap_index - 1
        out: list[Entry] = []
        size = 0
        for e in self._log[start : start + count_max]:
            size += len(e.data) + 24
            if out and size > bytes_max:
                break
            out.append(e)
        return out

    def _append(self, entries: list[Entry]) -> None:
        self._log.extend(entries)
        self._note_configs(entries)

    def _truncate(self, index: int) -> None:
        assert index > self.commit_index, "a committed entry must never be truncated"
        del self._log[index - self.snap_index - 1 :]
        if self._confs and self._confs[-1][0] >= index:
            self._confs = [(i, c) for i, c in self._confs if i < index]
            self._apply_membership()
        self._persisted = min(self._persisted, index - 1)
        if index < self._unstable_from:
            self._truncate_from = (
                index if self._truncate_from is None else min(self._truncate_from, index)
            )
            self._unstable_from = index

    # ------------------------------------------------------------------ membership

    @property
    def membership(self) -> Membership:
        """The configuration in force: the latest in the log, committed or not."""
        return self._confs[-1][1] if self._confs else self._snap_conf

    def membership_at(self, index: int) -> Membership:
        conf = self._snap_conf
        for i, c in self._confs:
            if i > index:
                break
            conf = c
        return conf

    def _note_configs(self, entries: list[Entry]) -> None:
        found = False
        for e in entries:
            if mship.is_config(e.data):
                try:
                    conf = mship.decode(e.data)
                except RemoteProtocolError:
                    continue  # a malformed entry is a no-op everywhere (the state machine too)
                self._confs.append((e.index, conf))
                found = True
                self._check_admitted(conf)
        if found or not self._voters:
            self._apply_membership()

    def _check_admitted(self, conf: Membership) -> None:
        if not self.voter and self.config.incarnation and conf.admits(
            self.node_id, self.config.incarnation
        ):
            self.voter = True  # this very data dir was promoted: it holds what it acked
            self.promoted = True
            if self.term > 0:
                # A data dir that came back empty has forgotten any vote its predecessor
                # gave in this term: count it as given (to the leader that admitted us),
                # so we cannot elect a second leader in the term we rejoined in.
                self.voted_for = self.leader_id or self.node_id
                self._hard_state_dirty = True

    def _apply_membership(self) -> None:
        conf = self.membership
        self._peers = tuple(m for m in conf.members if m != self.node_id)
        self._voters = frozenset(conf.voters)
        self._quorum = conf.quorum
        if self.role is Role.LEADER:
            # a new voter's acks say so only from its next reply: give the new quorum one
            # election timeout to show itself before check-quorum may depose us
            self._became_leader_at = self._now
            for p in self._peers:
                if p not in self._progress:
                    self._progress[p] = Progress(
                        next_index=self.last_index + 1, last_ack=self._now,
                        last_progress=self._now)
            for p in [p for p in self._progress if p not in self._peers]:
                del self._progress[p]

    def change_pending(self) -> bool:
        return bool(self._confs) and self._confs[-1][0] > self.commit_index

    def propose_membership(self, new: Membership, now: float) -> int:
        """Append configuration ``new`` as leader (rules: ``membership.py``); its index.
        Raises ``MembershipError`` when a rule forbids it now."""
        if self.role is not Role.LEADER:
            raise MembershipError("not the leader")
        if self.term_at(self.commit_index) != self.term:
            raise MembershipError("no entry of this term committed yet; retry shortly")
        if self.change_pending():
            raise MembershipError("a membership change is in progress; retry shortly")
        mship.check_change(self.membership, new)
        index = self.propose(mship.encode(new), now)
        assert index is not None
        self._note_configs([self._log[-1]])
        return index

    def _drive_membership(self, now: float) -> None:
        """Leader: finish replacements, promote learners that caught up."""
        conf = self.membership
        if self.change_pending() or self.term_at(self.commit_index) != self.term:
            return
        for new, old in conf.replaces:
            if new in conf.voters and old in conf.members:
                self.propose_membership(conf.remove(old), now)
                return
        lag_ok = self.last_index - self.config.promote_lag_max
        for voter in conf.voters:  # a voter slot whose data dir came back empty
            pr = self._progress.get(voter)
            if (pr is not None and not pr.voter and pr.incarnation
                    and pr.match_index >= lag_ok
                    and (voter, pr.incarnation) not in conf.incarnations):
                self.propose_membership(conf.readmit(voter, pr.incarnation), now)
                return
        for learner in conf.learners:
            pr = self._progress.get(learner)
            if pr is None or not pr.incarnation:
                continue
            if pr.match_index >= self.last_index - self.config.promote_lag_max:
                self.propose_membership(conf.promote(learner, pr.incarnation), now)
                return

    # ------------------------------------------------------------------ shell API

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

    def set_voter(self, voter: bool) -> None:
        """The shell's identity check decided (founding agreed, or admission)."""
        self.voter = voter

    def campaign(self, now: float, known_term: int = 0) -> None:
        """The broker thinks our leader is gone: start a pre-vote."""
        if not self.voter or self.node_id not in self._voters:
            return  # an empty data dir, a learner or a removed node must never lead
        if self.role is Role.LEADER or self._in_lease(now) or self._prevote:
            return
        if known_term >= TERM_MAX or self.term >= TERM_MAX:
            return  # no real cluster gets here; refuse rather than overflow the term
        if self.role is Role.CANDIDATE and now - self._election_started < self._election_s:
            return
        self._now = now
        self._prevote = True
        self._prevote_term = max(self.term, known_term) + 1
        self._votes = {self.node_id}
        self._election_started = now
        request = VoteRequest(
            self._prevote_term, self.node_id, self.last_index, self.last_term, True
        )
        for peer in self._peers:
            self._send(peer, request)
        self._check_prevote(now)

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
        elif (self._prevote or self.role is Role.CANDIDATE) and (
            now - self._election_started >= self._election_s
        ):
            self._prevote = False
            if self.role is Role.CANDIDATE:
                self.role = Role.FOLLOWER

    def persisted(self, index: int) -> None:
        self._persisted = max(self._persisted, min(index, self.last_index))
        if self.role is Role.LEADER:
            self._maybe_commit()

    def applied(self, index: int) -> None:
        """The state machine reached ``index`` (informational; reads are served by the
        shell once applied >= their read index)."""

    def compacted(self, index: int, term: int, data: SnapshotData) -> None:
        """The shell snapshotted the state at ``index``: drop the log up to it. ``data``
        is the snapshot as written (``membership.wrap_snapshot``: the configuration at
        ``index``, then the state), what a follower that needs it is sent."""
        if index <= self.snap_index:
            return
        assert index <= self._delivered and self.term_at(index) == term
        self._snap_conf = self.membership_at(index)
        self._confs = [(i, c) for i, c in self._confs if i > index]
        del self._log[: index - self.snap_index]
        self.snap_index, self.snap_term, self._snap_wire = index, term, data

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
        if sender not in self._peers and not (
            isinstance(msg, TimeoutNow)
            or (isinstance(msg, (AppendEntries, InstallSnapshot))
                and self.node_id not in self._voters)
        ):
            # Not a member. A leader's appends are taken only by a node that is not a
            # voter of its configuration (a new learner knows no members yet); a voter
            # ignores them, so a connection that reached the wrong node (an address
            # another group now uses) cannot feed it another group's log. TimeoutNow
            # is checked against the leader we follow (a removed leader hands over).
            return
        if isinstance(msg, TimeoutNow):
            if (msg.term == self.term and sender == self.leader_id and self.voter
                    and self.node_id in self._voters and self.role is Role.FOLLOWER):
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

    # ------------------------------------------------------------------ elections

    def transfer_leadership(self, target: str, now: float) -> bool:
        """Hand leadership to voter ``target`` (most up-to-date voter if ""); False
        when not the leader or no such voter."""
        if self.role is not Role.LEADER:
            return False
        voters = [p for p in self._peers if p in self._voters]
        if not target:
            ranked = sorted((p for p in voters if self._progress[p].voter),
                            key=lambda p: -self._progress[p].match_index)
            target = ranked[0] if ranked else ""
        if target not in voters:
            return False
        self._now = now
        self._transfer_to, self._transfer_started = target, now
        self._maybe_send_timeout_now()
        return True

    def _maybe_send_timeout_now(self) -> None:
        pr = self._progress.get(self._transfer_to)
        if pr is not None and pr.match_index >= self.last_index:
            self._send(self._transfer_to, TimeoutNow(self.term, self.node_id))
            self._transfer_to = ""
            # Replicate nothing newer from here: a voter that received more than the
            # target holds when it campaigns would refuse it its vote. What we append
            # meanwhile is never acknowledged (we step down) and clients retry it.
            self._frozen_at = self.last_index

    def _in_lease(self, now: float) -> bool:
        """True while we are or hear a live leader: votes are then refused."""
        if self.role is Role.LEADER:
            return True
        return bool(self.leader_id) and now - self._last_heard_leader < self._election_s

    def _log_ok(self, last_index: int, last_term: int) -> bool:
        return (last_term, last_index) >= (self.last_term, self.last_index)

    def _on_vote_request(self, sender: str, msg: VoteRequest, now: float) -> None:
        if msg.pre_vote:
            grant = msg.term > self.term and not self._in_lease(now) and self._log_ok(
                msg.last_log_index, msg.last_log_term
            )
            term = msg.term if grant else self.term
            self._send(sender, VoteReply(term, self.node_id, grant, True))
            return
        if msg.term > self.term:
            if self._in_lease(now) and not msg.transfer:
                return  # a live leader exists: ignore whole, keep our term
            self._become_follower(msg.term, "", now)
        if msg.term < self.term:
            self._send(sender, VoteReply(self.term, self.node_id, False))
            return
        grant = self.voted_for in ("", sender) and self._log_ok(
            msg.last_log_index, msg.last_log_term
        )
        if grant and self.voted_for != sender:
            self.voted_for = sender
            self._hard_state_dirty = True
        self._send(sender, VoteReply(self.term, self.node_id, grant))

    def _on_prevote_reply(self, sender: str, msg: VoteReply, now: float) -> None:
        if not self._prevote:
            return
        if msg.granted and msg.term == self._prevote_term:
            self._votes.add(sender)
            self._check_prevote(now)
        elif not msg.granted and msg.term > self.term:
            self._become_follower(msg.term, "", now)

    def _won(self) -> bool:
        return len(self._votes & self._voters) >= self._quorum

    def _check_prevote(self, now: float) -> None:
        if self._won():
            self._become_candidate(now)

    def _become_candidate(self, now: float, transfer: bool = False) -> None:
        self._prevote = False
        self.role = Role.CANDIDATE
        self.term = max(self.term + 1, self._prevote_term)
        self.voted_for = self.node_id
        self._hard_state_dirty = True
        self.leader_id = ""
        self._votes = {self.node_id}
        self._election_started = now
        request = VoteRequest(
            self.term, self.node_id, self.last_index, self.last_term, False, transfer
        )
        for peer in self._peers:
            self._send(peer, request)
        if self._won():
            self._become_leader(now)

    def _on_vote_reply(self, sender: str, msg: VoteReply, now: float) -> None:
        if self.role is not Role.CANDIDATE or not msg.granted:
            return
        self._votes.add(sender)
        if self._won():
            self._become_leader(now)

    def _become_follower(self, term: int, leader: str, now: float) -> None:
        if term > self.term:
            self.term = term
            self.voted_for = ""
            self._hard_state_dirty = True
        was_leader = self.role is Role.LEADER
        self.role = Role.FOLLOWER
        self._prevote = False
        self.leader_id = leader
        if leader:
            self._last_heard_leader = now
        if was_leader:
            self._transfer_to = ""
            self._frozen_at = 0
            self._progress.clear()
            self._reads_failed.extend(t for t, _ in self._reads_unsent)
            self._reads_failed.extend(t for t, _, _ in self._reads_waiting)
            self._reads_unsent.clear()
            self._reads_waiting.clear()

    def _become_leader(self, now: float) -> None:
        self.role = Role.LEADER
        self.leader_id = self.node_id
        self._became_leader_at = now
        self._progress = {
            p: Progress(next_index=self.last_index + 1, last_ack=now, last_progress=now)
            for p in self._peers
        }
        self._noop_index = self.propose(self.config.noop_data, now) or 0
        self._broadcast_append(now)
        self._maybe_commit()

    # ------------------------------------------------------------------ replication

    def _leader_tick(self, now: float) -> None:
        live = int(self.node_id in self._voters) + sum(
            1 for p, pr in self._progress.items()
            if pr.voter and p in self._voters and now - pr.last_ack < self._election_s
        )
        if live < self._quorum and now - self._became_leader_at >= self._election_s:
            self._become_follower(self.term, "", now)
            return
        if now - self._last_heartbeat >= self._heartbeat_s:
            self._last_heartbeat = now
            for peer, pr in self._progress.items():
                stalled = now - pr.last_progress >= 2 * self._heartbeat_s
                if pr.state is ProgressState.REPLICATE and pr.inflight and stalled:
                    pr.become_probe(now)  # an append was probably lost: find the gap
                self._send_append(peer, now, heartbeat=True)

    def _broadcast_append(self, now: float) -> None:
        for peer in self._progress:
            self._send_append(peer, now)

    def _send_append(self, peer: str, now: float, heartbeat: bool = False) -> None:
        pr = self._progress[peer]
        if pr.state is ProgressState.SNAPSHOT:
            if heartbeat:
                self._send_snapshot_chunk(peer, pr, now)
            return
        if pr.next_index <= self.snap_index:
            pr.become_snapshot(now)
            self._send_snapshot_chunk(peer, pr, now)
            return
        if pr.state is ProgressState.PROBE:
            if pr.probe_sent and not heartbeat:
                return
            pr.probe_sent = True
            self._send_entries(peer, pr, pr.next_index)
            return
        if pr.next_index <= self.last_index and len(pr.inflight) < self.config.inflight_appends_max:
            self._send_entries(peer, pr, pr.next_index)
        elif heartbeat:
            # empty append at a point the follower is known to match
            prev_term = self.term_at(pr.match_index)
            if prev_term is None:
                pr.become_snapshot(now)
                self._send_snapshot_chunk(peer, pr, now)
                return
            self._send(peer, AppendEntries(
                self.term, self.node_id, pr.match_index, prev_term, (),
                min(self.commit_index, pr.match_index), self._read_seq,
            ))  # fmt: skip

    def _send_entries(self, peer: str, pr: Progress, next_index: int) -> None:
        prev = next_index - 1
        prev_term = self.term_at(prev)
        assert prev_term is not None
        count_max = self.config.entries_per_append_max
        if self._frozen_at:
            count_max = max(0, min(count_max, self._frozen_at - prev))
        entries = self.entries_from(next_index, count_max, self.config.append_bytes_max)
        self._send(peer, AppendEntries(
            self.term, self.node_id, prev, prev_term, tuple(entries), self.commit_index,
            self._read_seq,
        ))  # fmt: skip
        if entries and pr.state is ProgressState.REPLICATE:
            pr.next_index = entries[-1].index + 1
            pr.inflight.append(entries[-1].index)

    def _on_append(self, sender: str, msg: AppendEntries, now: float) -> None:
        if self.role is not Role.FOLLOWER or self.leader_id != sender:
            self._become_follower(self.term, sender, now)
        self._last_heard_leader = now
        prev, prev_term, entries = msg.prev_index, msg.prev_term, msg.entries
        if prev < self.snap_index:  # the part we compacted is committed, hence matching
            entries = tuple(e for e in entries if e.index > self.snap_index)
            prev, prev_term = self.snap_index, self.snap_term
            if entries and entries[0].index != prev + 1:
                entries = ()
        if prev > self.last_index or self.term_at(prev) != prev_term:
            hint = self._conflict_hint(prev)
            self._send(sender, self._append_reply(False, hint, msg.read_seq))
            return
        new_entries: list[Entry] = []
        for i, e in enumerate(entries):
            if e.index > self.last_index:
                new_entries = list(entries[i:])
                break
            if self.term_at(e.index) != e.term:
                if e.index <= self.commit_index:
                    # No leader of this term can contradict a committed entry (Leader
                    # Completeness): forged or misrouted input. Refuse it whole.
                    return
                self._truncate(e.index)
                new_entries = list(entries[i:])
                break
        if new_entries:
            self._append(new_entries)
        matched = max(prev + len(entries), self.snap_index)
        commit = min(msg.commit_index, matched)
        if commit > self.commit_index:
            self.commit_index = commit
        self._send(sender, self._append_reply(True, matched, msg.read_seq))

    def _append_reply(self, success: bool, match_index: int, read_seq: int) -> AppendReply:
        return AppendReply(self.term, self.node_id, success, match_index, read_seq, self.voter,
                           "" if self.voter and self.node_id in self._voters
                           else self.config.incarnation)

    def _conflict_hint(self, prev: int) -> int:
        """Where the leader should retry after our log failed to match at ``prev``: our
        end if we are short, else before the whole run of the conflicting term."""
        if prev > self.last_index:
            return self.last_index
        conflict_term = self.term_at(prev)
        i = prev
        while i - 1 > max(self.commit_index, self.snap_index) and self.term_at(i - 1) == conflict_term:
            i -= 1
        return i - 1

    def _on_append_reply(self, sender: str, msg: AppendReply, now: float) -> None:
        pr = self._progress.get(sender)
        if self.role is not Role.LEADER or pr is None:
            return
        pr.last_ack = now
        pr.voter = msg.voter
        if msg.incarnation:
            pr.incarnation = msg.incarnation
        if msg.read_seq > pr.read_ack:
            pr.read_ack = msg.read_seq
            self._confirm_reads()
        if msg.success:
            if pr.acknowledge(msg.match_index, now):
                self._maybe_commit()
                if self.role is not Role.LEADER:
                    return  # we committed our own removal and stepped down
                if self._transfer_to == sender:
                    self._maybe_send_timeout_now()
            if pr.state is ProgressState.PROBE or (
                pr.state is ProgressState.SNAPSHOT and pr.match_index >= self.snap_index
            ):
                pr.become_replicate(now)
            self._send_append(sender, now)
        elif pr.state is not ProgressState.SNAPSHOT and msg.match_index < pr.next_index:
            pr.reject(msg.match_index, now)
            self._send_append(sender, now)

    def _maybe_commit(self) -> None:
        voters = self._voters
        own = [self._persisted] if self.node_id in voters else []
        matches = sorted(
            own + [pr.match_index for p, pr in self._progress.items() if pr.voter and p in voters],
            reverse=True,
        )
        if len(matches) < self._quorum:
            return  # not enough voters heard from yet
        candidate = matches[self._quorum - 1]
        if candidate > self.commit_index and self.term_at(candidate) == self.term:
            self.commit_index = candidate
            if self._reads_waiting:
                self._confirm_reads()
            if self.node_id not in voters and not self.change_pending():
                # our removal is committed: a leader outside the voters steps down,
                # handing over to a caught-up voter so nobody waits for an election
                self.transfer_leadership("", self._now)
                self._become_follower(self.term, "", self._now)

    # ------------------------------------------------------------------ reads

    def _start_read_round(self) -> None:
        self._read_seq += 1
        for token, index in self._reads_unsent:
            self._reads_waiting.append((token, index, self._read_seq))
        self._reads_unsent.clear()
        for peer in self._progress:
            prev_term = self.term_at(self._progress[peer].match_index)
            pr = self._progress[peer]
            if prev_term is None:
                continue
            self._send(peer, AppendEntries(
                self.term, self.node_id, pr.match_index, prev_term, (),
                min(self.commit_index, pr.match_index), self._read_seq,
            ))  # fmt: skip
        self._confirm_reads()

    def _confirm_reads(self) -> None:
        if self.term_at(self.commit_index) != self.term:
            return  # nothing of our term committed yet: our commit index may be stale
        voters = self._voters
        own = [self._read_seq] if self.node_id in voters else []
        acks = sorted(
            own + [pr.read_ack for p, pr in self._progress.items() if pr.voter and p in voters],
            reverse=True,
        )
        if len(acks) < self._quorum:
            return
        confirmed_seq = acks[self._quorum - 1]
        keep: list[tuple[object, int, int]] = []
        for token, index, seq in self._reads_waiting:
            if seq <= confirmed_seq:
                self._reads_ready.append((token, max(index, self._noop_index)))
            else:
                keep.append((token, index, seq))
        self._reads_waiting = keep

    # ------------------------------------------------------------------ snapshots

    def _send_snapshot_chunk(self, peer: str, pr: Progress, now: float) -> None:
        size = self.config.snapshot_chunk_bytes
        blob = self._snap_wire  # the configuration travels with it
        chunk = blob[pr.snapshot_offset : pr.snapshot_offset + size]
        done = pr.snapshot_offset + len(chunk) >= len(blob)
        pr.snapshot_sent_at = now
        self._send(peer, InstallSnapshot(
            self.term, self.node_id, self.snap_index, self.snap_term, pr.snapshot_offset,
            done, bytes(chunk),
        ))  # fmt: skip

    def _on_snapshot(self, sender: str, msg: InstallSnapshot, now: float) -> None:
        if self.role is not Role.FOLLOWER or self.leader_id != sender:
            self._become_follower(self.term, sender, now)
        self._last_heard_leader = now
        if msg.last_index <= self.commit_index:
            # we already hold everything it contains; committed entries match the leader
            self._send(sender, self._append_reply(True, self.commit_index, 0))
            return
        key = (msg.last_index, msg.last_term)
        if msg.offset == 0:
            self._incoming, self._incoming_data = key, bytearray()
        if self._incoming != key or msg.offset != len(self._incoming_data):
            expected = len(self._incoming_data) if self._incoming == key else 0
            self._send(sender, SnapshotReply(self.term, self.node_id, msg.last_index, expected, False))
            return
        if len(self._incoming_data) + len(msg.data) > self.config.snapshot_bytes_max:
            self._incoming, self._incoming_data = None, bytearray()
            return
        self._incoming_data += msg.data
        offset = len(self._incoming_data)
        if msg.done:
            self._install_snapshot(msg.last_index, msg.last_term, bytes(self._incoming_data))
            self._incoming, self._incoming_data = None, bytearray()
        self._send(sender, SnapshotReply(self.term, self.node_id, msg.last_index, offset, True))

    def _install_snapshot(self, index: int, term: int, blob: bytes) -> None:
        """Replace our state by the leader's snapshot; our whole log is discarded."""
        try:
            conf, _state = mship.unwrap_snapshot(blob)
        except RemoteProtocolError:
            return  # a malformed configuration: refuse the snapshot, the leader resends
        self._snap_conf = conf or self.membership
        self._check_admitted(self._snap_conf)
        self._confs = []
        self._apply_membership()
        self._log.clear()
        self.snap_index, self.snap_term, self._snap_wire = index, term, blob
        self.commit_index = max(self.commit_index, index)
        self._delivered = index
        self._persisted = index
        self._unstable_from = index + 1
        self._truncate_from = None
        self._install = (index, term, blob)  # as written to disk: configuration + state

    def _on_snapshot_reply(self, sender: str, msg: SnapshotReply, now: float) -> None:
        pr = self._progress.get(sender)
        if self.role is not Role.LEADER or pr is None or pr.state is not ProgressState.SNAPSHOT:
            return
        pr.last_ack = now
        if msg.last_index != self.snap_index:
            pr.snapshot_offset = 0  # we compacted again meanwhile: start over
        elif msg.success and msg.offset >= len(self._snap_wire):
            pr.match_index = max(pr.match_index, self.snap_index)
            pr.become_probe(now)
            self._maybe_commit()
            self._send_append(sender, now)
            return
        else:
            pr.snapshot_offset = msg.offset
        pr.last_progress = now
        self._send_snapshot_chunk(sender, pr, now)

    # ------------------------------------------------------------------ out

    def _send(self, to: str, msg: PeerMessage) -> None:
        self._messages.append((to, msg))
