"""The disk calls the WAL makes, and what a full disk looks like.

Separate from ``wal.py`` so a unit test can inject a failing or stalling disk
(``DiskIO``), and so code that only needs to recognise a full disk (snapshots, the
node's retry rules) does not import the log.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass


class DiskFullError(OSError):
    """No space for this write; nothing of it stayed on disk. Retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _os_write(fd: int, data: bytes | memoryview) -> int:
    return os.write(fd, data)


def _os_pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
    return os.pwrite(fd, data, offset)


#: ``fdatasync`` where the platform has it: the data and what is needed to read it back
#: (the file's size), not its timestamps, whose update would cost a journal commit per
#: sync even when records overwrite the zero-filled tail (``wal_tail.py``).
def _os_fsync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


def is_os_fsync(fsync: Callable[[int], None]) -> bool:
    """Whether ``fsync`` is the operating system's (not a test's injected disk)."""
    return fsync is _os_fsync


@dataclass(frozen=True, slots=True)
class DiskIO:
    """The calls a full or failing disk makes fail, so a unit test can inject them."""

    write: Callable[[int, bytes | memoryview], int] = _os_write
    fsync: Callable[[int], None] = _os_fsync
    pwrite: Callable[[int, bytes | memoryview, int], int] = _os_pwrite
