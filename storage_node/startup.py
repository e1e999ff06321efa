"""The shell half of recovery: read the data directory, ask ``recovery.plan_recovery``,
carry the plan out.

Order: read everything (the WAL's torn tail is repaired as it is read; corruption in
the middle of the log raises ``CorruptLogError`` naming file and offset), plan, and only
then change the disk: delete leftover temp files, load the chosen snapshot (one that
passes its checksum yet does not decode is marked damaged and the plan is made again),
restart the WAL after the snapshot if the plan says so. A refusal raises
``RecoveryRefused``; ``zkv-node`` turns it into one error line and a non-zero exit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import Entry
from zkv.storage_node import durable_state, membership, snapshot
from zkv.storage_node.fsync_policy import FsyncPolicy
from zkv.storage_node.recovery import DiskState, Plan, RecoveryRefused, plan_recovery
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.wal import WAL_DIR, WriteAheadLog, segment_name


@dataclass(slots=True)
class Recovered:
    hard_state: durable_state.HardState
    #: (last_index, last_term, data) of the loaded snapshot, for the replica core
    snapshot: tuple[int, int, bytes | snapshot.MappedSnapshot] | None
    entries: list[Entry]
    wal: WriteAheadLog


def read_disk(data_dir: Path, policy: FsyncPolicy) -> tuple[DiskState, WriteAheadLog]:
    """What is on disk, as ``plan_recovery`` takes it (the WAL stays open)."""
    hard: durable_state.HardState | None = None
    problem = ""
    try:
        if (data_dir / durable_state.HARD_STATE_FILE).exists():
            hard = durable_state.load_hard_state(data_dir)
    except durable_state.CorruptStateError as exc:
        problem = str(exc)
    wal, entries = WriteAheadLog.open(data_dir / WAL_DIR, policy)
    first_seg = data_dir / WAL_DIR / segment_name(entries[0].index) if entries else None
    disk = DiskState(data_dir, policy, hard, problem, snapshot.scan_snapshots(data_dir),
                     entries, first_seg, snapshot.temp_files(data_dir))
    return disk, wal


def recover(data_dir: Path, policy: FsyncPolicy, state: KVStateMachine,
            log: Any = logger) -> Recovered:
    """Restore ``state`` from disk and return what the replica core starts from."""
    disk, wal = read_disk(data_dir, policy)
    try:
        plan, data = _plan_and_load(disk, state)
    except BaseException:
        wal.close()
        raise
    for note in plan.notes:
        log.warning("recovery: {}", note)
    for path in plan.remove:
        log.warning("recovery: removing {} (a write cut short)", path)
        path.unlink(missing_ok=True)
    if plan.remove:
        for d in {p.parent for p in plan.remove}:
            durable_state.fsync_directory(d)
    if plan.wal_reset_to is not None:
        wal.reset(plan.wal_reset_to)
    snap = plan.snapshot
    return Recovered(plan.hard_state,
                     None if snap is None else (snap.last_index, snap.last_term, data),
                     list(plan.replay), wal)


def _plan_and_load(disk: DiskState, state: KVStateMachine,
                   ) -> tuple[Plan, bytes | snapshot.MappedSnapshot]:
    """Plan, and load the chosen snapshot into ``state``; a snapshot that turns out bad
    while loading is marked damaged and the plan made again."""
    for _ in range(len(disk.snapshots) + 1):
        plan = plan_recovery(disk)
        if not isinstance(plan, Plan):
            raise RecoveryRefused(plan)
        if plan.snapshot is None:
            return plan, b""
        loaded = snapshot.load_snapshot_file(plan.snapshot)
        problem, offset = (loaded, 0) if isinstance(loaded, str) else ("", 0)
        if isinstance(loaded, snapshot.Snapshot):
            try:
                # the file holds the configuration at its index, then the state
                state.restore(membership.snapshot_state(loaded.data))  # nothing copied
                # the core keeps the file mapped, not the bytes (they go once restored)
                return plan, snapshot.mapped_or_bytes(disk.data_dir, loaded.last_index,
                                                      loaded.data)
            except RemoteProtocolError as exc:
                problem, offset = f"does not decode: {exc}", snapshot.HEADER_BYTES
        bad = dataclasses.replace(plan.snapshot, problem=problem, problem_offset=offset)
        disk = dataclasses.replace(disk, snapshots=tuple(
            bad if s.path == bad.path else s for s in disk.snapshots))
    raise RuntimeError("recovery did not settle: each pass marks one more snapshot damaged")
