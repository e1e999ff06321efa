"""Run ``zkv`` as a real subprocess and follow its output line by line.

``ZkvCli`` starts ``python -m zkv.client.cli ARGS`` in its own session with stdout and stderr
merged, and a daemon thread feeds the lines into a queue, so a test can wait (with a
deadline) for a line, act on it (e.g. SIGKILL the process the moment it reports a step),
and still collect every line. It is a context manager: the process is SIGKILLed on exit
if it still runs, even when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EOF = None


class CliTimeout(AssertionError):
    """The command did not print the expected line or exit within its deadline."""


class ZkvCli:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.argv = [sys.executable, "-m", "zkv.client.cli", *args]
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(EOF)

    def next_line(self, deadline: float) -> str | None:
        """The next line, or None at end of output; raises ``CliTimeout`` at the deadline."""
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise CliTimeout(f"{self.argv[3:]}: no output in time; so far: {self.lines}") from None
        if line is not None:
            self.lines.append(line)
        return line

    def follow(self, on_line: Callable[[str], bool], timeout_s: float) -> str | None:
        """Feed lines to ``on_line`` until it returns True (returns that line) or the output
        ends (returns None)."""
        deadline = time.monotonic() + timeout_s
        while (line := self.next_line(deadline)) is not None:
            if on_line(line):
                return line
        return None

    def wait(self, timeout_s: float) -> int:
        """Read to the end of the output and return the exit code."""
        deadline = time.monotonic() + timeout_s
        while self.next_line(deadline) is not None:
            pass
        try:
            return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise CliTimeout(f"{self.argv[3:]} did not exit; output: {self.lines}") from None

    def kill(self) -> int:
        """SIGKILL the process (no cleanup runs in it) and return its exit code."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def __enter__(self) -> ZkvCli:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
