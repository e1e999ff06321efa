"""Stopping on SIGTERM without costing the shard an election timeout. Pure.

The shell (``node.py``) and the simulator (``tests/sim``) ask ``GracefulStop.due`` once
per loop turn after the stop was requested; it answers when to exit:

1. First turn: the replica leaves (``Replica.leave``: it never stands again, since it
   would exit mid-term). A leader hands over to its most up-to-date voter (TimeoutNow)
   and waits, up to two election timeouts, to stop leading.
2. Once it does not lead (or the wait ran out, or there was nobody to hand over to):
   one more heartbeat interval, so our last votes, acks and NOT_LEADER replies leave
   before the sockets close (they close with linger 0).
3. Then exit.
"""

from __future__ import annotations

from zkv.protocol.messages import Role
from zkv.storage_node.replica import Replica


class GracefulStop:
    """The stop's timers (see the module docstring); ``now`` is monotonic seconds."""

    def __init__(self, shard_id: int, heartbeat_ms: int, election_timeout_ms: int) -> None:
        self.shard_id = shard_id
        self.heartbeat_s = heartbeat_ms / 1000
        self.election_s = election_timeout_ms / 1000
        self._deadline = 0.0  # a leader waits for its handover until then
        self._exit_at = 0.0  # one heartbeat after we stopped leading

    def due(self, replica: Replica, now: float, notes: list[str]) -> bool:
        """True when the node should exit now; notes what it does (for the log)."""
        if not self._deadline:
            self._deadline = now + 2 * self.election_s
            replica.leave()
            if replica.role is Role.LEADER and replica.transfer_leadership("", now):
                notes.append(f"stopping: handing leadership of shard {self.shard_id} over")
                return False
            self._deadline = now  # nobody to hand over to
        if replica.role is Role.LEADER and now < self._deadline:
            return False
        if not self._exit_at:
            self._exit_at = now + self.heartbeat_s
            return False
        return now >= self._exit_at
