"""A simulated data directory for one node: what ``storage_node`` keeps in files.

The image (``DiskImage``) holds what the real data dir holds: the identity file, the
hard state, the WAL's records (and a record cut short after them: a torn tail), the
snapshot files (the newest ``SNAPSHOTS_KEPT``, each intact or damaged) and leftover temp
files. Its operations are the real shell's, with the real durability rules
(``node_disk.py``, ``wal.py``, ``snapshot.py``, ``durable_state.py``):

- the hard state and the identity are replaced atomically and are durable at once,
  under every fsync policy;
- ``append`` goes to the page cache; it is durable at once with ``fsync="always"``
  (the shell syncs before it acknowledges), otherwise when the simulated OS flushes
  (``flush``); ``truncate_from`` and ``reset`` are durable at once (``wal.py``);
- a snapshot is written the safe way (temp file, fsync, rename, fsync dir) and is durable
  at once; the newest ``SNAPSHOTS_KEPT`` are kept; after our own snapshot the WAL is
  compacted only up to the older kept one (``compactable_index``), after an installed
  one it restarts after it (``reset``).

Faults (``faults.py`` draws them): ``crash`` is a power loss (the unsynced tail is gone);
``full`` makes every write that needs space raise the production ``DiskFullError``
with nothing changed (truncation needs none); ``arm`` makes the next write fail
mid-way with a power loss: ``torn`` leaves the batch's records up to one cut short in
the middle (the production record format, so recovery reads it with the production
reader), ``snapshot`` loses a snapshot's rename (power lost before the directory fsync:
only its temp file is on disk); ``damage_snapshot`` flips a byte of the newest snapshot
file; ``wipe`` is a lost disk. Recovery is the production plan (``restart.py``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import msgpack

from zkv.protocol.messages import Entry
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.identity import Identity
from zkv.storage_node.snapshot import SNAPSHOTS_KEPT
from zkv.storage_node.wal import DiskFullError
from zkv.storage_node.wal_records import HEADER


class PowerLoss(Exception):  # noqa: N818 - an event, not an error
    """The power failed in the middle of a write (``SimDisk.arm``): the node is gone."""


@dataclass(slots=True)
class SnapFile:
    index: int
    term: int
    data: bytes
    #: "" when intact; else what recovery's checksum would find wrong
    problem: str = ""


@dataclass(slots=True)
class DiskImage:
    identity: Identity | None = None
    hard_state: HardState | None = None
    log: list[Entry] = field(default_factory=list)  # the WAL's records, contiguous
    #: where the WAL's next record goes (``log[-1].index + 1``, or after a reset)
    wal_next: int = 1
    #: False: the WAL recovered no record, so it takes any first index (``wal.py``)
    wal_next_known: bool = True
    #: a record cut short after ``log`` (production format): a torn tail
    torn_tail: bytes = b""
    snapshots: list[SnapFile] = field(default_factory=list)  # oldest first
    temp_files: list[str] = field(default_factory=list)

    def copy(self) -> DiskImage:
        return DiskImage(self.identity, self.hard_state, list(self.log), self.wal_next,
                         self.wal_next_known, self.torn_tail, list(self.snapshots),
                         list(self.temp_files))

    @property
    def last_index(self) -> int:
        return self.wal_next - 1

    @property
    def snapshot_index(self) -> int:
        return self.snapshots[-1].index if self.snapshots else 0

    @property
    def empty(self) -> bool:
        return (self.hard_state is None and not self.log and not self.snapshots
                and not self.torn_tail)


def encode_record(entry: Entry) -> bytes:
    """The production WAL record of ``entry`` (``wal.py``: length, crc32, msgpack)."""
    payload = msgpack.packb((entry.term, entry.index, entry.data), use_bin_type=True)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class SimDisk:
    def __init__(self, fsync: str = "always") -> None:
        if fsync not in ("always", "never"):
            raise ValueError(f"fsync mode {fsync!r}: expected always|never")
        self.fsync = fsync
        self.durable = DiskImage()
        self._cache: DiskImage | None = None  # None: identical to durable
        self.full = False
        #: the next write fails mid-way with a power loss: (what, a draw in [0, 1))
        self.armed: tuple[str, float] | None = None
        self.writes = 0
        self.syncs = 0

    @property
    def current(self) -> DiskImage:
        return self._cache if self._cache is not None else self.durable

    def _images(self) -> list[DiskImage]:
        """What a durable change applies to: the disk, and the page cache over it."""
        return [self.durable] if self._cache is None else [self.durable, self._cache]

    def _need_space(self, what: str) -> None:
        if self.full:
            raise DiskFullError(f"no space left on the simulated disk for {what}")

    def arm(self, what: str, draw: float) -> None:
        if what not in ("torn", "snapshot"):
            raise ValueError(f"cannot arm {what!r}")
        self.armed = (what, draw)

    # ------------------------------------------------------------------ writes

    def save_identity(self, ident: Identity) -> None:
        for img in self._images():
            img.identity = ident

    def save_hard_state(self, hard_state: HardState) -> None:
        self._need_space("the hard state")
        for img in self._images():
            img.hard_state = hard_state

    def truncate_from(self, index: int) -> None:
        """Drop records from ``index`` on (durable at once; needs no space)."""
        for img in self._images():
            first = img.log[0].index if img.log else img.wal_next
            if index < first and img.log:
                raise AssertionError(f"truncate_from={index} reaches below the WAL's first "
                                     f"record {first}")
            del img.log[max(0, index - first) :]
            img.wal_next = min(img.wal_next, index)
            img.torn_tail = b""

    def append(self, entries: list[Entry]) -> int:
        """Append contiguous ``entries``; returns the WAL's last index (page cache)."""
        self._need_space(f"entries {entries[0].index}..{entries[-1].index}")
        img = self._writable()
        if not img.wal_next_known:
            img.wal_next, img.wal_next_known = entries[0].index, True
        if entries[0].index != img.wal_next:
            raise AssertionError(f"WAL append of index {entries[0].index}, expected "
                                 f"{img.wal_next}")
        self.writes += 1
        if self.armed is not None and self.armed[0] == "torn":
            cut = int(self.armed[1] * len(entries))
            img.log.extend(entries[:cut])
            record = encode_record(entries[cut])
            img.torn_tail = record[: 1 + int(self.armed[1] * 7919) % (len(record) - 1)]
            img.wal_next = entries[cut].index
            self.armed = None
            raise PowerLoss(f"power lost writing entry {entries[cut].index}")
        img.log.extend(entries)
        img.wal_next = entries[-1].index + 1
        if self.fsync == "always":
            self.syncs += 1
        return img.last_index

    def _writable(self) -> DiskImage:
        if self.fsync == "always":
            return self.durable
        if self._cache is None:
            self._cache = self.durable.copy()
        return self._cache

    def save_snapshot(self, index: int, term: int, data: bytes) -> None:
        """Temp file, fsync, rename, fsync dir; then keep the newest ``SNAPSHOTS_KEPT``."""
        self._need_space(f"snapshot {index}")
        if self.armed is not None and self.armed[0] == "snapshot":
            self.armed = None
            for img in self._images():  # the rename did not reach the disk
                img.temp_files.append(f"{index:020d}.snap.tmp")
            raise PowerLoss(f"power lost before the directory fsync of snapshot {index}")
        for img in self._images():
            img.snapshots = [s for s in img.snapshots if s.index != index]
            img.snapshots.append(SnapFile(index, term, data))
            img.snapshots.sort(key=lambda s: s.index)
            del img.snapshots[:-SNAPSHOTS_KEPT]
            img.temp_files = [t for t in img.temp_files if not t.endswith(".snap.tmp")]

    def compact(self) -> None:
        """After our own snapshot: drop records up to the older kept snapshot, but never
        the last one (``wal.py`` never deletes the segment it writes to: a WAL whose
        unsynced tail is lost may end before the snapshot, and recovery must cope)."""
        for img in self._images():
            upto = img.snapshots[0].index if img.snapshots else 0
            if img.log and img.log[0].index <= upto:
                del img.log[: min(upto - img.log[0].index + 1, len(img.log) - 1)]

    def reset(self, next_index: int) -> None:
        """After installing a snapshot: the WAL restarts empty at ``next_index``."""
        for img in self._images():
            img.log.clear()
            img.torn_tail = b""
            img.wal_next, img.wal_next_known = next_index, True

    # ------------------------------------------------------------------ faults

    def flush(self) -> None:
        """The OS wrote the page cache back (fsync=never)."""
        if self._cache is not None:
            self.durable = self._cache
            self._cache = None
            self.syncs += 1

    def crash(self) -> None:
        """Power loss: what was not synced is gone; a pending fault is moot."""
        self._cache = None
        self.armed = None

    def damage_snapshot(self) -> int:
        """Flip a byte of the newest snapshot file; returns its index (0: none)."""
        if not self.durable.snapshots:
            return 0
        newest = self.durable.snapshots[-1]
        at = len(newest.data) // 2
        flipped = newest.data[:at] + bytes([newest.data[at] ^ 0x5A]) + newest.data[at + 1 :]
        bad = SnapFile(newest.index, newest.term, flipped, "checksum mismatch")
        for img in self._images():
            img.snapshots = [bad if s.index == newest.index else s for s in img.snapshots]
        return newest.index

    def wipe(self) -> None:
        """The disk is lost: the node comes back with an empty data dir."""
        self.durable = DiskImage()
        self._cache = None
        self.armed = None
