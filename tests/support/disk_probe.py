"""A probe that times the disk's syncs next to a cluster under test.

Why: with ``--fsync always`` no write is acknowledged while the disk refuses to sync,
and the shared virtual disk of a CI machine does that now and then for hundreds of
milliseconds, for all replicas at once since they share it. A test that bounds a
cluster's unavailability (the rolling restart: at most 300 ms per shard) runs this
probe alongside and reports how much of its longest gap the disk was stalled, so a
failure says whether to look at the disk or at the cluster.

The probe is its own process (``python -m tests.support.disk_probe DIR``), so neither
the GIL nor the test's threads delay its clock reads: it overwrites one byte of a
preallocated block and ``fdatasync``s it every few milliseconds (no metadata changes,
so a slow sync is the device, not a journal commit of ours), and on SIGTERM prints
every sync slower than ``STALL_S`` as ``start end`` in ``time.monotonic`` seconds
(the system-wide clock, the same in every process). A stall that starts between two
probes is seen up to one interval late.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STALL_S = 0.050  # a sync this slow is the disk stalling, not its normal latency
INTERVAL_S = 0.005


def overlap_s(stalls: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of ``[start, end]`` covered by the (non-overlapping) ``stalls``."""
    return sum(max(0.0, min(end, e) - max(start, s)) for s, e in stalls)


class DiskStallProbe:
    """Runs the probe process on ``directory``'s disk for the ``with`` block; then
    ``stalls`` holds the (start, end) of every sync over ``STALL_S``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.stalls: list[tuple[float, float]] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> DiskStallProbe:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.disk_probe", str(self.directory)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        out, _ = self._proc.communicate(timeout=10)
        self.stalls = [(float(a), float(b)) for a, b in (line.split() for line in out.splitlines())]

    def stalled_s(self, start: float, end: float) -> float:
        """Seconds of ``[start, end]`` the disk spent refusing to sync."""
        return overlap_s(self.stalls, start, end)


def probe(directory: Path) -> None:
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    path = directory / "disk-stall-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    stalls: list[tuple[float, float]] = []
    try:
        os.pwrite(fd, b"\0" * 4096, 0)
        os.fsync(fd)
        while not stopping:
            time.sleep(INTERVAL_S)
            os.pwrite(fd, b"x", 0)
            began = time.monotonic()
            os.fdatasync(fd)
            ended = time.monotonic()
            if ended - began > STALL_S:
                stalls.append((began, ended))
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    sys.stdout.write("".join(f"{a!r} {b!r}\n" for a, b in stalls))


if __name__ == "__main__":
    probe(Path(sys.argv[1]))
