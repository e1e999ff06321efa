"""Restart from a SimDisk through the production recovery plan (``startup.py``'s order).

What the real shell does with files, this does with a ``DiskImage``: read the WAL (a
record cut short at the tail is judged by the production record reader,
``wal_records.read_record`` / ``valid_record_after``: dropped as a torn tail, taken if
it reads whole, corruption if a valid record follows), describe the snapshots and temp
files as ``recovery.DiskState``, ask ``recovery.plan_recovery`` (pure, production) and
carry the plan out: remove the temp files, restart the WAL after the snapshot when told.
A ``Refusal`` comes back as is: the node does not start (``zkv-node`` exits non-zero),
and ``faults.py`` plays the operator who follows its repair.

Then the identity (``identity.decide_start``, production): a data dir that recorded a
voter stays one; an empty one is a new incarnation that waits, a non-voter, until a
leader re-admits it (``replica_membership.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.sim.disk import DiskImage, SimDisk
from zkv.protocol.messages import Entry
from zkv.storage_node import identity
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.fsync_policy import FsyncPolicy
from zkv.storage_node.recovery import DiskState, Plan, Refusal, SnapshotFile, plan_recovery
from zkv.storage_node.snapshot import HEADER_BYTES, SNAP_DIR, snapshot_name
from zkv.storage_node.wal import WAL_DIR, segment_name
from zkv.storage_node.wal_records import read_record, valid_record_after

CLUSTER_ID = "sim"


@dataclass(slots=True)
class Restarted:
    hard_state: HardState
    snapshot: tuple[int, int, bytes] | None
    entries: list[Entry]
    identity: identity.Identity
    notes: list[str]
    #: a torn record was dropped from the WAL's tail
    torn: bool = False


def data_dir(node_id: str) -> Path:
    return Path("/sim") / node_id


def read_wal(img: DiskImage, where: Path) -> list[Entry] | Refusal:
    """The WAL's entries after torn-tail repair (``wal_records.scan_segment``'s rules)."""
    entries = list(img.log)
    torn = img.torn_tail
    if not torn:
        return entries
    expected = img.wal_next
    _size, parsed, reason = read_record(torn, 0)
    if parsed is not None and parsed[1] == expected:
        entries.append(Entry(*parsed))  # it reads whole: the write had finished
    elif valid_record_after(torn, 0, expected) is not None:
        return Refusal(where, 0, f"{reason}, yet a valid record follows")
    return entries


def recover(disk: SimDisk, node_id: str, shard_id: int, fsync: str,
            incarnation: str) -> Restarted | Refusal:
    """Recover ``disk`` (after a crash: its durable image) as the real node would."""
    img = disk.durable
    root = data_dir(node_id)
    wal_dir = root / WAL_DIR
    first = img.log[0].index if img.log else img.wal_next
    entries = read_wal(img, wal_dir / segment_name(first))
    if isinstance(entries, Refusal):
        return entries
    by_path = {root / SNAP_DIR / snapshot_name(s.index): s for s in img.snapshots}
    snaps = tuple(SnapshotFile(path, s.index, s.term, s.problem,
                               HEADER_BYTES if s.problem else 0)
                  for path, s in sorted(by_path.items(), reverse=True))
    state = DiskState(
        root, FsyncPolicy.parse(fsync), img.hard_state, "", snaps, entries,
        wal_dir / segment_name(entries[0].index) if entries else None,
        tuple(root / SNAP_DIR / t for t in img.temp_files),
    )  # fmt: skip
    plan = plan_recovery(state)
    if not isinstance(plan, Plan):
        return plan
    torn = bool(img.torn_tail) and len(entries) == len(img.log)
    # carry it out, as startup.recover does: the torn tail goes, temp files go, the WAL
    # restarts after the snapshot if the plan says so
    img.log, img.torn_tail = entries, b""
    img.wal_next = entries[-1].index + 1 if entries else img.wal_next
    img.wal_next_known = bool(entries)  # a WAL that recovered nothing takes any index
    removed = {p.name for p in plan.remove}
    img.temp_files = [t for t in img.temp_files if t not in removed]
    if plan.wal_reset_to is not None:
        disk.reset(plan.wal_reset_to)
    snap = None
    if plan.snapshot is not None:
        chosen = by_path[plan.snapshot.path]
        snap = (chosen.index, chosen.term, chosen.data)
    has_state = plan.hard_state.term > 0 or bool(entries) or snap is not None
    ident = identity.decide_start(
        img.identity, has_state, cluster_id=CLUSTER_ID, shard_id=shard_id, node_id=node_id,
        bootstrap=False, incarnation=incarnation,
    )  # fmt: skip
    if img.identity is None:
        disk.save_identity(ident)
    return Restarted(plan.hard_state, snap, list(plan.replay), ident, list(plan.notes), torn)
