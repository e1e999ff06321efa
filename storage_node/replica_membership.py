"""Membership and leadership transfer, as the replica applies them. Pure.

A part of ``Replica`` (``replica.py``); the state is ``replica_state.py``'s. The rules of
single-server changes through the log, and why, are in ``membership.py``; here:
- The configuration in force is the latest in the log, committed or not (the snapshot's
  when the log holds none); quorums are majorities of its voters; learners replicate but
  never vote or count; a node outside the voters never campaigns; a leader removed by a
  committed configuration steps down (``replica_replication.py``).
- A leader proposes a change only once it has committed an entry of its term and no
  other change is pending, and (etcd's strict reconfiguration check) a change that
  removes a voter only while the healthy voters left are a quorum of the new
  configuration (``_unhealthy_removal``). It drives changes itself on ``tick``: it finishes a
  replacement (removes the old node once the new one votes and its acks count),
  readmits a voter whose data dir came back empty, and promotes a learner within
  ``promote_lag_max`` of its log, but only while the voters whose acks count (their
  data dirs vote) would be a quorum with it: until the learner sees its promotion it
  counts for nothing, and should the leader fall before then, a configuration whose
  counting voters are no quorum could never elect another (re-admit first).
- A configuration that admits this data dir's incarnation makes this node a voter
  (``promoted``); it then counts a vote as given in the current term, since an empty
  data dir forgot any vote its predecessor gave.
- Leadership transfer (``transfer_leadership``): once the target's log matches ours the
  leader sends it ``TimeoutNow`` and replicates nothing newer (a voter holding more than
  the target would refuse it its vote); it campaigns at once (``replica_elections.py``).
  A transfer that does not complete within ``election_timeout`` is given up.
- A stopping node (``leave``, on SIGTERM) never stands again and ignores TimeoutNow:
  its campaign could only depose the voter it handed over to, or win and then leave
  the shard leaderless. Its heartbeats say ``leaving``, and ``handed_to`` while its
  target's transfer election may run, so brokers neither ask it nor race the target.
"""

from __future__ import annotations

from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import Entry, Role, TimeoutNow
from zkv.storage_node import membership as mship
from zkv.storage_node.membership import (
    Membership,
    MembershipBusy,
    MembershipError,
    MembershipUnhealthy,
)
from zkv.storage_node.progress import Progress
from zkv.storage_node.replica_state import ReplicaState


