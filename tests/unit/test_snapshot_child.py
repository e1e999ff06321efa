"""Snapshots written by a forked child (``storage_node/snapshot_child.py``) and the node
core's side of it: begun once, not again until written or failed, and a snapshot that
lands after a newer one was installed changes nothing."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from tests.unit.test_node_core import Shard, put, request
from zkv.storage_node.node_core import SnapshotTask
from zkv.storage_node.snapshot import load_latest_snapshot, load_saved, save_snapshot
from zkv.storage_node.snapshot_child import (
    CAN_FORK,
    EXIT_DISK_FULL,
    EXIT_FAILED,
    SnapshotChild,
)

pytestmark = pytest.mark.skipif(not CAN_FORK, reason="this platform has no fork()")


def wait(child: SnapshotChild, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (status := child.poll()) is None:
        assert time.monotonic() < deadline, "the child never ended"
        time.sleep(0.01)
    return status


def test_the_child_writes_the_state_as_it_was_at_fork_time(tmp_path: Path) -> None:
    state = {"value": b"before"}

    def write() -> None:
        time.sleep(0.2)  # the parent changes its copy meanwhile
        save_snapshot(tmp_path, 7, 2, state["value"], prune_temp=False)

    child = SnapshotChild.fork(7, 2, write)
    state["value"] = b"after"
    assert wait(child) == 0
    snap = load_latest_snapshot(tmp_path)
    assert snap is not None and (snap.last_index, snap.data) == (7, b"before")
    assert bytes(load_saved(tmp_path, 7)[0:6]) == b"before"


def test_exit_status_tells_a_full_disk_from_another_failure() -> None:
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def broken() -> None:
        raise RuntimeError("boom")

    assert wait(SnapshotChild.fork(1, 1, full)) == EXIT_DISK_FULL
    assert wait(SnapshotChild.fork(1, 1, broken)) == EXIT_FAILED


def test_kill_reaps_a_running_child() -> None:
    child = SnapshotChild.fork(1, 1, lambda: time.sleep(30))
    started = time.monotonic()
    child.kill()
    assert time.monotonic() - started < 5
    child.kill()  # twice is harmless


def _core_with_entries(n: int) -> Shard:
    shard = Shard(snapshot_entries=5)
    leader = shard.elect("a")
    for rid in range(1, n + 1):
        request(leader, put(rid), shard.now)
        shard.settle()
    return shard


def test_a_snapshot_is_begun_once_until_written_or_failed() -> None:
    core = _core_with_entries(10).nodes["a"]
    due = core.begin_snapshot()
    assert due is not None
    index, term = due
    assert core.begin_snapshot() is None  # one at a time
    core.snapshot_failed()
    assert core.begin_snapshot() == due  # offered again
    data = core.snapshot_data(index)
    core.compacted(SnapshotTask(index, term, data))
    assert core.begin_snapshot() is None  # not due: nothing applied since
    assert core.last_snapshot_index == index


def test_snapshot_data_is_only_for_the_applied_index() -> None:
    core = _core_with_entries(10).nodes["a"]
    with pytest.raises(ValueError):
        core.snapshot_data(core.state.applied_index - 1)


def test_a_snapshot_older_than_the_one_held_changes_nothing() -> None:
    core = _core_with_entries(10).nodes["a"]
    due = core.begin_snapshot()
    assert due is not None
    index, term = due
    newer = SnapshotTask(index, term, core.snapshot_data(index))
    core.compacted(newer)
    core.compacted(SnapshotTask(index - 2, term, b"stale"))  # a slow child, finishing late
    assert core.last_snapshot_index == index
    assert core.replica.snap_index == index
