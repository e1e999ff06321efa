"""Recovery: what a storage node restarts from, decided over what it found on disk. Pure.

The shell reads the data directory (``hardstate``, every ``snap/*.snap`` with whether it
is intact, the WAL's records after torn-tail repair, leftover temp files) into a
``DiskState``; ``plan_recovery`` returns either a ``Plan`` (the snapshot to load, the log
entries to replay, whether the WAL must restart after the snapshot, the files to delete)
or a ``Refusal`` naming the file, the byte offset and the repair. No I/O, no clock here:
a unit test walks every state a crash or power loss can leave, per fsync policy.

What a crash or power loss can leave (the files are written so that):
- ``hardstate`` is replaced atomically and fsynced under every policy, before any entry
  or vote that depends on it; a leftover ``*.tmp`` is a write cut short: delete it.
- A ``*.snap`` is complete unless the disk damaged it (tmp, fsync, rename, fsync dir); a
  ``*.snap.tmp`` is a snapshot cut short: delete it. The WAL is compacted only up to the
  older kept snapshot, so falling back past a damaged newest one can meet the log.
- The WAL loses its unsynced tail (``interval``, ``never``): it may end *before* the
  newest snapshot (item 4 of issue 10). The snapshot covers those entries, so the
  records below it are simply not needed and the WAL restarts after the snapshot.
- After InstallSnapshot the WAL is emptied and restarts after the snapshot: then the
  snapshot is the only copy of everything up to its index.

Rules:
1. ``known`` = the highest index the node ever held durably: its WAL's last record or
   its newest snapshot file, intact or not. Recovery must reach ``known`` from an intact
   snapshot (or from index 0) plus a WAL contiguous with it; anything less means state
   the node had is gone beyond what its fsync policy allows (a damaged snapshot the WAL
   no longer covers, a missing range), and a replica that forgot entries must never
   vote or acknowledge as if whole (invariant 7): refuse, naming the damaged file.
   The unsynced tail that ``interval``/``never`` may lose is lost *before* ``known`` is
   computed (it is simply not on disk), so such a node rejoins on its own.
2. The newest intact snapshot that reaches ``known`` wins; older ones are fallbacks.
3. WAL records up to the snapshot are not replayed. If the WAL ends before the
   snapshot, or holds the snapshot's index at another term (a crash between installing
   a leader's snapshot and emptying the log: those records are another history, and
   Raft's InstallSnapshot rule discards the whole log then), the WAL restarts at
   ``snapshot + 1``; otherwise appends continue it.
4. A ``hardstate`` that does not decode, or that is missing (or older than the log's
   terms) while the node holds entries, is a lost vote: refuse. An empty data directory
   is a first start (identity files, and refusing a *wiped* directory, belong to the
   membership work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zkv.protocol.messages import Entry
from zkv.storage_node.durable_state import HARD_STATE_FILE, HardState
from zkv.storage_node.fsync_policy import FsyncPolicy

REPAIR_LOST = (
    "this replica's state is gone beyond what its fsync policy allows, so it must not "
    "vote or acknowledge as if whole: move its data directory aside (keep it for "
    "diagnosis) and re-add the replica empty, so that it rebuilds from its peers' "
    "snapshot while the other replicas are a healthy majority"
)


@dataclass(frozen=True, slots=True)
class SnapshotFile:
    """One ``*.snap`` found on disk; ``problem`` is empty when it is intact."""

    path: Path
    last_index: int
    last_term: int = 0
    problem: str = ""
    problem_offset: int = 0


@dataclass(frozen=True, slots=True)
class DiskState:
    """Everything recovery decides over, as the shell read it."""

    data_dir: Path
    policy: FsyncPolicy
    #: ``None``: no ``hardstate`` file
    hard_state: HardState | None
    #: ``hardstate`` exists but does not decode (then ``hard_state`` is ``None``)
    hard_state_problem: str = ""
    snapshots: tuple[SnapshotFile, ...] = ()
    #: the WAL's records after torn-tail repair, in order and contiguous
    entries: Sequence[Entry] = ()
    #: the first segment file (named in a refusal about a hole before it)
    wal_first_segment: Path | None = None
    temp_files: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    snapshot: SnapshotFile | None
    #: entries after the snapshot, to hand to the replica core
    replay: Sequence[Entry]
    #: restart the (emptied) WAL at this index before any append; ``None``: continue it
    wal_reset_to: int | None
    hard_state: HardState
    remove: tuple[Path, ...] = ()
    #: what recovery had to decide, for the log (WARNING)
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Refusal:
    path: Path
    offset: int
    reason: str
    repair: str = REPAIR_LOST

    def message(self) -> str:
        return (f"cannot recover from {self.path} at byte offset {self.offset}: "
                f"{self.reason}. To repair: {self.repair}.")


class RecoveryRefused(RuntimeError):
    """The node must not start on what is on disk; ``refusal`` says where and how to repair."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message())
        self.refusal = refusal