class ReplicaMembership(ReplicaState):
    """Configuration tracking, changes, promotion and transfer (module docstring)."""

    @property
    def membership(self) -> Membership:
        """The configuration in force: the latest in the log, committed or not."""
        return self._confs[-1][1] if self._confs else self._snap_conf

    def committed_membership(self) -> tuple[int, Membership]:
        """(index, configuration) of the latest configuration known to be committed: the
        one whose member keys are trusted (``node_sockets.py``). The snapshot's counts at
        the snapshot's index, which orders it correctly against any other (issue 12)."""
        for i, c in reversed(self._confs):
            if i <= self.commit_index:
                return i, c
        return self.snap_index, self._snap_conf

    def membership_at(self, index: int) -> Membership:
        conf = self._snap_conf
        for i, c in self._confs:
            if i > index:
                break
            conf = c
        return conf

    def _note_configs(self, entries: list[Entry]) -> None:
        found = False
        prefixes = mship.CONFIG_PREFIXES  # mship.is_config inlined: this runs per entry
        for e in entries:
            if e.data[:2] in prefixes:
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
            raise MembershipBusy("no entry of this term committed yet; retry shortly")
        if self.change_pending():
            raise MembershipBusy("a membership change is in progress; retry shortly")
        mship.check_change(self.membership, new)
        unhealthy = self._unhealthy_removal(new, now)
        if unhealthy:
            raise MembershipUnhealthy(unhealthy)
        index = self.propose(mship.encode(new), now)
        assert index is not None
        self._note_configs([self._log[-1]])
        return index

    def reconfiguring(self) -> bool:
        """Leader with membership work for ``_drive_membership``: a learner to promote,
        a replacement to finish, a wiped voter to re-admit. The shell then runs the
        timers every turn (``NodeCore.timers_due``): under load a learner is within
        ``promote_lag_max`` of the log only for moments, right after its acks."""
        if self.role is not Role.LEADER:
            return False
        conf = self.membership
        # or a voter whose data dir came back empty
        return bool(conf.learners or conf.replaces) or not all(map(self._counts, conf.voters))

    def _drive_membership(self, now: float) -> None:
        """Leader: finish replacements, promote learners that caught up."""
        conf = self.membership
        if self.change_pending() or self.term_at(self.commit_index) != self.term:
            return
        for new, old in conf.replaces:
            if new in conf.voters and old in conf.members and self._counts(new):
                target = conf.remove(old)
                if not self._unhealthy_removal(target, now):  # else: wait, as etcd's check
                    self.propose_membership(target, now)
                return
        lag_ok = self.last_index - self.config.promote_lag_max
        for voter in conf.voters:  # a voter slot whose data dir came back empty
            pr = self._progress.get(voter)
            if (pr is not None and not pr.voter and pr.incarnation
                    and pr.match_index >= lag_ok
                    and (voter, pr.incarnation) not in conf.incarnations):
                self.propose_membership(conf.readmit(voter, pr.incarnation), now)
                return
        counting = sum(1 for v in conf.voters if self._counts(v))
        if any(not self._counts(v) and self._heard_lately(v, now) for v in conf.voters):
            return  # a wiped voter is catching up: re-admit it (above) before promoting
        if counting + 1 < (len(conf.voters) + 1) // 2 + 1:
            return  # with the learner promoted, those that count would be no quorum
        for learner in conf.learners:
            pr = self._progress.get(learner)
            if pr is None or not pr.incarnation:
                continue
            if pr.match_index >= self.last_index - self.config.promote_lag_max:
                self.propose_membership(conf.promote(learner, pr.incarnation), now)
                return

    def _unhealthy_removal(self, new: Membership, now: float) -> str:
        """etcd's strict reconfiguration check: why a change that removes a voter would
        leave the shard unable to commit ("" when it would not). The voters left that are
        healthy (this leader, and those whose data dirs vote and that acked within an
        election timeout) must be a quorum of the new configuration: removing a healthy
        voter while another is down could otherwise leave fewer than a majority alive,
        and no rule could undo it."""
        removed = sorted(set(self.membership.voters) - set(new.voters))
        if not removed:
            return ""
        healthy = [v for v in new.voters
                   if v == self.node_id or (self._counts(v) and self._heard_lately(v, now))]
        if len(healthy) >= new.quorum:
            return ""
        return (f"removing {', '.join(removed)} would leave {len(healthy)} healthy of "
                f"{len(new.voters)} voters, fewer than a quorum ({new.quorum}): bring "
                "the others back first (or replace-replica, which adds before it removes); "
                "retry shortly")

    def _heard_lately(self, voter: str, now: float) -> bool:
        """Leader: ``voter`` acked within an election timeout (alive, reachable)."""
        pr = self._progress.get(voter)
        return pr is not None and pr.last_ack > 0 and now - pr.last_ack < self._election_s

    def _counts(self, voter: str) -> bool:
        """Leader: whether ``voter``'s acks count (its data dir votes): a replaced voter
        is removed only then, so the quorum never leans on a node that cannot answer."""
        pr = self._progress.get(voter)
        return voter == self.node_id or (pr is not None and pr.voter)

    # ------------------------------------------------------------------ leadership transfer

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

    def leave(self) -> None:
        """This node is stopping: it never stands for election again. A node that won
        and then exited would leave its shard leaderless until its voters' leases on
        it ran out (an election timeout); worse, its campaign could depose the voter it
        just handed leadership to. TimeoutNow is ignored too; votes are still given."""
        self.leaving = True

    @property
    def handed_to(self) -> str:
        """The voter we sent TimeoutNow to, while its transfer election may be running
        (we no longer lead, and no term after that election's has begun); else "".
        Heartbeats carry it, so a broker that hears us step down waits for that voter
        instead of starting a competing election (``broker/failure_detector.py``)."""
        target, term = self._handed
        if not target or self.role is Role.LEADER or self.term > term + 1:
            return ""
        return target

    def _maybe_send_timeout_now(self) -> None:
        pr = self._progress.get(self._transfer_to)
        if pr is not None and pr.match_index >= self.last_index:
            self._send(self._transfer_to, TimeoutNow(self.term, self.node_id))
            self._handed = (self._transfer_to, self.term)
            self._transfer_to = ""
            # Replicate nothing newer from here: a voter that received more than the
            # target holds when it campaigns would refuse it its vote. What we append
            # meanwhile is never acknowledged (we step down) and clients retry it.
            self._frozen_at = self.last_index
