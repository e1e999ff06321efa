"""Snapshot files: durable writes, retention, and falling back past a damaged one."""

from __future__ import annotations

import os
import threading
import zlib
from types import SimpleNamespace

import pytest
from loguru import logger

from zkv.storage_node import snapshot as snapshot_module
from zkv.storage_node.snapshot import (
    SNAP_DIR,
    BackgroundSave,
    MappedSnapshot,
    Snapshot,
    SnapshotDamaged,
    compactable_index,
    load_latest_snapshot,
    mapped_or_bytes,
    save_snapshot,
    snapshot_name,
)


@pytest.fixture
def warnings_logged():
    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    yield messages
    logger.remove(handler)


def names(data_dir) -> list[str]:
    return sorted(p.name for p in (data_dir / SNAP_DIR).iterdir())


def test_no_snapshot(tmp_path):
    assert load_latest_snapshot(tmp_path) is None
    assert compactable_index(tmp_path) == 0


def test_round_trip(tmp_path):
    path = save_snapshot(tmp_path, 4096, 3, b"state" * 1000)
    assert path.name == snapshot_name(4096) == "00000000000000004096.snap"
    assert load_latest_snapshot(tmp_path) == Snapshot(4096, 3, b"state" * 1000)


def test_empty_data_round_trips(tmp_path):
    save_snapshot(tmp_path, 1, 1, b"")
    assert load_latest_snapshot(tmp_path) == Snapshot(1, 1, b"")


def test_keeps_the_newest_two(tmp_path):
    for index in (10, 20, 30, 40):
        save_snapshot(tmp_path, index, 1, b"at %d" % index)
    assert names(tmp_path) == [snapshot_name(30), snapshot_name(40)]
    assert load_latest_snapshot(tmp_path) == Snapshot(40, 1, b"at 40")
    assert compactable_index(tmp_path) == 30


def test_write_is_fsynced_before_rename(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    save_snapshot(tmp_path, 5, 1, b"x")
    assert calls == ["fsync", "replace", "fsync"]


def test_leftover_tmp_files_are_ignored_and_cleaned(tmp_path):
    (tmp_path / SNAP_DIR).mkdir()
    (tmp_path / SNAP_DIR / (snapshot_name(99) + ".tmp")).write_bytes(b"partial")
    assert load_latest_snapshot(tmp_path) is None
    save_snapshot(tmp_path, 5, 1, b"x")
    assert names(tmp_path) == [snapshot_name(5)]


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-1],  # cut short
        lambda raw: raw[:10],  # shorter than the header
        lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]),  # flipped bit in the data
        lambda raw: b"NOTASNAP" + raw[8:],  # bad magic
        lambda raw: raw + b"extra",
    ],
)
def test_a_damaged_newest_falls_back_to_an_older_one(tmp_path, warnings_logged, damage):
    save_snapshot(tmp_path, 10, 1, b"older state")
    newest = save_snapshot(tmp_path, 20, 2, b"newer state")
    newest.write_bytes(damage(newest.read_bytes()))
    assert load_latest_snapshot(tmp_path) == Snapshot(10, 1, b"older state")
    assert any(newest.name in m for m in warnings_logged)


def test_a_file_whose_name_disagrees_with_its_header_is_skipped(tmp_path):
    save_snapshot(tmp_path, 10, 1, b"a")
    path = save_snapshot(tmp_path, 20, 1, b"b")
    path.rename(path.with_name(snapshot_name(30)))
    assert load_latest_snapshot(tmp_path) == Snapshot(10, 1, b"a")


def test_all_damaged_is_none(tmp_path):
    path = save_snapshot(tmp_path, 10, 1, b"a")
    path.write_bytes(b"junk")
    assert load_latest_snapshot(tmp_path) is None


def test_a_mapped_snapshot_reads_like_its_bytes_even_after_the_file_is_pruned(tmp_path):
    data = os.urandom(100_000)
    save_snapshot(tmp_path, 5, 2, data)
    view = mapped_or_bytes(tmp_path, 5, data)
    assert isinstance(view, MappedSnapshot) and len(view) == len(data)
    for a, b in [(0, 4096), (4096, 70_000), (99_000, 200_000), (100_000, 100_100)]:
        assert view[a:b] == data[a:b]
    for i in (6, 7):  # two newer snapshots: the file of index 5 is deleted
        save_snapshot(tmp_path, i, 2, b"x")
    assert snapshot_name(5) not in names(tmp_path)
    assert view[0:1000] == data[:1000]


def test_a_mapped_snapshot_refuses_to_stream_data_damaged_on_disk(tmp_path):
    data = os.urandom(10_000)
    path = save_snapshot(tmp_path, 5, 2, data)
    view = mapped_or_bytes(tmp_path, 5, data)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    with open(path, "r+b") as f:  # in place, as bit rot would be
        f.write(raw)
    with pytest.raises(SnapshotDamaged):
        view[0:4096]


def test_a_large_mapped_snapshot_is_checked_off_the_loop_and_its_last_slice_waits_for_it(
        tmp_path, monkeypatch):
    """Above ``VERIFY_INLINE_BYTES`` the crc runs on a helper thread (it would stall
    the leader's loop at every transfer): the first slices leave while it runs, and the
    one that reaches the end (what a follower installs upon) raises if the file is
    damaged."""
    monkeypatch.setattr(snapshot_module, "VERIFY_INLINE_BYTES", 1000)
    data = os.urandom(10_000)
    path = save_snapshot(tmp_path, 5, 2, data)
    view = mapped_or_bytes(tmp_path, 5, data)
    assert [view[a : a + 4096] for a in (0, 4096, 8192)] == [data[:4096], data[4096:8192],
                                                              data[8192:]]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    with open(path, "r+b") as f:  # in place, as bit rot would be
        f.write(raw)
    checking, release = threading.Event(), threading.Event()

    def slow_crc32(data, value=0):
        checking.set()
        assert release.wait(10)
        return zlib.crc32(data, value)

    monkeypatch.setattr(snapshot_module, "zlib", SimpleNamespace(crc32=slow_crc32))
    assert view[0:4096] == bytes(raw[-10_000:][:4096])  # the check has not answered yet
    assert checking.wait(10) and view[4096:8192]
    release.set()
    with pytest.raises(SnapshotDamaged):
        view[8192:12_288]  # the slice that completes the transfer


def test_without_a_file_the_bytes_are_kept(tmp_path, warnings_logged):
    assert mapped_or_bytes(tmp_path, 9, b"abc") == b"abc"
    assert any("kept in memory" in m for m in warnings_logged)


def test_a_background_save_writes_the_same_file_off_the_calling_thread(tmp_path):
    data = bytearray(b"state" * 100_000)  # what an install hands over: not copied
    saving = BackgroundSave(tmp_path, 42, 3, data)
    saving.result()
    assert saving.done() and (saving.index, saving.term, saving.size) == (42, 3, len(data))
    loaded = load_latest_snapshot(tmp_path)
    assert loaded is not None and (loaded.last_index, loaded.last_term) == (42, 3)
    assert bytes(loaded.data) == bytes(data)


def test_a_background_save_that_fails_raises_its_error_to_the_caller(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")  # a data dir that is a file: the write fails
    saving = BackgroundSave(blocker, 1, 1, b"x")
    with pytest.raises(OSError):
        saving.result()
    assert saving.done()
