"""The write-ahead log: recovery of torn tails, refusal on corruption, segments,
truncation, compaction, group commit, and the fsync policy it obeys."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from loguru import logger

from zkv.protocol.messages import Entry
from zkv.storage_node.fsync_policy import FsyncMode, FsyncPolicy, parse_fsync_policy
from zkv.storage_node.wal import (
    SEGMENT_BYTES_MAX_DEFAULT,
    CorruptLogError,
    DiskFullError,
    DiskIO,
    WriteAheadLog,
    is_disk_full,
    segment_name,
)
from zkv.storage_node.wal_tail import TAIL_BYTES

ALWAYS = FsyncPolicy(FsyncMode.ALWAYS)
NEVER = FsyncPolicy(FsyncMode.NEVER)


@pytest.fixture
def warnings_logged():
    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    yield messages
    logger.remove(handler)


def entries(first: int, count: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, b"data-%d" % i) for i in range(first, first + count)]


def write_log(data_dir: Path, items: list[Entry], **kw) -> None:
    wal, recovered = WriteAheadLog.open(data_dir, ALWAYS, **kw)
    assert recovered == []
    wal.append(items)
    wal.sync(0.0)
    wal.close()


def reopen(data_dir: Path, **kw) -> tuple[WriteAheadLog, list[Entry]]:
    return WriteAheadLog.open(data_dir, ALWAYS, **kw)


def segments(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("*.seg"))


def record_offsets(data_dir: Path) -> list[int]:
    """Byte offset of each record in the only segment (read back through the WAL)."""
    wal, _ = reopen(data_dir)
    offsets = list(wal._segments[-1].offsets)
    wal.close()
    return offsets


# ------------------------------------------------------------------ fsync policy


@pytest.mark.parametrize(
    "text, expected",
    [
        ("always", FsyncPolicy(FsyncMode.ALWAYS)),
        ("never", FsyncPolicy(FsyncMode.NEVER)),
        ("interval:5", FsyncPolicy(FsyncMode.INTERVAL, 5)),
        (" Interval:1000 ", FsyncPolicy(FsyncMode.INTERVAL, 1000)),
        ("interval:60000", FsyncPolicy(FsyncMode.INTERVAL, 60000)),
    ],
)
def test_fsync_policy_parses(text, expected):
    assert FsyncPolicy.parse(text) == expected
    assert parse_fsync_policy(text) == expected
    assert FsyncPolicy.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    ["", "sometimes", "interval", "interval:", "interval:0", "interval:-5", "interval:abc",
     "interval:5ms", "interval:60001", "always:5", "interval:٣", "interval: 5"],
)  # fmt: skip
def test_fsync_policy_rejects_bad_input(text):
    with pytest.raises(ValueError, match="always"):
        FsyncPolicy.parse(text)


def test_fsync_policy_validates_fields():
    with pytest.raises(ValueError):
        FsyncPolicy(FsyncMode.INTERVAL, 0)
    with pytest.raises(ValueError):
        FsyncPolicy(FsyncMode.ALWAYS, 5)


def test_fsync_policy_due():
    always, never = FsyncPolicy.parse("always"), FsyncPolicy.parse("never")
    interval = FsyncPolicy.parse("interval:100")
    assert always.sync_due(5.0, 5.0) and always.sync_due(5.0, None)
    assert not never.sync_due(5.0, None) and not never.sync_due(1e9, 0.0)
    assert interval.sync_due(5.0, None)
    assert not interval.sync_due(5.05, 5.0)
    assert interval.sync_due(5.1, 5.0)
    assert interval.sync_due(7.0, 5.0)
    assert interval.next_sync_at(5.0) == pytest.approx(5.1)
    assert interval.next_sync_at(None) == float("-inf")
    assert never.next_sync_at(5.0) is None
    assert always.next_sync_at(5.0) == float("-inf")


# ------------------------------------------------------------------ round trip


def test_empty_directory_opens_empty(tmp_path):
    wal, recovered = WriteAheadLog.open(tmp_path, ALWAYS)
    assert recovered == []
    assert (wal.first_index, wal.last_index) == (1, 0)
    assert wal.sync(0.0) is False
    wal.close()


def test_append_and_recover(tmp_path):
    items = entries(1, 50) + [Entry(2, 51, b""), Entry(2, 52, b"\x00" * 5000)]
    write_log(tmp_path, items)
    wal, recovered = reopen(tmp_path)
    assert recovered == items
    assert (wal.first_index, wal.last_index) == (1, 52)
    wal.append(entries(53, 3, term=3))
    wal.close()  # close fsyncs what is pending
    _, recovered = reopen(tmp_path)
    assert recovered == items + entries(53, 3, term=3)


def test_append_refuses_a_gap_and_leaves_the_log_unchanged(tmp_path):
    wal, _ = WriteAheadLog.open(tmp_path, ALWAYS)
    wal.append(entries(1, 3))
    with pytest.raises(AssertionError):
        wal.append([Entry(1, 4, b"x"), Entry(1, 6, b"y")])
    with pytest.raises(AssertionError):
        wal.append(entries(3, 1))
    with pytest.raises(TypeError):
        wal.append([Entry(1, 4, "not bytes")])  # type: ignore[arg-type]
    assert wal.last_index == 3
    wal.append(entries(4, 1))
    wal.close()
    assert reopen(tmp_path)[1] == entries(1, 4)


def test_first_append_may_start_anywhere(tmp_path):
    write_log(tmp_path, entries(1001, 3))
    assert [p.name for p in segments(tmp_path)] == [segment_name(1001)]
    wal, recovered = reopen(tmp_path)
    assert recovered == entries(1001, 3)
    assert (wal.first_index, wal.last_index) == (1001, 1003)
    wal.close()


# ------------------------------------------------------------------ torn tails


def test_every_cut_inside_the_last_record_is_a_torn_tail(tmp_path, warnings_logged):
    items = entries(1, 5)
    original = tmp_path / "original"
    write_log(original, items)
    [seg] = segments(original)
    full = seg.read_bytes()
    last_start = record_offsets(original)[-1]
    for cut in range(last_start, len(full)):
        data_dir = tmp_path / f"cut{cut}"
        data_dir.mkdir()
        (data_dir / seg.name).write_bytes(full[:cut])
        warnings_logged.clear()
        wal, recovered = reopen(data_dir)
        assert recovered == items[:-1], cut
        assert (data_dir / seg.name).stat().st_size == last_start
        if cut > last_start:
            assert any(seg.name in m and f"offset {last_start}" in m for m in warnings_logged)
        replacement = Entry(2, 5, b"after-recovery")
        wal.append([replacement, Entry(2, 6, b"more")])
        wal.sync(1.0)
        wal.close()
        _, recovered = reopen(data_dir)
        assert recovered == items[:-1] + [replacement, Entry(2, 6, b"more")], cut


def test_a_zero_filled_tail_is_the_end_of_the_log(tmp_path, warnings_logged):
    """Zeros after the last record are the tail the WAL writes ahead (``wal_tail.py``),
    as a crash leaves them: the clean end, no warning; records go over them, and a
    clean close cuts what is left."""
    items = entries(1, 3)
    write_log(tmp_path, items)
    [seg] = segments(tmp_path)
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"\x00" * 4096)
    wal, recovered = reopen(tmp_path)
    assert recovered == items
    assert seg.stat().st_size == size + 4096
    assert not warnings_logged
    wal.append(entries(4, 2))
    wal.sync(0.0)
    assert seg.stat().st_size == size + 4096  # written over the zeros
    assert reopen(tmp_path)[1] == entries(1, 5)  # (a second handle, as after a crash)
    wal.close()
    assert seg.read_bytes().rstrip(b"\x00") == seg.read_bytes()
    assert reopen(tmp_path)[1] == entries(1, 5)


def test_the_tail_is_written_ahead_and_cut_at_close(tmp_path):
    wal, _ = WriteAheadLog.open(tmp_path, ALWAYS)
    wal.append(entries(1, 3))
    wal.sync(0.0)
    [seg] = segments(tmp_path)
    records = seg.read_bytes().rstrip(b"\x00")
    assert seg.stat().st_size == len(records) + TAIL_BYTES
    assert reopen(tmp_path)[1] == entries(1, 3)  # as a crash now would find it
    wal.close()
    assert seg.read_bytes() == records
    never, _ = WriteAheadLog.open(tmp_path / "never", NEVER)
    never.append(entries(1, 3))
    assert segments(tmp_path / "never")[0].stat().st_size == len(records)  # no tail
    never.close()


def test_the_tail_stops_at_the_segment_limit(tmp_path):
    wal, _ = reopen(tmp_path, segment_bytes_max=100)
    for i in range(1, 11):
        wal.append(entries(i, 1))
        wal.sync(float(i))
        assert all(p.stat().st_size <= 100 for p in segments(tmp_path))
    *rolled, last = segments(tmp_path)
    assert rolled and all(not p.read_bytes().endswith(b"\x00") for p in rolled)  # cut
    assert last.stat().st_size == 100  # the last one's tail reaches the limit
    assert reopen(tmp_path, segment_bytes_max=100)[1] == entries(1, 10)  # before close
    wal.close()


def test_a_torn_record_before_the_zero_tail_is_cut_with_the_zeros(tmp_path, warnings_logged):
    wal, _ = WriteAheadLog.open(tmp_path, ALWAYS)
    wal.append(entries(1, 3))
    wal.sync(0.0)
    [seg] = segments(tmp_path)
    end = len(seg.read_bytes().rstrip(b"\x00"))
    with open(seg, "r+b") as f:  # a fourth record, cut by a crash, over the zeros
        f.seek(end)
        f.write(b"\x20\x00\x00\x00\x12\x34\x56\x78\x93\x01")
    wal2, recovered = reopen(tmp_path)
    assert recovered == entries(1, 3)
    assert warnings_logged
    assert seg.stat().st_size == end
    wal2.append(entries(4, 1))
    wal2.close()
    assert reopen(tmp_path)[1] == entries(1, 4)


def test_a_segment_with_only_a_torn_record_is_removed(tmp_path):
    write_log(tmp_path, entries(1, 4), segment_bytes_max=1)  # one record per segment
    last = segments(tmp_path)[-1]
    last.write_bytes(last.read_bytes()[:5])
    wal, recovered = reopen(tmp_path, segment_bytes_max=1)
    assert recovered == entries(1, 3)
    assert not last.exists()
    wal.append(entries(4, 2))
    wal.close()
    assert reopen(tmp_path)[1] == entries(1, 5)


def test_an_empty_last_segment_is_removed(tmp_path):
    write_log(tmp_path, entries(1, 3))
    (tmp_path / segment_name(4)).write_bytes(b"")
    wal, recovered = reopen(tmp_path)
    assert recovered == entries(1, 3)
    assert len(segments(tmp_path)) == 1
    wal.close()


# ------------------------------------------------------------------ corruption


def test_flipped_bit_in_a_middle_record_is_corruption(tmp_path):
    original = tmp_path / "original"
    write_log(original, entries(1, 5))
    [seg] = segments(original)
    full = seg.read_bytes()
    offsets = record_offsets(original)
    middle_start, middle_end = offsets[2], offsets[3]
    for pos in range(middle_start, middle_end):
        data_dir = tmp_path / f"flip{pos}"
        data_dir.mkdir()
        damaged = bytearray(full)
        damaged[pos] ^= 0x10
        (data_dir / seg.name).write_bytes(bytes(damaged))
        with pytest.raises(CorruptLogError) as info:
            reopen(data_dir)
        message = str(info.value)
        assert seg.name in message and f"offset {middle_start}" in message, pos
        assert "rebuild from its peers" in message
        assert info.value.offset == middle_start
        assert (data_dir / seg.name).read_bytes() == bytes(damaged)  # untouched


def test_bad_record_in_a_segment_that_is_not_the_last_is_corruption(tmp_path):
    write_log(tmp_path, entries(1, 6), segment_bytes_max=60)
    segs = segments(tmp_path)
    assert len(segs) >= 2
    first = segs[0]
    first.write_bytes(first.read_bytes()[:-1])  # cut its last record
    with pytest.raises(CorruptLogError, match=first.name):
        reopen(tmp_path)


def test_a_gap_between_segments_is_corruption(tmp_path):
    write_log(tmp_path, entries(1, 6), segment_bytes_max=1)
    segments(tmp_path)[2].unlink()
    with pytest.raises(CorruptLogError, match="expected 3"):
        reopen(tmp_path)


def test_a_segment_named_after_the_wrong_index_is_corruption(tmp_path):
    write_log(tmp_path, entries(1, 3))
    [seg] = segments(tmp_path)
    seg.rename(seg.with_name(segment_name(7)))
    with pytest.raises(CorruptLogError, match="entry index 1, expected 7"):
        reopen(tmp_path)


# ------------------------------------------------------------------ segments


def test_segments_roll_over(tmp_path):
    items = entries(1, 40)
    write_log(tmp_path, items, segment_bytes_max=100)
    segs = segments(tmp_path)
    assert len(segs) > 5
    assert all(p.stat().st_size <= 100 for p in segs)
    wal, recovered = reopen(tmp_path, segment_bytes_max=100)
    assert recovered == items
    assert [s.first_index for s in wal._segments] == [int(p.name[:20]) for p in segs]
    wal.close()


def test_truncate_from_across_segments(tmp_path):
    write_log(tmp_path, entries(1, 40), segment_bytes_max=100)
    wal, _ = reopen(tmp_path, segment_bytes_max=100)
    before = len(segments(tmp_path))
    wal.truncate_from(13)
    assert wal.last_index == 12
    assert len(segments(tmp_path)) < before
    newer = entries(13, 5, term=2)
    wal.append(newer)
    wal.sync(0.0)
    wal.truncate_from(100)  # beyond the end: nothing to drop
    assert wal.last_index == 17
    wal.close()
    wal, recovered = reopen(tmp_path, segment_bytes_max=100)
    assert recovered == entries(1, 12) + newer
    wal.close()


def test_truncate_from_a_segment_boundary(tmp_path):
    write_log(tmp_path, entries(1, 6), segment_bytes_max=1)
    wal, _ = reopen(tmp_path, segment_bytes_max=1)
    wal.truncate_from(4)
    assert [p.name for p in segments(tmp_path)] == [segment_name(i) for i in (1, 2, 3)]
    wal.append(entries(4, 1, term=5))
    wal.close()
    assert reopen(tmp_path)[1] == entries(1, 3) + entries(4, 1, term=5)


def test_reset_after_installing_a_snapshot(tmp_path):
    write_log(tmp_path, entries(1, 10), segment_bytes_max=50)
    wal, _ = reopen(tmp_path, segment_bytes_max=50)
    wal.reset(501)  # a snapshot ending at 500 replaces the log
    assert segments(tmp_path) == []
    assert (wal.first_index, wal.last_index) == (501, 500)
    with pytest.raises(AssertionError):
        wal.append(entries(11, 1))
    wal.append(entries(501, 3, term=4))
    wal.close()
    wal, recovered = reopen(tmp_path)
    assert recovered == entries(501, 3, term=4)
    assert wal.first_index == 501
    wal.close()


def test_truncate_everything(tmp_path):
    write_log(tmp_path, entries(1, 10), segment_bytes_max=50)
    wal, _ = reopen(tmp_path, segment_bytes_max=50)
    wal.truncate_from(wal.first_index)
    assert segments(tmp_path) == []
    assert (wal.first_index, wal.last_index) == (1, 0)
    with pytest.raises(AssertionError):
        wal.append(entries(700, 2))
    wal.append(entries(1, 2, term=9))  # a new leader overwrites the whole log
    wal.close()
    assert reopen(tmp_path)[1] == entries(1, 2, term=9)


def test_reset_survives_a_restart_with_an_empty_log(tmp_path):
    write_log(tmp_path, entries(1, 3))
    wal, _ = reopen(tmp_path)
    wal.reset(50)
    wal.close()
    wal, recovered = reopen(tmp_path)
    assert recovered == []
    wal.append(entries(50, 1))  # the node restarts from its snapshot at 49
    wal.close()
    assert reopen(tmp_path)[1] == entries(50, 1)


def test_compact_deletes_only_whole_covered_segments(tmp_path):
    write_log(tmp_path, entries(1, 10), segment_bytes_max=1)  # one entry per segment
    wal, _ = reopen(tmp_path, segment_bytes_max=1)
    wal.compact(4)
    assert wal.first_index == 5
    assert [p.name for p in segments(tmp_path)][0] == segment_name(5)
    wal.compact(1000)  # never the last segment
    assert segments(tmp_path) == [tmp_path / segment_name(10)]
    assert (wal.first_index, wal.last_index) == (10, 10)
    wal.append(entries(11, 2))
    wal.close()
    assert reopen(tmp_path)[1] == entries(10, 3)


def test_compact_keeps_a_segment_that_is_partly_covered(tmp_path):
    write_log(tmp_path, entries(1, 20), segment_bytes_max=100)
    wal, _ = reopen(tmp_path, segment_bytes_max=100)
    second = wal._segments[1]
    wal.compact(second.first_index)  # covers only the first entry of the second segment
    assert wal.first_index == second.first_index
    wal.close()


# ------------------------------------------------------------------ group commit


@pytest.fixture
def fsyncs(monkeypatch):
    """Every durable sync: ``os.fsync`` or ``os.fdatasync`` (the WAL's)."""
    calls: list[int] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def counting(fd: int, real=real) -> None:
            calls.append(fd)
            real(fd)

        monkeypatch.setattr(os, name, counting)
    return calls


def test_group_commit_is_one_fsync_per_batch(tmp_path, fsyncs):
    wal, _ = WriteAheadLog.open(tmp_path, ALWAYS)
    wal.append(entries(1, 1))
    assert wal.sync(0.0)
    fsyncs.clear()
    for first in range(2, 102, 10):  # ten concurrent writes arrive separately
        wal.append(entries(first, 10))
    assert wal.sync(1.0) is True
    assert len(fsyncs) == 1
    assert wal.sync(2.0) is False  # nothing new: nothing to fsync
    assert len(fsyncs) == 1
    wal.close()
    assert reopen(tmp_path)[1] == entries(1, 101)


def test_interval_policy_fsyncs_when_due(tmp_path, fsyncs):
    wal, _ = WriteAheadLog.open(tmp_path, FsyncPolicy.parse("interval:5"))
    wal.append(entries(1, 1))
    assert wal.sync_deadline() == float("-inf")
    assert wal.sync(10.0) is True
    fsyncs.clear()
    wal.append(entries(2, 1))
    assert wal.sync(10.001) is False
    assert wal.sync_deadline() == pytest.approx(10.005)
    assert wal.sync(10.005) is True
    assert len(fsyncs) == 1
    assert wal.sync_deadline() is None
    wal.close()


def test_never_policy_flushes_without_fsync(tmp_path, fsyncs):
    wal, _ = WriteAheadLog.open(tmp_path, NEVER)
    wal.append(entries(1, 5))
    assert wal.sync(0.0) is False
    assert fsyncs == []
    assert wal.sync_deadline() is None
    # flushed: another reader (a restarted process) sees the records
    copy = tmp_path.parent / (tmp_path.name + "-copy")
    shutil.copytree(tmp_path, copy)
    assert reopen(copy)[1] == entries(1, 5)
    assert wal.sync(1.0, force=True) is True
    assert len(fsyncs) == 1
    wal.close()


def test_truncate_from_is_durable_even_under_never(tmp_path, fsyncs):
    write_log(tmp_path, entries(1, 5))
    wal, _ = WriteAheadLog.open(tmp_path, NEVER)
    fsyncs.clear()
    wal.truncate_from(3)
    assert len(fsyncs) == 1  # the truncated segment (no segment deleted: no directory)
    wal.close()


class FakeDisk:
    """Injected write/fsync: fails with ``errno`` from the ``fail_after``-th write on."""

    def __init__(self, err: int = errno.ENOSPC) -> None:
        self.err = err
        self.full = False
        self.partial = False  # write half of the buffer first, as a filling disk does
        self.writes = 0

    def write(self, fd: int, data) -> int:
        self.writes += 1
        if self.full:
            if self.partial and len(data) > 1:
                self.partial = False
                return os.write(fd, data[: len(data) // 2])
            raise OSError(self.err, os.strerror(self.err))
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)


def test_a_failed_write_poisons_the_log(tmp_path):
    disk = FakeDisk(errno.EIO)
    wal, _ = WriteAheadLog.open(tmp_path, ALWAYS, io=DiskIO(disk.write, disk.fsync))
    wal.append(entries(1, 1))
    disk.full = True
    with pytest.raises(OSError, match="Input/output"):
        wal.append(entries(2, 1))
    with pytest.raises(OSError, match="unusable"):
        wal.append(entries(2, 1))
    wal.close()


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("segment_bytes_max", [SEGMENT_BYTES_MAX_DEFAULT, 60])
def test_a_full_disk_leaves_the_log_as_it_was_and_usable(tmp_path, partial, segment_bytes_max):
    """ENOSPC (issue 10 item 6): the batch is undone on disk and in the index, the log
    stays usable, and the same entries go in once there is space again."""
    disk = FakeDisk()
    wal, _ = WriteAheadLog.open(tmp_path, ALWAYS, segment_bytes_max,
                                io=DiskIO(disk.write, disk.fsync))
    wal.append(entries(1, 3))
    wal.sync(0.0)
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("*.seg")}
    disk.full, disk.partial = True, partial
    with pytest.raises(DiskFullError, match="no space to append entries 4..8"):
        wal.append(entries(4, 5))
    assert is_disk_full(DiskFullError("x"))
    assert {p.name: p.stat().st_size for p in tmp_path.glob("*.seg")} == sizes
    assert wal.last_index == 3
    disk.full = False
    wal.append(entries(4, 5))
    wal.sync(1.0)
    wal.close()
    _, recovered = reopen(tmp_path, segment_bytes_max=segment_bytes_max)
    assert recovered == entries(1, 8)


def test_a_full_disk_when_the_zero_tail_grows_leaves_the_log_as_it_was(tmp_path):
    """The tail is written ahead (``wal_tail.py``): a full disk shows up when it grows,
    and the batch is undone as for a failed record write."""
    disk = FakeDisk()
    grown: list[int] = []
    no_room = False  # for new blocks: writes over the tail's zeros still work

    def pwrite(fd: int, data, offset: int) -> int:
        grown.append(offset)
        if no_room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwrite(fd, data, offset)

    io = DiskIO(disk.write, disk.fsync, pwrite)
    wal, _ = WriteAheadLog.open(tmp_path, ALWAYS, io=io)
    wal.append(entries(1, 3))
    wal.sync(0.0)
    [seg] = segments(tmp_path)
    before = seg.read_bytes()
    assert grown and len(before) == TAIL_BYTES + len(before.rstrip(b"\x00"))
    no_room = True
    big = [Entry(1, 4, b"x" * TAIL_BYTES)]  # more than the tail holds: it must grow
    with pytest.raises(DiskFullError, match="no space to append entries 4..4"):
        wal.append(big)
    assert seg.read_bytes() == before and wal.last_index == 3
    wal.append(entries(4, 2))  # small ones still fit in the tail already written
    no_room = False
    wal.append([Entry(1, 6, b"x" * TAIL_BYTES)])
    wal.sync(1.0)
    wal.close()
    assert reopen(tmp_path)[1] == entries(1, 5) + [Entry(1, 6, b"x" * TAIL_BYTES)]


def test_a_full_disk_on_an_empty_log_removes_the_new_segment(tmp_path):
    disk = FakeDisk()
    disk.full = True
    wal, _ = WriteAheadLog.open(tmp_path, ALWAYS, io=DiskIO(disk.write, disk.fsync))
    wal.reset(101)
    with pytest.raises(DiskFullError):
        wal.append(entries(101, 2))
    assert list(tmp_path.glob("*.seg")) == []
    disk.full = False
    wal.append(entries(101, 2))
    wal.sync(0.0)
    wal.close()
    assert reopen(tmp_path)[1] == entries(101, 2)
