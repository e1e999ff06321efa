"""fsync off the node's loop (``wal_syncer.py``, the async half of ``node_disk.py``): the
loop never waits for the disk, and nothing that promises durable state leaves before
the disk holds it."""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from loguru import logger

from zkv.protocol.messages import AppendReply, Entry, VoteReply
from zkv.storage_node.disk_full import Unpersisted
from zkv.storage_node.fsync_policy import FsyncMode, FsyncPolicy
from zkv.storage_node.node_disk import NodeDisk
from zkv.storage_node.replica import Ready
from zkv.storage_node.wal import DiskIO, WriteAheadLog
from zkv.storage_node.wal_syncer import WalSyncer

ALWAYS = FsyncPolicy(FsyncMode.ALWAYS)
WAIT_S = 5.0


class GatedDisk:
    """An fsync that blocks until the test lets it go: a disk that stalls."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.fail: OSError | None = None

    def fsync(self, fd: int) -> None:
        self.calls += 1
        self.started.set()
        assert self.release.wait(WAIT_S), "the test never released the disk"
        if self.fail is not None:
            raise self.fail
        os.fsync(fd)


def readable(fd: int, timeout: float = WAIT_S) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def entries(first: int, count: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, b"v%d" % i) for i in range(first, first + count)]


# ------------------------------------------------------------------ the thread


def test_a_sync_runs_on_the_thread_and_signals_the_loop(tmp_path: Path) -> None:
    disk = GatedDisk()
    syncer = WalSyncer(disk.fsync)
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY)
    os.write(fd, b"x")
    syncer.start(fd, 7, 3)
    assert disk.started.wait(WAIT_S)
    assert syncer.in_flight == 7
    assert syncer.collect() is None  # still syncing: the loop goes on
    assert not readable(syncer.fileno(), 0.05)
    disk.release.set()
    assert readable(syncer.fileno())
    done = syncer.collect()
    assert done is not None and (done.index, done.entries, done.error) == (7, 3, None)
    assert syncer.in_flight is None
    with pytest.raises(OSError):
        os.fstat(fd)  # the thread closed the descriptor it was given
    syncer.close()


def test_one_sync_at_a_time(tmp_path: Path) -> None:
    disk = GatedDisk()
    syncer = WalSyncer(disk.fsync)
    syncer.start(os.open(tmp_path / "a", os.O_CREAT | os.O_WRONLY), 1, 1)
    second = os.open(tmp_path / "b", os.O_CREAT | os.O_WRONLY)
    with pytest.raises(RuntimeError, match="in flight"):
        syncer.start(second, 2, 1)
    with pytest.raises(OSError):
        os.fstat(second)  # not leaked
    disk.release.set()
    done = syncer.wait()
    assert done is not None and done.index == 1
    assert syncer.wait() is None
    syncer.close()


def test_a_failed_fsync_is_handed_back(tmp_path: Path) -> None:
    disk = GatedDisk()
    disk.fail = OSError(5, "I/O error")
    disk.release.set()
    syncer = WalSyncer(disk.fsync)
    syncer.start(os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY), 4, 1)
    done = syncer.wait()
    assert done is not None and done.error is disk.fail
    syncer.close()


# ------------------------------------------------------------------ the WAL's half


def test_begin_sync_hands_out_what_was_written_once(tmp_path: Path) -> None:
    wal, _ = WriteAheadLog.open(tmp_path, ALWAYS)
    assert wal.begin_sync() is None  # nothing written
    wal.append(entries(1, 3))
    begun = wal.begin_sync()
    assert begun is not None
    fd, index = begun
    assert index == 3
    os.fsync(fd)
    os.close(fd)
    wal.end_sync(None, 1.0)
    assert wal.begin_sync() is None  # covered
    wal.close()


def test_a_failed_sync_poisons_the_log(tmp_path: Path) -> None:
    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(m.record["message"]), level="ERROR")
    try:
        wal, _ = WriteAheadLog.open(tmp_path, ALWAYS)
        wal.append(entries(1, 1))
        begun = wal.begin_sync()
        assert begun is not None
        os.close(begun[0])
        with pytest.raises(OSError):
            wal.end_sync(OSError(5, "I/O error"), 1.0)
        with pytest.raises(OSError, match="unusable"):
            wal.append(entries(2, 1))
        assert any("sync failed" in m for m in messages)
    finally:
        logger.remove(handler)


# ------------------------------------------------------------------ the node's rules


class Core:
    def __init__(self) -> None:
        self.persisted_calls: list[int] = []

    def persisted(self, index: int) -> None:
        self.persisted_calls.append(index)

    def snapshot_saved(self, index: int, data: Any) -> None:
        self.saved = (index, data)


class Disk(NodeDisk):
    """``NodeDisk`` with a real WAL on a disk that stalls on demand, and no sockets."""

    def __init__(self, data_dir: Path, disk: GatedDisk) -> None:
        self.config: Any = SimpleNamespace(data_dir=data_dir, heartbeat_ms=100)
        self.log: Any = logger
        self.core: Any = Core()
        self.node: Any = SimpleNamespace(
            stats=SimpleNamespace(wal_synced=lambda *a: None, snapshot=lambda *a: None),
            unpersisted=False, disk_full=False)
        self.wal, _ = WriteAheadLog.open(data_dir / "wal", ALWAYS, io=DiskIO(fsync=disk.fsync))
        self._unpersisted = Unpersisted()
        self._disk_full_since = None
        self._disk_retry_at = 0.0
        self._snapshot_retry_at = 0.0
        self._disk_snapshot_index = 0
        self._snapshot_child = None
        self._syncer = WalSyncer(self.wal.fsync_call)
        self._synced_index = 0
        self._unsynced_entries = 0
        from collections import deque
        self._held = deque()
        self._held_since = 0.0
        self._install_save = None
        self._install_held = []
        self.sent: list[tuple[str, Any]] = []

    def _send_peer(self, to: str, msg: Any) -> None:
        self.sent.append((to, msg))

    def turn(self, rd: Ready, out: list[tuple[str, Any]], now: float = 0.0) -> None:
        """What the loop does with one ready round."""
        assert self._persist(rd, now)
        self._send_durable(out, now)

    def signalled(self) -> None:
        """The loop wakes on the pipe until the sync in flight is collected (a wake
        may be stale: the signal of a sync that ``wait`` already took)."""
        syncer = self._syncer
        assert syncer is not None and syncer.in_flight is not None
        index = syncer.in_flight
        while syncer.in_flight == index:
            assert readable(syncer.fileno())
            self._sync_collected(0.0)


def ack(index: int) -> tuple[str, AppendReply]:
    return ("leader", AppendReply(1, "me", True, index, 0))


def test_a_healthy_disk_finishes_the_turn_as_an_inline_fsync_did(tmp_path: Path) -> None:
    """The loop waits a quarter heartbeat for the sync: a fast disk answers within it,
    so the round's acks leave in the same turn and the pipe stays quiet."""
    gate = GatedDisk()
    gate.release.set()
    node = Disk(tmp_path, gate)
    node.turn(Ready(entries=entries(1, 5)), [ack(5)])
    assert node.core.persisted_calls == [5]
    assert node.sent == [ack(5)]
    assert node._syncer is not None and node._syncer.in_flight is None
    assert not readable(node._syncer.fileno(), 0.05)  # no stale wake-up for the loop
    node._syncer.close()
    node.wal.close()


