"""The WAL's record format on disk, and reading a segment back at recovery.

A record is ``u32 length | u32 crc32(payload) | payload`` (little-endian, ``HEADER``),
payload = msgpack ``[term, index, data]``; ``WriteAheadLog`` (``wal.py``) writes them.
``scan_segment`` reads a segment back. Rules: a record counts only if its length is
plausible (<= ``RECORD_BYTES_MAX``), its checksum matches and its payload is an entry
continuing the log; in the last segment, zeros from there to the end of the file are the
tail written ahead (``wal_tail.py``: a record's length is never 0), the clean end of the
log; a bad record with nothing valid after it in the last segment is a
torn tail and is truncated; any other bad record is corruption (``CorruptLogError``).
Nothing here keeps state between calls.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from pathlib import Path

import msgpack
from loguru import logger

from zkv.protocol.messages import Entry
from zkv.storage_node.durable_state import fsync_directory

#: Largest payload one record may hold: far above a command (1 MiB value), far below
#: what would let a corrupt length field make recovery allocate without limit.
RECORD_BYTES_MAX = 64 * 1024 * 1024

HEADER = struct.Struct("<II")
HEADER_BYTES = HEADER.size
#: msgpack "fixarray of 3": the first byte of every payload we write; the corruption
#: scan only tries offsets whose payload would start with it.
PAYLOAD_TAG = 0x93
_REPAIR = "remove this replica's data directory and let it rebuild from its peers"


class CorruptLogError(RuntimeError):
    """The log is damaged beyond a torn tail: the node must not start on it."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(
            f"write-ahead log corrupt in {path} at byte offset {offset}: {reason}. "
            f"To repair, {_REPAIR}."
        )
        self.path = path
        self.offset = offset


class Segment:
    """One segment file and where each of its records starts (so truncation is a seek)."""

    __slots__ = ("path", "first_index", "offsets", "size")

    def __init__(self, path: Path, first_index: int) -> None:
        self.path = path
        self.first_index = first_index
        self.offsets = array("Q")  # offsets[i] = byte offset of entry first_index + i
        self.size = 0

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.offsets) - 1


def parse_payload(payload: bytes | memoryview) -> tuple[int, int, bytes] | None:
    """``(term, index, data)`` if ``payload`` is a plausible entry, else ``None``."""
    try:
        value = msgpack.unpackb(payload, raw=False, use_list=False)
    except Exception:  # garbage makes msgpack raise many types
        return None
    if type(value) is not tuple or len(value) != 3:
        return None
    term, index, data = value
    if type(term) is not int or type(index) is not int or type(data) is not bytes:
        return None
    if term < 0 or index < 1:
        return None
    return term, index, data


def read_record(buf: bytes, pos: int) -> tuple[int, tuple[int, int, bytes] | None, str]:
    """Parse the record at ``pos``: (its size, its entry or None, why it is bad)."""
    if len(buf) - pos < HEADER_BYTES:
        return 0, None, "short record header"
    length, crc = HEADER.unpack_from(buf, pos)
    if length == 0 or length > RECORD_BYTES_MAX:
        return 0, None, f"implausible record length {length}"
    end = pos + HEADER_BYTES + length
    if end > len(buf):
        return 0, None, "record runs past the end of the file"
    payload = memoryview(buf)[pos + HEADER_BYTES : end]
    if zlib.crc32(payload) != crc:
        return 0, None, "checksum mismatch"
    parsed = parse_payload(payload)
    if parsed is None:
        return 0, None, "checksum matches but the payload is not [term, index, data]"
    return end - pos, parsed, ""


def valid_record_after(buf: bytes, pos: int, expected_index: int) -> int | None:
    """Offset of a valid record after ``pos`` continuing the log, if any.

    A record only parses with a good checksum where one was really written, so finding
    one behind a bad record means the bad one is damage in the middle of the log, not a
    write cut short by a crash.
    """
    start = pos + 1 + HEADER_BYTES
    while True:
        tag = buf.find(PAYLOAD_TAG, start)
        if tag < 0:
            return None
        candidate = tag - HEADER_BYTES
        _, parsed, _ = read_record(buf, candidate)
        if parsed is not None and parsed[1] >= expected_index:
            return candidate
        start = tag + 1


def scan_segment(path: Path, first: int, out: list[Entry], last: bool) -> Segment | None:
    """Recover the segment ``path`` (whose first index is ``first``): append its entries
    to ``out`` and return it with its record offsets; None for an empty last segment,
    which is removed. Truncates a torn tail; raises ``CorruptLogError`` on damage."""
    buf = path.read_bytes()
    seg = Segment(path, first)
    pos, expected = 0, first
    n = len(buf)
    view = memoryview(buf)
    offsets, append = seg.offsets, out.append
    unpack_header, crc32, unpackb = HEADER.unpack_from, zlib.crc32, msgpack.unpackb
    last_header = n - HEADER_BYTES
    while pos < n:
        # Fast path (restart speed): a whole record, good checksum, [term, index,
        # data] continuing the log, inlined. Anything else takes the slow path,
        # which says what is wrong with the record.
        if pos <= last_header:
            length, crc = unpack_header(buf, pos)
            end = pos + HEADER_BYTES + length
            if 0 < length <= RECORD_BYTES_MAX and end <= n:
                payload = view[pos + HEADER_BYTES : end]
                if crc32(payload) == crc and payload[0] == PAYLOAD_TAG:
                    try:
                        term, index, data = unpackb(payload, raw=False, use_list=False)
                    except Exception:  # not a 3-array: the slow path says why
                        term = index = data = None
                    if (index == expected and type(index) is int and type(term) is int
                            and term >= 0 and type(data) is bytes):
                        offsets.append(pos)
                        append(Entry(term, index, data))
                        pos = end
                        expected += 1
                        continue
        if last and buf.count(0, pos) == n - pos:
            break  # the zero-filled tail written ahead of the records (``wal_tail.py``)
        size, parsed, reason = read_record(buf, pos)
        if parsed is None:
            _torn_tail_or_corrupt(path, buf, pos, expected, reason, last)
            break
        term, index, data = parsed
        if index != expected:
            raise CorruptLogError(path, pos, f"entry index {index}, expected {expected}")
        offsets.append(pos)
        append(Entry(term, index, data))
        pos += size
        expected += 1
    seg.size = pos
    if not seg.offsets and not last:
        raise CorruptLogError(path, 0, "empty segment that is not the last")
    if not seg.offsets:
        logger.warning("WAL {}: no complete record, removing the empty segment", path)
        path.unlink()
        fsync_directory(path.parent)
        return None
    return seg


def _torn_tail_or_corrupt(
    path: Path, buf: bytes, pos: int, expected: int, reason: str, last: bool
) -> None:
    """Torn tail (truncate it) or corruption (raise)."""
    if not last:
        raise CorruptLogError(path, pos, f"{reason} in a segment that is not the last")
    after = valid_record_after(buf, pos, expected)
    if after is not None:
        raise CorruptLogError(
            path, pos, f"{reason}, yet a valid record follows at byte offset {after}"
        )
    logger.warning(
        "WAL {}: torn record at byte offset {} ({}); truncating {} bytes",
        path, pos, reason, len(buf) - pos,
    )  # fmt: skip
    with open(path, "r+b") as f:
        f.truncate(pos)
        f.flush()
        os.fsync(f.fileno())