def plan_recovery(disk: DiskState) -> Plan | Refusal:
    """Decide what to restart from; see the module docstring for the rules."""
    hard_path = disk.data_dir / HARD_STATE_FILE
    if disk.hard_state_problem:
        return Refusal(hard_path, 0, f"the term and vote do not decode ({disk.hard_state_problem})")
    entries = disk.entries
    if disk.hard_state is None and (entries or disk.snapshots):
        return Refusal(hard_path, 0, "the term and vote file is missing while the node "
                       "holds log entries or snapshots (its vote is forgotten)")
    hard = disk.hard_state or HardState()
    wal_last = entries[-1].index if entries else 0
    snap_known = max([0, *(s.last_index for s in disk.snapshots)])
    known = max(wal_last, snap_known)
    intact = sorted((s for s in disk.snapshots if not s.problem),
                    key=lambda s: s.last_index, reverse=True)
    notes: list[str] = []
    for snap in [*intact, None]:
        plan = _plan_from(disk, snap)
        if plan is None:
            continue
        reach = plan.replay[-1].index if plan.replay else (snap.last_index if snap else 0)
        # a WAL of another history than the snapshot's is discarded whole (rule 3)
        superseded = snap is not None and plan.wal_reset_to is not None
        if reach < (snap_known if superseded else known):
            continue
        last_term = plan.replay[-1].term if plan.replay else (snap.last_term if snap else 0)
        if hard.term < last_term:
            return Refusal(hard_path, 0, f"the persisted term {hard.term} is older than the "
                           f"log's last term {last_term} (the vote file was lost or replaced)")
        notes.extend(_damage_notes(disk, snap))
        if plan.wal_reset_to is not None and entries:
            notes.append(f"the WAL ({entries[0].index}..{wal_last}) does not continue snapshot "
                         f"{snap.last_index if snap else 0}: its records are not needed; "
                         f"it restarts at {plan.wal_reset_to}")
        return Plan(plan.snapshot, plan.replay, plan.wal_reset_to, hard, disk.temp_files,
                    tuple(notes))
    return _refuse_uncovered(disk, intact, known)


def _plan_from(disk: DiskState, snap: SnapshotFile | None) -> Plan | None:
    """Snapshot ``snap`` (``None``: index 0) plus the WAL records after it; ``None`` if
    the WAL starts after ``snap + 1`` (a hole)."""
    entries = disk.entries
    base = snap.last_index if snap else 0
    hard = disk.hard_state or HardState()
    if not entries:
        return Plan(snap, (), None, hard)
    first, last = entries[0].index, entries[-1].index
    if first > base + 1:
        return None
    if last < base or (snap is not None and base >= first
                       and entries[base - first].term != snap.last_term):
        return Plan(snap, (), base + 1, hard)
    return Plan(snap, entries[base + 1 - first :], None, hard)


def _damage_notes(disk: DiskState, chosen: SnapshotFile | None) -> list[str]:
    base = chosen.last_index if chosen else 0
    return [f"snapshot {s.path} is damaged ({s.problem}); the log still covers it from "
            f"{'snapshot ' + str(base) if chosen else 'index 1'}"
            for s in disk.snapshots if s.problem]


def _refuse_uncovered(disk: DiskState, intact: list[SnapshotFile], known: int) -> Refusal:
    """No intact snapshot plus the WAL reaches ``known``: name what was lost."""
    damaged = sorted((s for s in disk.snapshots if s.problem), key=lambda s: s.last_index)
    best = intact[0].last_index if intact else 0
    for s in reversed(damaged):
        if s.last_index > best:
            wal = (f"the log holds {disk.entries[0].index}..{disk.entries[-1].index}"
                   if disk.entries else "the log is empty")
            return Refusal(s.path, s.problem_offset,
                           f"snapshot {s.last_index} is damaged ({s.problem}) and nothing "
                           f"else covers entries {best + 1}..{s.last_index} ({wal}, newest "
                           f"intact snapshot: {best or 'none'})")
    first = disk.entries[0].index if disk.entries else known + 1
    path = disk.wal_first_segment or disk.data_dir / "wal"
    return Refusal(path, 0, f"the log starts at index {first} but the newest intact "
                   f"snapshot ends at {best}: entries {best + 1}..{first - 1} are missing")