def test_the_loop_goes_on_while_the_disk_stalls_and_acks_wait_for_it(tmp_path: Path) -> None:
    gate = GatedDisk()
    node = Disk(tmp_path, gate)
    node.turn(Ready(entries=entries(1, 5)), [ack(5)])  # returns after a quarter heartbeat
    assert gate.started.wait(WAIT_S)
    assert node.core.persisted_calls == [] and node.sent == []  # nothing claimed yet
    # the next turn writes more while the first sync still runs: its ack waits too
    node.turn(Ready(entries=entries(6, 2)), [ack(7)])
    vote = ("cand", VoteReply(1, "me", True, False, "cand"))
    node.turn(Ready(), [vote])  # even a round with nothing to write keeps its place
    assert node.sent == []
    gate.release.set()
    # the first sync (1..5) signals the loop; the second (6..7) starts at once and,
    # the disk being fast again, finishes within the turn's short wait
    node.signalled()
    assert node.core.persisted_calls == [5, 7]
    assert node.sent == [ack(5), ack(7), vote]
    # with nothing waiting and everything durable, a round's messages go at once
    node.turn(Ready(), [ack(7)])
    assert node.sent[-1] == ack(7)
    node._syncer.close()  # type: ignore[union-attr]
    node.wal.close()


def test_a_truncation_waits_for_the_sync_and_drops_acks_for_cut_entries(tmp_path: Path) -> None:
    gate = GatedDisk()
    node = Disk(tmp_path, gate)
    gate.release.set()
    node.turn(Ready(entries=entries(1, 3)), [ack(3)])
    assert node.sent == [ack(3)]
    gate.release.clear()
    node.turn(Ready(entries=entries(4, 3)), [ack(6)])  # sync of 4..6 in flight
    assert gate.started.wait(WAIT_S)
    node.turn(Ready(entries=entries(7, 1)), [ack(7)])  # written, not synced yet
    releaser = threading.Timer(0.2, gate.release.set)
    releaser.start()
    # a new leader's entries conflict from index 5: the truncation waits for the sync in
    # flight (4..6 durable: ack(6) goes), then cuts; ack(7) claims a cut entry: dropped.
    # The new entry 5 is synced within the turn (the disk is fast again).
    node.turn(Ready(truncate_from=5, entries=entries(5, 1, term=2)), [ack(5)])
    releaser.join()
    assert node.sent == [ack(3), ack(6), ack(5)]
    assert node.wal.last_index == 5
    # the core heard of 1..3 and of the new 5, never of the stale sync's 6
    assert node.core.persisted_calls == [3, 5]
    node._syncer.close()  # type: ignore[union-attr]
    node.wal.close()


