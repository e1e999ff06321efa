"""When a node snapshots its state, and what it does once the snapshot is on disk.

A mixin of ``NodeCore``. Rules: a snapshot falls due every ``snapshot_entries`` applied
entries or ``snapshot_bytes`` applied bytes, never while a write waits for the disk,
and one at a time (``begin_snapshot`` until ``compacted`` or ``snapshot_failed``). The
state is serialized by ``snapshot_data``, at the applied index, with the configuration
in force there; the shell does it in the loop (``take_snapshot``) or in a forked child
(``snapshot_child.py``). ``compacted`` lets the replica drop its log up to the snapshot;
one that lands after a newer snapshot was installed from the leader changes nothing.

A snapshot installed from the leader is decoded a slice per loop turn
(``SnapshotLoader``, called from ``tick``), never in one go: a large one would stop
the loop for seconds. Meanwhile the replica goes on (appends are persisted and
acknowledged: an ack promises the log, not the state machine), the committed entries
wait in ``install_backlog`` and are applied, in order, once the new state is adopted;
reads wait for them as they wait for any apply. A newer install replaces one still
loading (the backlog is all below the newer snapshot: it covers those entries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zkv.storage_node import membership as mship
from zkv.storage_node.snapshot_loader import SnapshotLoader

if TYPE_CHECKING:
    from zkv.storage_node.node_requests import NodeCoreConfig
    from zkv.storage_node.replica import Replica
    from zkv.storage_node.state_machine import KVStateMachine


@dataclass(frozen=True, slots=True)
class SnapshotTask:
    """Write this snapshot, then call ``NodeCore.compacted`` with it."""

    index: int
    term: int
    data: bytes


class SnapshotDecisions:
    """Snapshot methods of ``NodeCore`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: NodeCoreConfig
        replica: Replica
        state: KVStateMachine
        last_snapshot_index: int
        log_bytes: int
        unpersisted: bool
        snapshot_running: bool
        notes: list[str]
        #: the leader's snapshot being decoded (index, loader), and what committed since
        installing: tuple[int, SnapshotLoader] | None
        install_backlog: list[Any]

        def _apply(self, committed: list[Any]) -> None: ...

    def begin_install(self, index: int, blob: Any) -> None:
        """The replica installed the leader's snapshot at ``index`` (persisted): decode
        its state from the next ``tick`` on, a slice per turn."""
        self.installing = (index, SnapshotLoader(mship.snapshot_state(blob)))
        self.install_backlog = []  # all at or below ``index``: the snapshot covers them
        self.last_snapshot_index = index
        self.log_bytes = 0
        self.notes.append(f"installing snapshot at index {index} from the leader")

    def install_step(self) -> None:
        """Decode the next slice of the snapshot being installed; when it is whole,
        adopt it and apply what committed meanwhile."""
        assert self.installing is not None
        index, loader = self.installing
        if not loader.step(self.config.install_records_per_step):
            return
        self.state.adopt(loader.fmt, loader.applied, loader.table, loader.rest)
        self.installing = None
        backlog, self.install_backlog = self.install_backlog, []
        self.notes.append(f"installed snapshot at index {index} from the leader "
                          f"({len(loader.table)} keys; {len(backlog)} entries committed "
                          "meanwhile)")
        if backlog:
            self._apply(backlog)

    def take_snapshot(self) -> SnapshotTask | None:
        """A snapshot to write, every ``snapshot_entries`` applied entries or
        ``snapshot_bytes`` applied bytes; none while a write waits for the disk. The
        state is serialized here, in the loop: ``begin_snapshot`` + ``snapshot_data``
        let a shell do that part elsewhere (a forked child, ``node_disk.py``)."""
        due = self.begin_snapshot()
        if due is None:
            return None
        return SnapshotTask(*due, self.snapshot_data(due[0]))

    def begin_snapshot(self) -> tuple[int, int] | None:
        """``(index, term)`` of the snapshot to take now (the state as applied), or None:
        not due yet, a write waits for the disk, or one is still being written (until
        ``compacted`` or ``snapshot_failed``)."""
        applied = self.state.applied_index
        if self.snapshot_running or self.unpersisted or self.installing is not None or (
                applied - self.last_snapshot_index < self.config.snapshot_entries
                and self.log_bytes < self.config.snapshot_bytes):
            return None
        term = self.replica.term_at(applied)
        if term is None:
            return None
        self.snapshot_running = True
        self.log_bytes = 0  # what is applied from now on counts towards the next one
        return applied, term

    def snapshot_data(self, index: int) -> bytes:
        """The snapshot at ``index``, which must be the applied index: the configuration
        at ``index`` travels and is stored with the state."""
        if index != self.state.applied_index:
            raise ValueError(f"snapshot at {index}, but the state is at {self.state.applied_index}")
        return mship.wrap_snapshot(self.replica.membership_at(index), self.state.snapshot_bytes())

    def snapshot_failed(self) -> None:
        """The snapshot begun could not be written (no space): ``begin_snapshot`` may
        offer one again."""
        self.snapshot_running = False

    def compacted(self, task: SnapshotTask, kept: Any = None) -> None:
        """``task`` is on disk: the replica may drop its log up to it. ``kept`` is what
        the replica holds as its snapshot from now on (the shell's read-only map of the
        file, so the bytes need not stay in memory); ``task.data`` when None. A task
        older than the snapshot the replica holds (one installed from the leader while
        this one was written) changes nothing."""
        self.snapshot_running = False
        self.replica.compacted(task.index, task.term, task.data if kept is None else kept)
        self.last_snapshot_index = max(self.last_snapshot_index, task.index)
