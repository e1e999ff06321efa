"""fsync off the node's loop: the WAL's group commit runs on one helper thread.

(``--wal-sync thread``, and wherever Linux AIO is unavailable: by default the kernel
runs the same fsync, ``aio_syncer.py``, which spares the wake-ups of a Python thread;
``wal_sync.py`` chooses. Both keep this contract.)

Why: with ``--fsync always`` the loop used to wait in ``fsync`` once per turn. A disk
that stalls (a journal commit, a neighbour's burst: 200-400 ms seen on a shared virtual
disk, more elsewhere) then stopped everything the loop does, heartbeats included, and a
stall near the election timeout deposed healthy leaders (5 elections in 10 minutes of
full load at 700 ms). Now the loop writes the entries (``os.write``, cheap), hands a
duplicate of the segment's descriptor to this thread, and goes on serving, heartbeating
and writing the next entries while the disk works; the next sync covers everything
written meanwhile (group commit across turns). The thread's ``fsync`` releases the GIL.

What waits for the sync (``node_disk.py``): everything that promises durable state.
The replica core hears ``persisted`` only once the sync covering an index returns (a
leader counts itself toward a commit only then), and a turn's acks and votes are held
until the disk holds what they claim, then sent in order. A leader's appends to its
followers never waited for its own disk (``node_core.py``) and still do not.

The loop still waits for a sync, but only briefly (``wait(timeout)``: a quarter of a
heartbeat interval): a healthy disk answers within it, so the turn ends as it did when
the loop fsynced inline (the same batches, acks sent in the same turn, no extra wake-up;
a background sync with no wait at all cost ~20% more CPU per write: smaller batches and
twice the loop turns); a stalled one no longer holds the loop past it.

One sync at a time: ``start`` while one runs is a caller bug. The descriptor is a
``dup``: fsync of any descriptor of a file flushes all of that file's written data, and
the WAL may close its own (a roll to the next segment) while the thread still syncs.
A truncation or a snapshot install first waits for the sync in flight (``wait``), so a
late answer can never cover entries written after it. Completion is signalled through a
pipe that the loop polls with its sockets. A failed fsync is handed back to the loop,
which poisons the WAL and exits (``wal.py``: a failed fsync proves nothing on retry).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SyncDone:
    """A finished sync: the WAL is durable up to ``index`` unless ``error``."""

    index: int
    entries: int
    seconds: float
    error: OSError | None


class WalSyncer:
    """One thread that fsyncs descriptors handed to it, one at a time."""

    def __init__(self, fsync: Callable[[int], None]) -> None:
        self._fsync = fsync
        self._requests: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[SyncDone] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        #: the index the sync in flight will make durable; None: none in flight
        self.in_flight: int | None = None
        self._lock = threading.Lock()
        self._loop_waiting = False  # the loop is in ``wait``: it takes the result itself
        self._thread = threading.Thread(target=self._run, name="wal-sync", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        """Readable when a sync has finished (poll it with the sockets)."""
        return self._wake_r

    def start(self, fd: int, index: int, entries: int) -> None:
        """fsync ``fd`` (which this object closes) on the thread; it covers ``index``."""
        if self.in_flight is not None:
            os.close(fd)
            raise RuntimeError("a WAL sync is already in flight")
        self.in_flight = index
        self._requests.put((fd, index, entries))

    def collect(self) -> SyncDone | None:
        """The finished sync, if any (never blocks)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        try:
            done = self._done.get_nowait()
        except queue.Empty:
            return None
        self.in_flight = None
        return done

    def wait(self, timeout: float | None = None) -> SyncDone | None:
        """Wait for the sync in flight (if any), at most ``timeout`` seconds (None: as
        long as it takes), and return it; None if it is still running. A sync that
        finishes while the loop waits here does not signal the pipe (no stale wake)."""
        if self.in_flight is None:
            return None
        with self._lock:
            self._loop_waiting = True
        done: SyncDone | None
        try:
            done = self._done.get(timeout=timeout)
        except queue.Empty:
            done = None
        with self._lock:
            self._loop_waiting = False
            if done is None:
                try:
                    done = self._done.get_nowait()  # it finished as we gave up
                except queue.Empty:
                    return None
        self.in_flight = None
        return done

    def close(self) -> SyncDone | None:
        """Finish the sync in flight, stop the thread, release the pipe."""
        done = self.wait()
        self._requests.put(None)
        self._thread.join(timeout=5.0)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        return done

    def _run(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            fd, index, entries = item
            started = time.perf_counter()
            error: OSError | None = None
            try:
                self._fsync(fd)
            except OSError as exc:
                error = exc
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._done.put(SyncDone(index, entries, time.perf_counter() - started, error))
            with self._lock:
                signal = not self._loop_waiting
            if signal:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._wake_w, b"\0")