def test_a_disk_slower_than_a_heartbeat_still_lets_the_leader_hear_us(tmp_path: Path) -> None:
    """Check-quorum: a leader that hears no ack from a majority for an election timeout
    steps down. A follower whose fsync stalls sends, once per heartbeat, its newest ack
    clamped to what its disk holds: the leader hears it, nothing more is claimed."""
    gate = GatedDisk()
    node = Disk(tmp_path, gate)
    gate.release.set()
    node.turn(Ready(entries=entries(1, 2)), [ack(2)])
    gate.release.clear()
    node.turn(Ready(entries=entries(3, 4)), [ack(6)], now=1.0)  # the disk stalls here
    assert gate.started.wait(WAIT_S)
    node.turn(Ready(), [ack(6), ("cand", VoteReply(1, "me", True, False, "cand"))], now=1.05)
    node._ack_while_syncing(1.05)  # not a heartbeat interval yet
    assert node.sent == [ack(2)]
    node._ack_while_syncing(1.11)
    assert node.sent == [ack(2), ack(2)]  # the newest ack, claiming only entries 1..2
    node._ack_while_syncing(1.15)
    assert len(node.sent) == 2  # once per heartbeat interval
    node._ack_while_syncing(1.22)
    assert len(node.sent) == 3
    gate.release.set()
    node.signalled()
    assert [m for _, m in node.sent[3:]] == [ack(6)[1], ack(6)[1], VoteReply(1, "me", True, False, "cand")]
    node._syncer.close()  # type: ignore[union-attr]
    node.wal.close()


def test_a_snapshot_from_the_leader_is_written_off_the_loop_and_what_follows_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The install's file is written on a helper thread (a large one would stop the
    loop): until it is on disk the node counts as unpersisted, entries after it wait,
    and so do the acks of those rounds (an ack claims the log that follows it)."""
    from zkv.storage_node import snapshot as snapshot_module

    written = threading.Event()
    save = snapshot_module.save_snapshot

    def slow_save(*args: Any, **kwargs: Any) -> Path:
        assert written.wait(WAIT_S)
        return save(*args, **kwargs)

    monkeypatch.setattr(snapshot_module, "save_snapshot", slow_save)
    gate = GatedDisk()
    gate.release.set()
    node = Disk(tmp_path, gate)
    node.turn(Ready(entries=entries(1, 3)), [ack(3)])
    assert node.sent == [ack(3)]
    assert not node._persist(Ready(snapshot=(10, 2, bytearray(b"leader's state"))), 0.0)
    node._send_durable([ack(10)], 0.0)
    assert not node._persist(Ready(entries=entries(11, 2)), 0.0)
    node._send_durable([ack(12)], 0.0)
    node._install_written(0.0)  # not on disk yet: nothing changes
    assert node.sent == [ack(3)] and node.node.unpersisted
    assert node.wal.last_index == 3  # the old log stays until the snapshot is on disk
    written.set()
    assert node._install_save is not None
    node._install_save.result()
    node._install_written(0.1)
    assert node._install_save is None and not node.node.unpersisted
    assert node.wal.last_index == 12 and node.core.persisted_calls[-1] == 12
    assert node.sent == [ack(3), ack(10), ack(12)]
    assert snapshot_module.load_latest_snapshot(tmp_path) is not None
    # the replica streams it from the file from now on: the received bytes can go
    index, mapped = node.core.saved
    assert index == 10 and isinstance(mapped, snapshot_module.MappedSnapshot)
    assert mapped[0:100] == b"leader's state"
    node._syncer.close()  # type: ignore[union-attr]
    node.wal.close()
