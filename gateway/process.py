"""Run ``zkv gateway`` as a child process (for ``zkv cluster up`` and the tests).

``GatewayProcess.start`` refuses early, with a reason instead of an exception, when the
http extra is missing or the port is taken, so ``zkv cluster up`` can say so and carry on
without a gateway. ``wait_healthy`` polls ``/health`` with the standard library only
(over HTTPS with ``tls``: verified against ``ca`` when given, else not verified, since
it only asks whether our own child is up). Stopping is SIGTERM (uvicorn drains in-flight
requests), then SIGKILL after a grace. ``keys``, ``tokens`` and ``tls`` become the
gateway's ``--keys``, ``--tokens`` and ``--tls-cert``/``--tls-key``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from zkv.gateway.main import http_available
from zkv.protocol.runtime import die_with_parent

GRACE_S = 5.0


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class GatewayProcess:
    def __init__(self, endpoint: str, port: int, *, host: str = "127.0.0.1", workers: int = 1,
                 log_path: Path | None = None, extra_args: tuple[str, ...] = (),
                 timeout_s: float | None = None, python: str = sys.executable,
                 keys: Path | None = None, tokens: Path | None = None,
                 tls: tuple[Path, Path] | None = None, ca: Path | None = None) -> None:
        self.endpoint, self.port, self.host, self.workers = endpoint, port, host, workers
        self.keys, self.tokens, self.tls, self.ca = keys, tokens, tls, ca
        self.log_path = log_path
        self.extra_args = extra_args
        self.timeout_s = timeout_s
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        argv = [self.python, "-m", "zkv.client.cli", "--endpoint", self.endpoint]
        if self.timeout_s is not None:
            argv += ["--timeout", str(self.timeout_s)]
        if self.keys is not None:
            argv += ["--keys", str(self.keys)]
        argv += ["gateway", "--host", self.host, "--port", str(self.port),
                 "--workers", str(self.workers)]
        if self.tokens is not None:
            argv += ["--tokens", str(self.tokens)]
        if self.tls is not None:
            argv += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        return argv + list(self.extra_args)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        if self.ca is not None:
            return ssl.create_default_context(cafile=str(self.ca))
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def start(self) -> str | None:
        """Start the gateway; None on success, else why it was not started."""
        missing = http_available()
        if missing is not None:
            return f"the http extra is not installed ({missing})"
        if not port_free(self.host, self.port):
            return f"port {self.port} on {self.host} is taken"
        out: int | IO[bytes] = subprocess.DEVNULL
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            out = self._log
        # Its own session (a terminal's Ctrl-C goes to the supervisor, which stops it),
        # and it dies with the supervisor like the nodes and brokers do: a gateway left
        # behind by a killed supervisor would hold the HTTP port.
        on_main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=die_with_parent if on_main and sys.platform == "linux" else None,
        )
        return None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout_s: float = 20.0,
                     cancelled: Callable[[], bool] = lambda: False) -> bool:
        """True once ``/health`` answers 200; False after ``timeout_s``, when the gateway
        exits or once ``cancelled()`` is true (it may also raise to stop the wait)."""
        deadline = time.monotonic() + timeout_s
        context = self._ssl_context()
        while time.monotonic() < deadline and self.alive and not cancelled():
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(self.url + "/health", timeout=1.0,
                                           context=context) as r:
                if r.status == 200:
                    return True
            time.sleep(0.1)
        return False

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = GRACE_S) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # the workers too, when --workers > 1
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
