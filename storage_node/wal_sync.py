"""Where a node's WAL fsync runs with ``--fsync always`` (``--wal-sync``), and the one
interface the loop (``node_disk.py``) drives whichever runs it.

- ``aio`` (default): Linux native AIO (``aio_syncer.py``): the kernel syncs, an eventfd
  says when; no thread to wake. Where it cannot work (another OS, a seccomp profile that
  refuses ``io_setup``, a filesystem that refuses an AIO fsync) the node says so in its
  log and uses ``thread``.
- ``thread``: a helper thread (``wal_syncer.py``); works everywhere.
- ``inline``: in the loop. A disk that stalls then stops heartbeats and acks.

Off the loop (``aio``, ``thread``), a disk that stalls for a moment costs no election:
the loop waits a quarter heartbeat for each sync, then goes on serving and heartbeating.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from zkv.storage_node.aio_syncer import open_aio_syncer
from zkv.storage_node.disk_io import is_os_fsync
from zkv.storage_node.wal_syncer import SyncDone, WalSyncer

WAL_SYNC_CHOICES = ("aio", "thread", "inline")
WAL_SYNC_DEFAULT = "aio"


class Syncer(Protocol):
    """What ``node_disk.py`` needs of an off-loop fsync (``WalSyncer``, ``AioSyncer``)."""

    in_flight: int | None

    def fileno(self) -> int: ...

    def start(self, fd: int, index: int, entries: int) -> None: ...

    def collect(self) -> SyncDone | None: ...

    def wait(self, timeout: float | None = None) -> SyncDone | None: ...

    def close(self) -> SyncDone | None: ...


def open_syncer(choice: str, data_dir: str | os.PathLike[str],
                fsync: Callable[[int], None], log: Any) -> Syncer | None:
    """The off-loop syncer ``choice`` asks for (None: ``inline``). AIO is used only with
    the real disk calls: a test's injected ``fsync`` (a stalling or failing disk) runs
    on the thread, where it can be injected."""
    if choice not in WAL_SYNC_CHOICES:
        raise ValueError(f"--wal-sync must be one of {', '.join(WAL_SYNC_CHOICES)}, not {choice!r}")
    if choice == "inline":
        log.info("WAL fsync: in the loop (--wal-sync inline)")
        return None
    if choice == "aio" and is_os_fsync(fsync):
        aio = open_aio_syncer(data_dir)
        if aio is not None:
            log.info("WAL fsync: Linux AIO (--wal-sync aio)")
            return aio
        log.warning("Linux AIO fsync is not available in {}: the WAL is fsynced on a "
                    "helper thread instead (--wal-sync thread)", data_dir)
    log.info("WAL fsync: a helper thread (--wal-sync thread)")
    return WalSyncer(fsync)
