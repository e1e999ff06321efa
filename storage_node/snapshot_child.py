"""Snapshots written by a forked child, so the node's loop never waits for them.

Serializing a shard of a million keys takes the loop 0.6-1.6 s on these machines,
longer than an election timeout: a leader taking a snapshot looked dead and the shard
held an election (four while loading 1,000,000 keys into 1 x 3). Redis's answer, BGSAVE,
fits: ``fork()`` gives the child a copy-on-write image of the process as it is, the
state machine exactly at the applied index the snapshot is named after, and the child
serializes and writes it (temp file, fsync, rename, fsync dir: ``save_snapshot``) while
the parent goes on serving. The parent polls the child once per loop turn
(``waitpid(WNOHANG)``) and compacts its log when the file is there.

Rules: the child touches no socket, log sink or lock the parent's threads might hold;
it leaves with ``os._exit`` (no atexit handlers, no zmq teardown), and its exit status
says what happened: 0 written, ``EXIT_DISK_FULL`` no space, anything else a failure the
parent logs. ``die_with_parent`` makes a child whose parent was SIGKILLed die too, so no
orphan writes into a data dir a restarted node already uses. Memory: pages the parent
writes while the child runs are copied, so a busy node can need up to twice its state
for the few seconds the child takes (the README's limits say so). Platforms without
``fork`` write snapshots inline (``NodeConfig.background_snapshots``).
"""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from zkv.protocol.runtime import die_with_parent
from zkv.storage_node.wal import is_disk_full

#: the child's exit status when the disk had no room
EXIT_DISK_FULL = 28
EXIT_FAILED = 1
CAN_FORK = hasattr(os, "fork")


@dataclass(slots=True)
class SnapshotChild:
    """A child writing the snapshot at ``index`` (``term``)."""

    pid: int
    index: int
    term: int
    started: float
    #: how long ``fork()`` stopped the parent (page tables copied), in ms
    fork_ms: float = 0.0

    @classmethod
    def fork(cls, index: int, term: int, write: Callable[[], None]) -> SnapshotChild:
        """Run ``write`` (serialize and save the snapshot) in a forked child."""
        started = time.monotonic()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; its exit status is what is tested
            status = EXIT_FAILED
            try:
                die_with_parent()
                if os.getppid() != parent:  # the parent died before the line above
                    os._exit(EXIT_FAILED)  # (it held the node's ports: free them now)
                gc.disable()  # a collection would touch (and copy) every page
                write()
                status = 0
            except BaseException as exc:  # noqa: BLE001 - anything: report by exit status
                status = EXIT_DISK_FULL if is_disk_full(exc) else EXIT_FAILED
            finally:
                os._exit(status)
        now = time.monotonic()
        return cls(pid, index, term, started, (now - started) * 1000)

    def poll(self) -> int | None:
        """The child's exit status once it has ended (reaped), else None."""
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        """Stop the child and reap it (the node is closing)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
