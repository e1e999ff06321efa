"""The write-ahead log: Raft's log entries on disk, in segment files.

Layout: ``<wal dir>/<first index, 20 digits>.seg``, the WAL directory being
``<data dir>/wal`` (``WAL_DIR``; the shell passes the full path). A segment is a run of records
``u32 length | u32 crc32(payload) | payload`` (little-endian), payload = msgpack
``[term, index, data]``. Indexes are contiguous within and across segments.

Rules and invariants:
- Only the last segment is written to; it rolls over once it would exceed
  ``segment_bytes_max``. Before a roll the old segment is fsynced (unless the policy is
  ``never``), so a torn record can only ever sit in the last segment.
- Every segment on disk holds at least one record, except an instant after it is
  created; recovery deletes an empty last segment.
- Past its last record the last segment holds only zeros (``wal_tail.py``: the tail is
  written ahead, so a sync moves data and commits no file-size change); recovery reads
  an all-zero rest as the end of the log. A roll and a clean ``close`` cut the zeros off.
- Recovery: a short or bad record with nothing valid after it in the last segment is a
  torn tail (a write cut by a crash): truncated with a warning. A bad record in any other
  segment, or followed by a valid record, is corruption: ``CorruptLogError``, the node
  refuses to start, because silently dropping acknowledged entries would break Raft.
- ``append`` buffers; ``sync`` is the group commit: one flush and (per the policy) one
  fsync cover every entry appended since the previous one. ``begin_sync``/``end_sync``
  split it for a node that fsyncs on a helper thread (``wal_syncer.py``).
- ``truncate_from`` is always durable before it returns, whatever the policy: a deleted
  segment that came back after a crash would leave a hole in the log.
- Appends continue ``last_index`` (``reset(i)`` restarts the log at ``i`` after a snapshot
  install). Only a log that recovered no entry at all accepts any first index: the WAL
  cannot know where the node's snapshot ends.
- A full disk (``ENOSPC``/``EDQUOT`` from a write, the zero tail's growth or a segment
  creation) is not fatal: ``append`` takes the segment back to where the batch started
  (``ftruncate``, ``unlink`` and zeros over blocks already held need no space) and
  raises ``DiskFullError``; the log is as before the call
  and the same entries can be appended again once there is space. Segments are written
  unbuffered (one ``write`` per batch), so a failed write leaves nothing queued in
  Python to be flushed later.
- Any other ``OSError`` while writing, and any failed fsync (after which the kernel may
  have dropped the pages: retrying the fsync proves nothing), poisons the log (memory
  and disk may disagree): every later call raises. The node must exit; recovery
  repairs the torn tail on restart.

The record format and the recovery scan of a segment are in ``wal_records.py``.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
from loguru import logger

from zkv.protocol.messages import Entry
from zkv.storage_node.disk_io import DiskFullError as DiskFullError  # re-exported
from zkv.storage_node.disk_io import DiskIO as DiskIO  # re-exported
from zkv.storage_node.disk_io import is_disk_full as is_disk_full  # re-exported
from zkv.storage_node.durable_state import fsync_directory
from zkv.storage_node.fsync_policy import FsyncMode, FsyncPolicy
from zkv.storage_node.wal_records import (
    HEADER,
    HEADER_BYTES,
    RECORD_BYTES_MAX,
    CorruptLogError,
    Segment,
    scan_segment,
)
from zkv.storage_node.wal_tail import ZeroTail

WAL_DIR = "wal"
SEGMENT_BYTES_MAX_DEFAULT = 64 * 1024 * 1024
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")


def segment_name(first_index: int) -> str:
    return f"{first_index:020d}.seg"


class WriteAheadLog:
    """Append-only Raft log on disk; see the module docstring for the rules."""

    def __init__(self, directory: Path, policy: FsyncPolicy, segment_bytes_max: int,
                 io: DiskIO | None = None) -> None:
        self._io = io or DiskIO()
        self._dir = directory
        self._policy = policy
        self._segment_bytes_max = segment_bytes_max
        self._segments: list[Segment] = []
        self._file: Any = None  # the last segment, open for writing, unbuffered
        self._tail = ZeroTail(policy.mode is not FsyncMode.NEVER, self._io.pwrite)
        self._next_index = 1  # index the next append must carry, once known
        self._next_known = False  # False only while a log recovered empty is untouched
        self._dirty = False  # bytes written since the last fsync
        self._last_sync: float | None = None
        self._broken: str | None = None
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)

    # ------------------------------------------------------------------ recovery

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        policy: FsyncPolicy,
        segment_bytes_max: int = SEGMENT_BYTES_MAX_DEFAULT,
        io: DiskIO | None = None,
    ) -> tuple[WriteAheadLog, list[Entry]]:
        """Open (creating if needed) the log in ``directory`` and recover it.

        Returns the log and every entry it holds, in order. Raises ``CorruptLogError``
        if the log is damaged beyond a torn tail.
        """
        if segment_bytes_max < 1:
            raise ValueError("segment_bytes_max must be >= 1")
        wal_dir = Path(directory)
        wal_dir.mkdir(parents=True, exist_ok=True)
        wal = cls(wal_dir, policy, segment_bytes_max, io)
        entries: list[Entry] = []
        names = sorted(p.name for p in wal_dir.iterdir() if _SEGMENT_NAME.match(p.name))
        for i, name in enumerate(names):
            first = int(name[:20])
            if wal._segments and first != wal._next_index:
                raise CorruptLogError(
                    wal_dir / name, 0,
                    f"segment starts at index {first}, expected {wal._next_index}"
                )  # fmt: skip
            seg = scan_segment(wal_dir / name, first, entries, last=i == len(names) - 1)
            if seg is not None:
                wal._segments.append(seg)
                wal._next_index = seg.last_index + 1
        if wal._segments:
            wal._open_last()
            wal._next_known = True
        return wal, entries

    def _open_last(self) -> None:
        """Open the last segment for writing at the end of its records (its zero tail,
        if any, stays: records are written over it)."""
        seg = self._segments[-1]
        self._file = open(seg.path, "r+b", buffering=0)  # noqa: SIM115 - owned by the WAL
        self._file.seek(seg.size)
        self._tail.opened(self._file.fileno())

    @property
    def first_index(self) -> int:
        """Index of the oldest entry held (``last_index + 1`` when the log is empty)."""
        return self._segments[0].first_index if self._segments else self._next_index

    @property
    def last_index(self) -> int:
        """Index of the newest entry held (``first_index - 1`` when the log is empty)."""
        return self._next_index - 1

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def policy(self) -> FsyncPolicy:
        return self._policy

    def sync_deadline(self) -> float | None:
        """When ``sync`` would next fsync the pending writes (``None``: nothing pending
        or policy ``never``): the shell's poll timeout must not sleep past it."""
        if not self._dirty:
            return None
        return self._policy.next_sync_at(self._last_sync)

    # ------------------------------------------------------------------ writing

    def append(self, entries: Sequence[Entry]) -> None:
        """Buffer ``entries`` (contiguous, following ``last_index``) for the next sync.

        The hot path is one msgpack pack, one crc32 and one struct pack per entry and one
        ``write`` per batch (per segment touched). Entries are checked and encoded before
        anything changes, so a refused batch leaves the log as it was.
        """
        self._check_usable()
        if not entries:
            return
        expected = self._next_index if self._next_known else entries[0].index
        pack = self._packer.pack
        payloads: list[bytes] = []
        for e in entries:
            if e.index != expected:
                raise AssertionError(f"WAL append of index {e.index}, expected {expected}")
            if type(e.data) is not bytes:
                raise TypeError(f"entry {e.index}: data must be bytes")
            payloads.append(pack((e.term, e.index, e.data)))
            expected += 1
        if max(map(len, payloads)) > RECORD_BYTES_MAX:
            raise ValueError(f"an entry is larger than {RECORD_BYTES_MAX} bytes")
        mark = self._mark()
        try:
            self._write_records(entries[0].index, payloads)
        except OSError as exc:
            if is_disk_full(exc) and self._broken is None and self._rollback(mark):
                raise DiskFullError(
                    f"no space to append entries {entries[0].index}..{entries[-1].index} "
                    f"to the WAL in {self._dir}: {exc}"
                ) from exc
            self._poison(f"append failed: {exc}")
            raise
        self._next_index = expected
        self._next_known = True

    def _write_records(self, first_index: int, payloads: list[bytes]) -> None:
        header, crc32, limit = HEADER.pack, zlib.crc32, self._segment_bytes_max
        seg = self._segments[-1] if self._segments else None
        parts: list[bytes] = []
        pending = 0  # bytes in parts, not yet written
        for i, payload in enumerate(payloads):
            size = HEADER_BYTES + len(payload)
            if seg is None or (seg.size + pending > 0 and seg.size + pending + size > limit):
                if parts:
                    self._write(seg, parts, pending)
                    parts, pending = [], 0
                seg = self._roll(first_index + i)
            seg.offsets.append(seg.size + pending)
            parts.append(header(len(payload), crc32(payload)))
            parts.append(payload)
            pending += size
        self._write(seg, parts, pending)

    def _write(self, seg: Segment | None, parts: list[bytes], size: int) -> None:
        assert seg is not None and self._file is not None
        view = memoryview(b"".join(parts))
        fd, write = self._file.fileno(), self._io.write
        self._dirty = True
        self._tail.reserve(fd, seg.size + size, self._segment_bytes_max)
        while view:
            view = view[write(fd, view) :]
        seg.size += size

    def _mark(self) -> tuple[int, int, int, int]:
        """Where the log ends now: (segments, last segment's size, its record count,
        its bytes on disk with the zero tail)."""
        seg = self._segments[-1] if self._segments else None
        if seg is None:
            return 0, 0, 0, 0
        return len(self._segments), seg.size, len(seg.offsets), self._tail.allocated

    def _rollback(self, mark: tuple[int, int, int, int]) -> bool:
        """Take the disk and the index back to ``mark`` after a write that found no
        space (truncating, unlinking and zeroing held blocks need none). False if even
        that failed."""
        count, size, records, allocated = mark
        try:
            while len(self._segments) > count:
                if self._file is not None:
                    self._file.close()
                    self._file = None
                self._segments.pop().path.unlink(missing_ok=True)
            if self._segments:
                seg = self._segments[-1]
                # How far the batch wrote in this segment: the position of its open
                # file, or its records' end if a roll closed it after a whole write.
                written = self._file.tell() if self._file is not None else seg.size
                del seg.offsets[records:]
                seg.size = size
                if self._file is None:
                    self._file = open(seg.path, "r+b", buffering=0)  # noqa: SIM115 - owned by the WAL
                self._tail.undo(self._file.fileno(), size, written, allocated)
                self._file.seek(size)
        except OSError as exc:
            logger.error("WAL {}: could not undo a write that found no space: {}", self._dir, exc)
            return False
        return True

    def _roll(self, first_index: int) -> Segment:
        """Close the current segment durably and start ``<first_index>.seg``."""
        if self._file is not None:
            self._tail.trim(self._file.fileno(), self._segments[-1].size)
            if self._policy.mode is not FsyncMode.NEVER:
                try:
                    self._io.fsync(self._file.fileno())
                except OSError as exc:
                    self._poison(f"fsync before a roll failed: {exc}")  # see the docstring
                    raise
            self._file.close()
            self._file = None
        seg = Segment(self._dir / segment_name(first_index), first_index)
        self._file = open(seg.path, "xb", buffering=0)  # noqa: SIM115 - owned by the WAL
        self._tail.allocated = 0
        if self._policy.mode is not FsyncMode.NEVER:
            fsync_directory(self._dir)
        self._segments.append(seg)
        return seg

    def sync(self, now: float, force: bool = False) -> bool:
        """Group commit: flush what ``append`` buffered, and fsync it if the policy says
        so at ``now`` (or ``force``). Returns whether it fsynced."""
        self._check_usable()
        if self._file is None:
            return False
        try:
            if not self._dirty or not (force or self._policy.sync_due(now, self._last_sync)):
                return False
            self._io.fsync(self._file.fileno())
        except OSError as exc:
            self._poison(f"sync of {self._segments[-1].path} failed: {exc}")
            raise
        self._dirty = False
        self._last_sync = now
        return True

    def begin_sync(self) -> tuple[int, int] | None:
        """Group commit on another thread (``wal_syncer.py``): a duplicate of the last
        segment's descriptor to fsync and close, and the index that fsync makes durable
        (every earlier segment was fsynced at its roll); None when nothing was written
        since the last sync. Then ``end_sync`` with the outcome."""
        self._check_usable()
        if self._file is None or not self._dirty:
            return None
        fd = os.dup(self._file.fileno())
        self._dirty = False
        return fd, self.last_index

    def end_sync(self, error: OSError | None, now: float) -> None:
        """The fsync ``begin_sync`` handed out returned; a failure poisons the log."""
        if error is not None:
            self._poison(f"sync failed: {error}")
            raise error
        self._last_sync = now

    @property
    def fsync_call(self) -> Callable[[int], None]:
        """The fsync to run on a descriptor of this log (a test's failing disk too)."""
        return self._io.fsync

    def truncate_from(self, index: int) -> None:
        """Drop every entry with an index >= ``index`` (Raft conflict resolution), durably."""
        self._check_usable()
        if index > self.last_index:
            return
        try:
            self._truncate(index)
        except OSError as exc:
            self._poison(f"truncate_from({index}) failed: {exc}")
            raise

    def _truncate(self, index: int) -> None:
        if self._file is not None:
            self._file.close()  # flushes; the segment reopened below is the new last
            self._file = None
        # Newest first, each unlink made durable before the next, so a crash part-way
        # leaves a prefix of the old log, never a hole (that would be CorruptLogError).
        while self._segments and self._segments[-1].first_index >= index:
            self._segments.pop().path.unlink()
            fsync_directory(self._dir)
        if self._segments:
            seg = self._segments[-1]
            keep = index - seg.first_index
            if keep < len(seg.offsets):  # else ``index`` starts the segment deleted above
                seg.size = seg.offsets[keep]
                del seg.offsets[keep:]
                with open(seg.path, "r+b") as f:
                    f.truncate(seg.size)
                    f.flush()
                    os.fsync(f.fileno())
            self._open_last()
        self._next_index = index
        self._next_known = True
        self._dirty = False

    def reset(self, next_index: int) -> None:
        """Drop the whole log, durably, and expect ``next_index`` next: a snapshot
        ending at ``next_index - 1`` was installed and replaces everything we had."""
        self._check_usable()
        if next_index < 1:
            raise ValueError(f"next_index must be >= 1, got {next_index}")
        if self._segments:
            try:
                self._truncate(self._segments[0].first_index)
            except OSError as exc:
                self._poison(f"reset({next_index}) failed: {exc}")
                raise
        self._next_index = next_index
        self._next_known = True

    def compact(self, upto_index: int) -> None:
        """Delete whole segments whose entries are all <= ``upto_index`` (covered by a
        durable snapshot). The last segment is never deleted. Oldest first, each unlink
        made durable before the next: a crash part-way leaves a suffix of the log, never
        a hole. (Usually one segment per snapshot, so the fsyncs cost nothing.)"""
        self._check_usable()
        try:
            while len(self._segments) > 1 and self._segments[0].last_index <= upto_index:
                self._segments.pop(0).path.unlink(missing_ok=True)
                fsync_directory(self._dir)
        except OSError as exc:
            self._poison(f"compact({upto_index}) failed: {exc}")
            raise

    def close(self) -> None:
        """Flush, fsync pending writes (unless the policy is ``never``) and close."""
        if self._file is None:
            return
        try:
            if not self._broken and self._segments:
                self._tail.trim(self._file.fileno(), self._segments[-1].size)
            if self._dirty and self._policy.mode is not FsyncMode.NEVER and not self._broken:
                self._io.fsync(self._file.fileno())
                self._dirty = False
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ failure

    def _poison(self, reason: str) -> None:
        self._broken = reason
        logger.error("WAL {}: {}; the log is unusable until the node restarts", self._dir, reason)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise OSError(f"write-ahead log unusable after an earlier failure: {self._broken}")
