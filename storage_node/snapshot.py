"""Snapshots of the state machine: ``<data dir>/snap/<last index, 20 digits>.snap``.

File: a 36-byte header ``magic "ZKVSNAP1" | u64 last_index | u64 last_term |
u64 length | u32 crc32(data)`` (little-endian), then ``data``.

A snapshot is written to ``<name>.tmp``, fsynced, renamed and the directory fsynced,
so a file with a ``.snap`` name is complete unless the disk itself damaged it.

A failed write (a full disk) removes its ``.tmp``; a crash may leave one, and recovery
deletes it at start. We keep the newest ``SNAPSHOTS_KEPT`` files; which one a restart
loads is ``recovery.plan_recovery``'s decision (``scan_snapshots`` checks each file without
holding it in memory): a damaged newest file is skipped in favour of an older good one. That fallback is only sound if the log
still holds every entry after the older snapshot: a replica that silently lost entries
it had acknowledged could elect a leader missing a committed write. So the shell
compacts the WAL only up to ``compactable_index`` (the oldest snapshot kept), never up
to the snapshot it just wrote.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from zkv.storage_node.durable_state import fsync_directory
from zkv.storage_node.recovery import SnapshotFile

SNAP_DIR = "snap"
SNAPSHOTS_KEPT = 2
MAGIC = b"ZKVSNAP1"
_HEADER = struct.Struct("<8sQQQI")
_SNAP_NAME = re.compile(r"^(\d{20})\.snap$")
_CHUNK_BYTES = 1 << 20
HEADER_BYTES = _HEADER.size


@dataclass(frozen=True, slots=True)
class Snapshot:
    last_index: int
    last_term: int
    data: bytes


#: a mapped snapshot up to this size is checked in the caller's thread (~3 ms)
VERIFY_INLINE_BYTES = 8 * 1024 * 1024


class MappedSnapshot:
    """A snapshot's data read from its file on demand, for a leader to stream to a
    follower: what the replica core keeps instead of the bytes (``len`` and slices).

    Why: holding the last snapshot in memory costs its whole size (~128 B per key at
    16 B keys and 100 B values) for the rare follower that needs it; mapped, it costs
    only the page cache, which the kernel can reclaim. The file may be pruned while
    mapped (the mapping keeps its inode). Disk damage under a running node must not
    be streamed as good data: every pass from offset 0 checks the header's crc32 again
    and raises ``SnapshotDamaged`` on a mismatch (the node stops; recovery falls back
    to an older snapshot). Up to ``VERIFY_INLINE_BYTES`` the check runs at once; a
    larger file (35-50 ms per 128 MB: a stall of the leader's loop at every transfer)
    is checked on a helper thread (``zlib.crc32`` releases the GIL) and the slice that
    reaches the end, the one a follower installs upon, waits for the verdict.
    """

    __slots__ = ("_map", "_length", "_crc", "path", "_verifying", "_damaged")

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            _, _, _, length, crc = _HEADER.unpack(head)
            self._length: int = length
            self._crc: int = crc
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(self._map) != _HEADER.size + self._length:
            raise SnapshotDamaged(f"snapshot {path}: size does not match its header")
        self.path = path
        self._verifying: threading.Thread | None = None
        self._damaged = False

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, item: slice) -> bytes:
        start, stop, _ = item.indices(self._length)
        stop = max(start, stop)
        if start == 0:  # a new pass: check the file again
            if self._length <= VERIFY_INLINE_BYTES:
                self._verify()
            elif self._verifying is None:
                self._verifying = threading.Thread(target=self._verify, daemon=True,
                                                   name="zkv-verify-snapshot")
                self._verifying.start()
        if stop >= self._length and self._verifying is not None:
            self._verifying.join()  # the last slice leaves only from a file that checks out
            self._verifying = None
        if self._damaged:
            raise SnapshotDamaged(f"snapshot {self.path} changed on disk under a running node")
        return self._map[_HEADER.size + start : _HEADER.size + stop]

    def _verify(self) -> None:
        view = memoryview(self._map)
        try:
            self._damaged = zlib.crc32(view[_HEADER.size:]) != self._crc
        finally:
            view.release()


class SnapshotDamaged(RuntimeError):
    """The file of the snapshot a node serves changed on disk."""


def mapped_or_bytes(directory: str | os.PathLike[str], last_index: int,
                    data: bytes) -> MappedSnapshot | bytes:
    """The snapshot just saved (or loaded) at ``last_index``, mapped from its file;
    ``data`` itself if the file cannot be mapped (it then stays in memory)."""
    try:
        return MappedSnapshot(Path(directory) / SNAP_DIR / snapshot_name(last_index))
    except (OSError, ValueError, SnapshotDamaged) as exc:
        logger.warning("snapshot {} kept in memory: {}", last_index, exc)
        return data


def load_saved(directory: str | os.PathLike[str], last_index: int) -> MappedSnapshot | bytes:
    """The snapshot another process just saved at ``last_index``, mapped from its file
    (read whole if it cannot be mapped). Raises ``SnapshotDamaged`` if it is not intact."""
    path = Path(directory) / SNAP_DIR / snapshot_name(last_index)
    try:
        return MappedSnapshot(path)
    except (OSError, ValueError) as exc:
        logger.warning("snapshot {} kept in memory: {}", last_index, exc)
    found = _read_snapshot(last_index, path)
    if isinstance(found, str):
        raise SnapshotDamaged(f"{path}: {found}")
    return found.data


def snapshot_name(last_index: int) -> str:
    return f"{last_index:020d}.snap"


def save_snapshot(
    directory: str | os.PathLike[str], last_index: int, last_term: int,
    data: bytes | bytearray, prune_temp: bool = True,
) -> Path:
    """Write the snapshot durably, then delete all but the newest ``SNAPSHOTS_KEPT``
    (and, with ``prune_temp``, leftover temp files: not from a background writer, whose
    node may be writing a snapshot of its own at the same time).

    ``directory`` is the node's data directory. Returns the snapshot's path.
    """
    if last_index < 0 or last_term < 0:
        raise ValueError(f"bad snapshot position ({last_index}, {last_term})")
    snap_dir = Path(directory) / SNAP_DIR
    snap_dir.mkdir(parents=True, exist_ok=True)
    path = snap_dir / snapshot_name(last_index)
    tmp = path.with_name(path.name + ".tmp")
    header = _HEADER.pack(MAGIC, last_index, last_term, len(data), zlib.crc32(data))
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a half-written copy around
        raise
    fsync_directory(snap_dir)
    _prune(snap_dir, prune_temp)
    return path


class BackgroundSave:
    """``save_snapshot`` on a helper thread: the file's write, CRC and fsync release the
    GIL, so the node's loop goes on while a snapshot installed from the leader (the
    whole data set) reaches the disk. ``data`` must not change until ``done()``."""

    def __init__(self, directory: str | os.PathLike[str], last_index: int, last_term: int,
                 data: bytes | bytearray) -> None:
        self.index, self.term, self.size = last_index, last_term, len(data)
        self._error: OSError | None = None
        self._thread = threading.Thread(
            target=self._run, args=(directory, last_index, last_term, data),
            name=f"zkv-save-snapshot-{last_index}", daemon=True)
        self._thread.start()

    def _run(self, directory: str | os.PathLike[str], last_index: int, last_term: int,
             data: bytes | bytearray) -> None:
        try:
            save_snapshot(directory, last_index, last_term, data)
        except OSError as exc:  # the loop decides: a full disk is retried, others end it
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> None:
        """Wait for the write; raise its ``OSError`` if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error


