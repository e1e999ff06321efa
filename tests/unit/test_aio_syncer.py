"""The WAL's fsync through Linux AIO (``aio_syncer.py``): the same contract as the sync
thread (one sync at a time, the descriptor closed once it returns, a finished sync
signalled on ``fileno()``, a failure handed back, never raised), and a fallback to the
thread wherever the kernel path cannot be proven."""

from __future__ import annotations

import errno
import os
import select
from pathlib import Path

import pytest

from zkv.storage_node import aio_syncer
from zkv.storage_node.aio_syncer import AioSyncer, open_aio_syncer
from zkv.storage_node.disk_io import DiskIO
from zkv.storage_node.wal_sync import open_syncer
from zkv.storage_node.wal_syncer import WalSyncer

WAIT_S = 5.0
os_fsync = DiskIO().fsync  # the operating system's, as a WAL without an injected disk has


@pytest.fixture
def syncer(tmp_path: Path) -> AioSyncer:
    found = open_aio_syncer(tmp_path)
    if found is None:  # not Linux x86_64/aarch64, or AIO refused by a seccomp profile
        if os.environ.get("CI"):  # CI's machine has it: never let CI skip these
            pytest.fail("Linux AIO fsync is not available on this CI machine")
        pytest.skip("Linux AIO fsync is not available on this machine (not Linux "
                    "x86_64/aarch64, or refused by a seccomp profile); the node uses "
                    "the sync thread there, which tests/unit/test_wal_syncer.py covers")
    return found


def readable(fd: int, timeout: float = WAIT_S) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def written_file(tmp_path: Path, name: str = "seg") -> int:
    fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"entry" * 100)
    return fd


def test_a_sync_completes_in_the_kernel_and_signals_the_loop(
        syncer: AioSyncer, tmp_path: Path) -> None:
    fd = written_file(tmp_path)
    dup = os.dup(fd)
    syncer.start(dup, 7, 3)
    assert syncer.in_flight == 7
    assert readable(syncer.fileno()), "the eventfd never became readable"
    done = syncer.collect()
    assert done is not None and done.error is None
    assert (done.index, done.entries) == (7, 3) and done.seconds >= 0
    assert syncer.in_flight is None
    assert not is_open(dup), "the handed-over descriptor must be closed once synced"
    # the kernel posts the completion before it signals the eventfd, so a signal may
    # still follow a collected sync: waking on it collects nothing and clears it
    assert syncer.collect() is None
    os.eventfd_write(syncer.fileno(), 1)  # such a late signal, made sure of
    assert syncer.collect() is None
    assert not readable(syncer.fileno(), 0.0), "collect clears a late signal"
    os.close(fd)
    assert syncer.close() is None


def test_wait_returns_the_sync_and_consumes_its_signal(syncer: AioSyncer, tmp_path: Path) -> None:
    fd = written_file(tmp_path)
    for index in range(1, 6):  # one after another, as group commits follow each other
        os.write(fd, b"more")
        syncer.start(os.dup(fd), index, 1)
        done = syncer.wait(WAIT_S)
        assert done is not None and done.index == index and done.error is None
        assert syncer.in_flight is None
        assert syncer.collect() is None  # a late signal of this sync finds nothing
    assert syncer.wait(0.01) is None  # nothing in flight
    os.close(fd)
    syncer.close()


def test_a_second_start_while_one_is_in_flight_is_refused(syncer: AioSyncer, tmp_path: Path) -> None:
    fd = written_file(tmp_path)
    syncer.start(os.dup(fd), 1, 1)
    extra = os.dup(fd)
    with pytest.raises(RuntimeError):
        syncer.start(extra, 2, 1)
    assert not is_open(extra)
    done = syncer.wait(WAIT_S)
    assert done is not None and done.index == 1
    os.close(fd)
    syncer.close()


def test_a_sync_the_kernel_refuses_is_done_here_and_its_failure_handed_back(
        syncer: AioSyncer) -> None:
    """A pipe cannot be fsynced: io_submit refuses it, the fallback's fdatasync fails
    with EINVAL, and the loop hears it as a failed sync (the WAL is then poisoned), as
    it would from the thread."""
    r, w = os.pipe()
    syncer.start(w, 4, 2)
    assert readable(syncer.fileno())
    done = syncer.collect()
    assert done is not None and done.index == 4
    assert isinstance(done.error, OSError) and done.error.errno == errno.EINVAL
    assert not is_open(w) and syncer.in_flight is None
    os.close(r)
    syncer.close()


def test_close_finishes_the_sync_in_flight(syncer: AioSyncer, tmp_path: Path) -> None:
    fd = written_file(tmp_path)
    syncer.start(os.dup(fd), 9, 1)
    done = syncer.close()
    assert done is not None and done.index == 9 and done.error is None
    os.close(fd)


def test_no_aio_on_another_machine_means_the_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aio_syncer.platform, "machine", lambda: "sparc64")
    assert open_aio_syncer(tmp_path) is None
    with pytest.raises(OSError):
        AioSyncer()


def test_a_probe_the_kernel_refuses_means_the_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem or seccomp profile that refuses the AIO fsync: no AIO syncer."""
    def refuse(self: AioSyncer, fd: int) -> OSError:
        return OSError(errno.EINVAL, "io_submit: refused")
    monkeypatch.setattr(AioSyncer, "_submit", refuse)
    assert open_aio_syncer(tmp_path) is None


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, text: str, *args: object) -> None:
        self.lines.append(text.format(*args))

    warning = info


def test_wal_sync_choices_open_what_they_say(syncer: AioSyncer, tmp_path: Path) -> None:
    syncer.close()
    log = Log()
    assert open_syncer("inline", tmp_path, os_fsync, log) is None
    aio = open_syncer("aio", tmp_path, os_fsync, log)
    assert isinstance(aio, AioSyncer)
    aio.close()
    thread = open_syncer("thread", tmp_path, os_fsync, log)
    assert isinstance(thread, WalSyncer)
    thread.close()
    assert [line.split(" (")[0] for line in log.lines] == [
        "WAL fsync: in the loop", "WAL fsync: Linux AIO", "WAL fsync: a helper thread"]
    with pytest.raises(ValueError, match="--wal-sync"):
        open_syncer("io_uring", tmp_path, os_fsync, log)


def test_an_injected_disk_is_synced_on_the_thread_where_it_can_stall_or_fail(
        tmp_path: Path) -> None:
    """AIO would bypass a test's failing or stalling ``fsync``: the thread runs it."""
    calls: list[int] = []
    log = Log()
    chosen = open_syncer("aio", tmp_path, calls.append, log)
    assert isinstance(chosen, WalSyncer)
    chosen.close()


def test_without_aio_the_default_says_so_and_uses_the_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aio_syncer.platform, "machine", lambda: "sparc64")
    log = Log()
    chosen = open_syncer("aio", tmp_path, os_fsync, log)
    assert isinstance(chosen, WalSyncer)
    chosen.close()
    assert "not available" in log.lines[0] and "helper thread" in log.lines[-1]
