"""Snapshots: compaction, and snapshots sent to and installed by followers. Pure.

A part of ``Replica`` (``replica.py``); the state is ``replica_state.py``'s. Rules:
- The shell snapshots the state machine and calls ``compacted``: the log up to that index
  is dropped (only what was already handed out as committed). The snapshot as stored and
  sent is ``membership.wrap_snapshot``: the configuration at its index, then the state,
  so a follower that installs it knows the configuration without the log.
- A follower whose next entry was compacted away gets the snapshot in chunks of
  ``snapshot_chunk_bytes``, one in flight, acked by offset; a lost chunk is resent on the
  heartbeat, a compaction meanwhile restarts the stream from offset 0.
- A follower accepts chunks only in order, for one snapshot at a time, up to
  ``snapshot_bytes_max``; a snapshot it already holds (at or below its commit index) is
  answered as matching. Installing replaces its whole log and configuration; a
  snapshot with a malformed configuration is refused (the leader resends).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import InstallSnapshot, Role, SnapshotReply
from zkv.storage_node import membership as mship
from zkv.storage_node.progress import Progress, ProgressState
from zkv.storage_node.replica_state import ReplicaState

if TYPE_CHECKING:
    from zkv.storage_node.replica import SnapshotData


class ReplicaSnapshots(ReplicaState):
    """Compaction, snapshot streaming and installation (see the module docstring)."""

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

    def snapshot_saved(self, index: int, data: SnapshotData) -> None:
        """The snapshot installed at ``index`` is on disk: stream it to followers from
        ``data`` (the shell's map of the file) instead of the bytes received, which
        are freed. A snapshot that is no longer the newest changes nothing."""
        if index == self.snap_index and len(data) == len(self._snap_wire):
            self._snap_wire = data

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
            # handed over as it is: a copy of a large snapshot would stall the loop
            self._install_snapshot(msg.last_index, msg.last_term, self._incoming_data)
            self._incoming, self._incoming_data = None, bytearray()
        self._send(sender, SnapshotReply(self.term, self.node_id, msg.last_index, offset, True))

    def _install_snapshot(self, index: int, term: int, blob: bytearray) -> None:
        """Replace our state by the leader's snapshot; our whole log is discarded."""
        try:
            conf = mship.snapshot_config(blob)  # the head only: the state is not copied
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
