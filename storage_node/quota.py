"""The data quota (``--max-data-bytes``, like Redis ``maxmemory`` or etcd's quota). Pure.

Usage is the bytes of keys plus values a shard holds (``KVStateMachine.data_bytes``,
kept exact as keys change). A put or CAS that would *grow* usage past the quota is
refused with ``QUOTA_EXCEEDED``; deletes, shrinking or same-size overwrites, reads, and
ring/migration commands are always admitted, so an operator can always free space and
rebalance a full shard.

Where the decision is taken, and why there: **at the leader's admission, before the
write enters the log**. Apply-time rejection would be deterministic only if every
replica held the same quota, and ``--max-data-bytes`` is a per-node flag: a replica
with a smaller quota would refuse at apply what the others applied, and the replicas
would diverge for good. A write refused at admission never reaches the log, so every
replica applies the same log whatever its flag; the only per-node effect is *which*
node's quota is in force (the leader's), as with ``--value-bytes-max``. Set the same
quota on every replica of a shard.

Exactness: writes admitted but not applied yet (a group-commit batch in flight) are
counted by their worst-case growth (``proposed``/``applied``), so a burst of concurrent
puts cannot overshoot the quota; a leader change forgets them (``clear``), which can only
under-count growth that the new leader's applied state then shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def write_growth_bytes(key: bytes, value: bytes, current: tuple[bytes, int] | None) -> int:
    """How much a put/CAS of ``value`` at ``key`` grows usage if it applies."""
    if current is None:
        return len(key) + len(value)
    return len(value) - len(current[0])


@dataclass(slots=True)
class Quota:
    max_data_bytes: int = 0  # 0: unlimited
    #: log index -> worst-case growth of an admitted write not applied yet
    _pending: dict[int, int] = field(default_factory=dict)
    _pending_bytes: int = 0

    def refusal(self, used_bytes: int, growth_bytes: int) -> str:
        """Why a write growing usage by ``growth_bytes`` is refused ("" = admitted)."""
        if not self.max_data_bytes or growth_bytes <= 0:
            return ""
        after = used_bytes + self._pending_bytes + growth_bytes
        if after <= self.max_data_bytes:
            return ""
        return (f"this write would bring the shard to {after} bytes of keys and values, "
                f"over its quota of {self.max_data_bytes} (--max-data-bytes); deletes and "
                f"reads still work")

    def proposed(self, index: int, growth_bytes: int) -> None:
        if self.max_data_bytes and growth_bytes > 0:
            self._pending[index] = growth_bytes
            self._pending_bytes += growth_bytes

    def applied(self, index: int) -> None:
        if self._pending:
            self._pending_bytes -= self._pending.pop(index, 0)

    def clear(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0
