"""What a leader knows of one follower's log (etcd's ``Progress``), pure data.

States:
- PROBE: we do not know where the follower's log matches ours. One append at a time
  (``probe_sent``); each rejection moves ``next_index`` back using the follower's hint.
- REPLICATE: the follower accepted ``match_index``; appends are pipelined optimistically
  (``next_index`` runs ahead of ``match_index``), at most ``inflight_max`` messages.
- SNAPSHOT: the entries the follower needs are compacted away; we stream the snapshot in
  chunks, one chunk in flight (``snapshot_offset`` is the next byte to send).

Invariant: ``match_index < next_index``; ``match_index`` never decreases within a term.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


@dataclass(slots=True)
class Progress:
    next_index: int
    match_index: int = 0
    state: ProgressState = ProgressState.PROBE
    probe_sent: bool = False
    #: last index carried by each in-flight append (REPLICATE), oldest first
    inflight: deque[int] = field(default_factory=deque)
    #: when the follower last answered at our term (check-quorum, read confirmation)
    last_ack: float = 0.0
    #: when match_index last moved, or when we (re)entered this state
    last_progress: float = 0.0
    #: highest read_seq the follower echoed at our term
    read_ack: int = 0
    snapshot_offset: int = 0
    snapshot_sent_at: float = 0.0
    #: the follower's last ack said its data dir may vote; until it has, it counts for
    #: nothing (an empty data dir must not complete a quorum)
    voter: bool = False
    #: the incarnation a non-voter follower reported (promotion records it)
    incarnation: str = ""

    def become_probe(self, now: float) -> None:
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflight.clear()
        self.next_index = self.match_index + 1
        self.last_progress = now

    def become_replicate(self, now: float) -> None:
        self.state = ProgressState.REPLICATE
        self.probe_sent = False
        self.inflight.clear()
        self.next_index = self.match_index + 1
        self.last_progress = now

    def become_snapshot(self, now: float) -> None:
        self.state = ProgressState.SNAPSHOT
        self.probe_sent = False
        self.inflight.clear()
        self.snapshot_offset = 0
        self.snapshot_sent_at = 0.0
        self.last_progress = now

    def acknowledge(self, match_index: int, now: float) -> bool:
        """Record a successful append up to ``match_index``; True if it moved."""
        while self.inflight and self.inflight[0] <= match_index:
            self.inflight.popleft()
        if match_index <= self.match_index:
            return False
        self.match_index = match_index
        self.next_index = max(self.next_index, match_index + 1)
        self.last_progress = now
        return True

    def reject(self, hint_index: int, now: float) -> None:
        """The follower refused an append; its log ends at or before ``hint_index``."""
        old_next = self.next_index
        if hint_index < self.match_index:
            # The follower lost entries it had acknowledged: only possible when its
            # fsync policy is not "always" and it crashed. Start over from its end.
            self.match_index = max(hint_index, 0)
        self.become_probe(now)
        self.next_index = max(self.match_index + 1, min(hint_index + 1, old_next - 1))