def _snapshot_files(snap_dir: Path) -> list[tuple[int, Path]]:
    """(last index, path) of every snapshot file, newest first."""
    if not snap_dir.is_dir():
        return []
    found = []
    for p in snap_dir.iterdir():
        m = _SNAP_NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    found.sort(reverse=True)
    return found


def _prune(snap_dir: Path, temp: bool = True) -> None:
    """Delete snapshots beyond the newest ``SNAPSHOTS_KEPT`` and (``temp``) leftover temp
    files (a crash between write and rename leaves one behind)."""
    for _, p in _snapshot_files(snap_dir)[SNAPSHOTS_KEPT:]:
        p.unlink(missing_ok=True)
    if temp:
        for p in snap_dir.glob("*.snap.tmp"):
            p.unlink(missing_ok=True)


def _read_snapshot(index: int, path: Path) -> Snapshot | str:
    """The snapshot in ``path``, or why it cannot be trusted."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            # the data in one read straight into its own bytes: no copy of a slice of
            # the whole file (a 128 MB copy at 1,000,000 keys)
            data = f.read()
    except OSError as exc:
        return f"unreadable: {exc}"
    if len(head) < _HEADER.size:
        return "shorter than its header"
    magic, last_index, last_term, length, crc = _HEADER.unpack(head)
    if magic != MAGIC:
        return "bad magic"
    if last_index != index:
        return f"header says last index {last_index}, the name says {index}"
    if len(data) != length:
        return f"{len(data)} bytes of data, the header says {length}"
    if zlib.crc32(data) != crc:
        return "checksum mismatch"
    return Snapshot(last_index, last_term, data)


def check_snapshot_file(index: int, path: Path) -> SnapshotFile:
    """Whether ``path`` is intact, reading it in chunks (memory stays flat however big
    it is): recovery checks every kept snapshot but loads only the one it chooses."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                return SnapshotFile(path, index, 0, "shorter than its header")
            magic, last_index, last_term, length, crc = _HEADER.unpack(head)
            if magic != MAGIC:
                return SnapshotFile(path, index, 0, "bad magic")
            if last_index != index:
                return SnapshotFile(path, index, 0,
                                    f"header says last index {last_index}, the name says {index}")
            got, size = 0, 0
            while chunk := f.read(_CHUNK_BYTES):
                got = zlib.crc32(chunk, got)
                size += len(chunk)
    except OSError as exc:
        return SnapshotFile(path, index, 0, f"unreadable: {exc}")
    if size != length:
        return SnapshotFile(path, index, last_term,
                            f"{size} bytes of data, the header says {length}", _HEADER.size)
    if got != crc:
        return SnapshotFile(path, index, last_term, "checksum mismatch", _HEADER.size)
    return SnapshotFile(path, index, last_term)


