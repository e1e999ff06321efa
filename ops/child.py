"""One supervised child process: started in its own session with its log, signalled,
killed with a grace period.

A child runs in a new session, so a Ctrl-C at the terminal reaches only the supervisor,
which then stops its children in order (SIGTERM, a grace period, SIGKILL). On Linux a
child started from the main thread also dies with that thread (``PR_SET_PDEATHSIG``)
if the supervisor itself is killed. A SIGSTOPped child gets SIGCONT before any
terminating signal, since it could not act on one otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from zkv.protocol.runtime import die_with_parent


@dataclass
class Child:
    name: str
    kind: str  # "broker" | "node"
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    reported: bool = False
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(child: Child) -> None:
    """Start (or start again) ``child``, appending to its log."""
    if child.log is None or child.log.closed:
        child.log = open(child.log_path, "ab")  # noqa: SIM115 - owned by the child record
    child.log.write(f"--- {time.strftime('%H:%M:%S')} zkv cluster: starting "
                    f"{' '.join(child.argv)}\n".encode())
    child.log.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    on_main = threading.current_thread() is threading.main_thread()
    child.proc = subprocess.Popen(
        child.argv, stdin=subprocess.DEVNULL, stdout=child.log, stderr=subprocess.STDOUT,
        env=env, start_new_session=True,
        preexec_fn=die_with_parent if on_main and sys.platform == "linux" else None,
    )
    child.started_at = time.monotonic()
    child.reported = False


def stop_all(children: list[Child], grace_s: float) -> None:
    """SIGTERM every running child, wait ``grace_s``, SIGKILL the rest; close the logs."""
    running = [c for c in children if c.proc is not None]
    for c in running:
        if c.alive:
            send_signal(c, signal.SIGCONT)  # a SIGSTOPped child cannot handle SIGTERM
            send_signal(c, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for c in running:
        assert c.proc is not None
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            send_signal(c, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=5)
    for c in children:
        if c.log is not None:
            c.log.close()
            c.log = None


def send_signal(c: Child, sig: int) -> None:
    if c.proc is not None:
        with contextlib.suppress(ProcessLookupError):
            c.proc.send_signal(sig)


def kill(c: Child, sig: int, grace_s: float) -> None:
    """Send ``sig``; for a terminating signal wait for the exit (SIGKILL after grace)."""
    if not c.alive:
        return
    assert c.proc is not None
    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        send_signal(c, signal.SIGCONT)
    send_signal(c, sig)
    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        try:
            c.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            send_signal(c, signal.SIGKILL)
            c.proc.wait(timeout=5)
