"""Elections: how a replica becomes candidate, leader or follower. Pure.

A part of ``Replica`` (``replica.py``); the state is ``replica_state.py``'s. Rules (Raft,
with the changes zkv's design asks for):
- Elections are started by the broker (``campaign``), never by a local timer. A campaign
  first runs a pre-vote at term+1 that changes nobody's state; only a candidate that a
  majority would elect bumps its term, so a node cut off from the group cannot inflate
  terms and depose a healthy leader when it returns.
- Only a voter of the configuration in force whose data dir may vote campaigns: an empty
  data dir, a learner or a removed node must never lead.
- A voter refuses (ignores) any vote while it hears a live leader: it is the leader, or
  it heard one within ``election_timeout``. A campaign request that comes while it
  still hears the leader is kept for an election timeout and started when that lease
  runs out (``Replica.tick``). It refuses a candidate whose log is behind
  its own (last term, then last index). Term and vote are persisted before answering.
- A (pre-)candidate asks the peers that have not granted it again every heartbeat
  interval while its election runs (``ask_again``), with the very same request: Raft
  retries an RPC that got no answer, and a vote is idempotent (a voter grants again the
  candidate it voted for at that term; a pre-vote changes nothing). On a lossy network
  one lost request or reply used to cost the election a whole election timeout.
- A candidate sent by ``TimeoutNow`` (leadership transfer, ``replica_membership.py``)
  skips the pre-vote and its requests say ``transfer``, so voters grant them despite the
  live leader.
- Votes count only from voters of the configuration in force, against its quorum.
- A new leader appends a no-op entry: it commits nothing of an older term directly, so
  it needs an entry of its own term before it can commit (and serve reads).
- Stepping down fails every read pending at the leader (the client retries elsewhere).
- Terms stop at ``TERM_MAX``: a forged term never makes us overflow.
"""

from __future__ import annotations

from zkv.protocol.messages import Role, VoteReply, VoteRequest
from zkv.storage_node.progress import Progress
from zkv.storage_node.replica_state import ReplicaState

#: Terms stop here: the codec refuses integers from 2**63 on, so a term must always have
#: room for +1 below that. Only a forged message could bring a term near it.
TERM_MAX = (1 << 62)


class ReplicaElections(ReplicaState):
    """Campaigns, votes and role changes (see the module docstring)."""

    def campaign(self, now: float, known_term: int = 0) -> None:
        """The broker thinks our leader is gone: start a pre-vote."""
        if not self.voter or self.node_id not in self._voters or self.leaving:
            return  # an empty data dir, a learner, a removed or a stopping node never leads
        if self.role is Role.LEADER or self._prevote:
            return
        if self._in_lease(now):
            # The brokers stopped hearing the leader before our lease on it ran out
            # (they heard its last heartbeat earlier than we heard its last append):
            # stand the moment the lease runs out, not a heartbeat later when the next
            # request comes. Hearing the leader again renews the lease; the request
            # lapses after an election timeout.
            self._campaign_due = (now + self._election_s, known_term)
            return
        self._campaign_due = None
        if known_term >= TERM_MAX or self.term >= TERM_MAX:
            return  # no real cluster gets here; refuse rather than overflow the term
        if self.role is Role.CANDIDATE and now - self._election_started < self._election_s:
            return
        self._now = now
        self._prevote = True
        self._prevote_term = max(self.term, known_term) + 1
        self._votes = {self.node_id}
        self._election_started = now
        self._ask(VoteRequest(
            self._prevote_term, self.node_id, self.last_index, self.last_term, True
        ), now)
        self._check_prevote(now)

    def _ask(self, request: VoteRequest, now: float) -> None:
        self._vote_request, self._vote_asked_at = request, now
        for peer in self._peers:
            self._send(peer, request)

    def ask_again(self, now: float) -> None:
        """A heartbeat after the last ask, while the election runs: ask again the
        peers whose grant has not come (lost on the way, or its reply was)."""
        request = self._vote_request
        if request is None or now - self._vote_asked_at < self._heartbeat_s:
            return
        if not (self._prevote or self.role is Role.CANDIDATE):
            self._vote_request = None
            return
        self._vote_asked_at = now
        for peer in self._peers:
            if peer not in self._votes:
                self._send(peer, request)

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
            self._send(sender, VoteReply(term, self.node_id, grant, True, msg.candidate_id))
            return
        if msg.term > self.term:
            if self._in_lease(now) and not msg.transfer:
                return  # a live leader exists: ignore whole, keep our term
            self._become_follower(msg.term, "", now)
        if msg.term < self.term:
            self._send(sender, VoteReply(self.term, self.node_id, False, False, msg.candidate_id))
            return
        grant = self.voted_for in ("", sender) and self._log_ok(
            msg.last_log_index, msg.last_log_term
        )
        if grant and self.voted_for != sender:
            self.voted_for = sender
            self._hard_state_dirty = True
        self._send(sender, VoteReply(self.term, self.node_id, grant, False, msg.candidate_id))

    def _on_prevote_reply(self, sender: str, msg: VoteReply, now: float) -> None:
        if not self._prevote or (msg.candidate and msg.candidate != self.node_id):
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
        self._ask(VoteRequest(
            self.term, self.node_id, self.last_index, self.last_term, False, transfer
        ), now)
        if self._won():
            self._become_leader(now)

    def _on_vote_reply(self, sender: str, msg: VoteReply, now: float) -> None:
        if self.role is not Role.CANDIDATE or not msg.granted:
            return
        if msg.candidate and msg.candidate != self.node_id:
            return  # a vote for another candidate, delivered here: never ours
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