def scan_snapshots(directory: str | os.PathLike[str]) -> tuple[SnapshotFile, ...]:
    """Every ``*.snap`` under ``directory/snap``, newest first, each checked."""
    return tuple(check_snapshot_file(i, p) for i, p in _snapshot_files(Path(directory) / SNAP_DIR))


def load_snapshot_file(found: SnapshotFile) -> Snapshot | str:
    """The snapshot ``found`` names (checked again as it is read), or why not."""
    return _read_snapshot(found.last_index, found.path)


def temp_files(directory: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Leftovers of writes cut short (``snap/*.snap.tmp``, ``hardstate.tmp``, ...)."""
    root = Path(directory)
    found = [*root.glob("*.tmp"), *(root / SNAP_DIR).glob("*.tmp")]
    return tuple(sorted(p for p in found if p.is_file()))


def compactable_index(directory: str | os.PathLike[str]) -> int:
    """Highest log index the WAL may be compacted up to: the oldest snapshot kept, so
    falling back from a damaged newest snapshot still meets a contiguous log."""
    files = _snapshot_files(Path(directory) / SNAP_DIR)[:SNAPSHOTS_KEPT]
    return files[-1][0] if files else 0


def load_latest_snapshot(directory: str | os.PathLike[str]) -> Snapshot | None:
    """The newest intact snapshot under ``directory/snap``, or ``None`` if there is none."""
    for index, path in _snapshot_files(Path(directory) / SNAP_DIR):
        found = _read_snapshot(index, path)
        if isinstance(found, Snapshot):
            return found
        logger.warning("snapshot {} is damaged ({}); trying an older one", path, found)
    return None
