"""Background fsync for group commit: the disk works while the loop keeps serving.

The node appends a batch to the WAL (a ``write``), hands the duplicated descriptor to
``BackgroundSyncer.submit`` with a ticket (the batch's last log index), and goes on
receiving. The thread takes every request queued so far, fsyncs each file once, and
reports the highest ticket done through a pipe the node's poller watches, so batches
that arrive while the disk is busy share the next fsync. Only the node's loop touches
the replica core; this thread only calls ``os.fsync``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque

from loguru import logger


class BackgroundSyncer:
    def __init__(self) -> None:
        self._queue: deque[tuple[int, int]] = deque()  # (fd, ticket)
        self._done: deque[int] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="wal-fsync", daemon=True)
        self._thread.start()

    @property
    def fileno(self) -> int:
        """Readable when tickets completed: register it with the poller."""
        return self._read_fd

    def submit(self, fd: int, ticket: int) -> None:
        with self._cond:
            self._queue.append((fd, ticket))
            self._cond.notify()

    def completed(self) -> int | None:
        """Highest ticket durable since the last call (None if none)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._read_fd, 4096)
        best = None
        while self._done:
            t = self._done.popleft()
            best = t if best is None or t > best else best
        return best

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            try:
                # Descriptors of the same file: fsyncing the newest covers the others.
                os.fsync(batch[-1][0])
                for fd, _ in batch[:-1]:
                    if not _same_file(fd, batch[-1][0]):
                        os.fsync(fd)
            except OSError as exc:  # the node checks ``error`` and stops
                logger.error("fsync failed: {}", exc)
                self.error = exc
            finally:
                for fd, _ in batch:
                    os.close(fd)
            if self.error is None:
                self._done.append(max(t for _, t in batch))
                os.write(self._write_fd, b"x")

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)
        os.close(self._read_fd)
        os.close(self._write_fd)


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
