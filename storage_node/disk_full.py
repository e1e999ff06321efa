"""What a storage node does while its disk is full (issue 10, item 6). Pure.

A full disk used to crash the node at every write (and at every restart, until space
returned). Now a write that finds no space leaves the disk as it was (``wal.py``,
``snapshot.py``, ``durable_state.py`` undo their half-writes) and the node stays up,
*behind on durability*: the replica core has moved on in memory, so the shell keeps
what it could not persist (``Unpersisted``: term and vote, an installed snapshot, a
truncation, entries) and retries it, in that order, until it goes through.

Rules while anything is unpersisted (Raft stays safe because every rule only drops or
weakens messages, which Raft tolerates, and never claims more than is on disk):
- Nothing that promises durable state leaves: no vote, no snapshot ack, no campaign.
  An append ack is clamped to what the disk holds (``success`` with ``match_index`` =
  the durable end: the log matches the leader's up to there, by Log Matching, and it is
  on disk) and sent at most once per heartbeat interval, so the leader keeps hearing
  us (no needless step-down, reads still confirmed) without a resend storm.
- Incoming appends are taken without their entries (a heartbeat that still advances
  the commit index over what we hold), snapshots and vote requests are dropped: the
  backlog cannot grow while the disk is full.
- A leader refuses new writes with ``DISK_FULL`` (the shell's admission); the entries
  already proposed commit on the followers' acks if they have space.
- Once the backlog is written the node is whole again: the leader's next append finds
  where we are and catches us up (from its log, or a snapshot).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from zkv.protocol.messages import (
    AppendEntries,
    AppendReply,
    Entry,
    InstallSnapshot,
    PeerMessage,
    VoteRequest,
)
from zkv.storage_node.durable_state import HardState


@dataclass(slots=True)
class Unpersisted:
    """What the core asked to persist and the disk had no room for, merged in order."""

    hard_state: HardState | None = None
    #: (last_index, last_term, data) of an installed snapshot, then the WAL restarts after it
    snapshot: tuple[int, int, bytes | bytearray] | None = None
    truncate_from: int | None = None
    entries: list[Entry] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.hard_state or self.snapshot or self.truncate_from is not None
                    or self.entries)

    def add(self, hard_state: HardState | None, snapshot: tuple[int, int, bytes | bytearray] | None,
            truncate_from: int | None, entries: list[Entry]) -> None:
        """Merge the next ``Ready``'s persistence after what is already waiting."""
        if hard_state is not None:
            self.hard_state = hard_state  # the newest term and vote supersede the older
        if snapshot is not None:  # an install replaces the whole log
            self.snapshot, self.truncate_from, self.entries = snapshot, None, []
        if truncate_from is not None:
            if self.entries and truncate_from >= self.entries[0].index:
                del self.entries[truncate_from - self.entries[0].index :]
            else:
                self.entries = []
                self.truncate_from = (truncate_from if self.truncate_from is None
                                      else min(self.truncate_from, truncate_from))
        self.entries.extend(entries)


@dataclass(slots=True)
class DiskFullGate:
    """Filters the peer traffic of a node whose disk is full; see the module docstring."""

    reply_interval_s: float
    _last_reply_at: float = float("-inf")

    def incoming(self, msg: PeerMessage) -> PeerMessage | None:
        if type(msg) is AppendEntries:
            return dataclasses.replace(msg, entries=()) if msg.entries else msg
        if type(msg) is InstallSnapshot or type(msg) is VoteRequest:
            return None
        return msg

    def outgoing(self, msg: PeerMessage, durable_index: int, now: float) -> PeerMessage | None:
        if type(msg) is AppendEntries or type(msg) is InstallSnapshot:
            return msg  # a leader's own sends promise nothing about its disk
        if type(msg) is not AppendReply or now - self._last_reply_at < self.reply_interval_s:
            return None
        self._last_reply_at = now
        if msg.success and msg.match_index > durable_index:
            return dataclasses.replace(msg, match_index=durable_index)
        return msg
