"""Replication: appends, the commit rule and linearizable reads. Pure.

A part of ``Replica`` (``replica.py``); the state is ``replica_state.py``'s. Rules:
- The leader tracks each follower's ``Progress`` (``progress.py``): PROBE sends one append
  at a time until the follower's log matches, REPLICATE pipelines up to
  ``inflight_appends_max`` batches, SNAPSHOT streams the snapshot (``replica_snapshots.py``)
  to a follower that needs compacted entries. A heartbeat every ``heartbeat_interval``
  re-probes a follower whose appends stalled.
- A follower takes an append only if its log matches at ``prev``; otherwise it answers
  with a hint (its end, or before the conflicting term's run) so the leader skips back.
  A conflicting uncommitted suffix is truncated; an append contradicting a committed
  entry is refused whole (no real leader sends one).
- The leader commits index N once a majority (itself counted only up to what it has
  persisted) holds N and ``term_at(N) == term``; followers learn the commit index from
  appends, bounded by what the append proved they match.
- A leader that has not heard a majority for ``election_timeout`` steps down
  (check-quorum); a leader whose removal is committed hands over and steps down.
- Linearizable reads (read index): a read arriving at commit index C is given the next
  ``read_seq``; it is safe once a majority echoed that seq at our term (we were still
  leader after it arrived) and we have committed an entry of our term (so C covers
  every write acknowledged by any earlier leader). Reads are batched per ``ready()``
  and the seq rides on appends, so a read round costs one empty append per follower.
"""

from __future__ import annotations

from zkv.protocol.messages import AppendEntries, AppendReply, Entry, Role
from zkv.storage_node.progress import Progress, ProgressState
from zkv.storage_node.replica_state import ReplicaState


class ReplicaReplication(ReplicaState):
    """Appends out and in, acks, commit, and read confirmation (see the module docstring)."""

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
