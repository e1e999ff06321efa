"""Headless Chromium driven over the DevTools protocol with a tiny websocket client.

``Browser.start`` runs ``chromium --headless --remote-debugging-port=0`` in a private
profile, reads the port it chose from its stderr, opens one page target and connects to
it. ``evaluate`` runs JavaScript and returns its value; ``screenshot`` writes a PNG;
``fetched_urls`` lists every URL the page loaded (Network domain; requests the browser
blocked, e.g. by a Content-Security-Policy, are in ``blocked_urls``), so a test can
prove a page loads nothing from outside.

``chromium_path`` finds Debian's ``chromium``; the Makefile's ``browser`` target installs
it (``make test`` runs that target).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from websockets.sync.client import ClientConnection, connect


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, proc: subprocess.Popen[bytes], ws: ClientConnection, profile: str) -> None:
        self.proc, self.ws, self.profile = proc, ws, profile
        self._next_id = 0
        self._requests: dict[str, str] = {}
        self._blocked: set[str] = set()

    @classmethod
    def start(cls, binary: str, width: int = 1280, height: int = 900,
              timeout_s: float = 30.0) -> Browser:
        profile = tempfile.mkdtemp(prefix="zkv-chromium-")
        proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            port = _devtools_port(proc, timeout_s)
            req = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank",
                                         method="PUT")
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                target = json.loads(r.read())
            # Entered by hand: the connection lives as long as the Browser (close()).
            ws = connect(target["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024,
                         open_timeout=timeout_s).__enter__()
        except BaseException:
            proc.kill()
            proc.wait()
            shutil.rmtree(profile, ignore_errors=True)
            raise
        browser = cls(proc, ws, profile)
        browser.call("Page.enable")
        browser.call("Network.enable")
        return browser

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        mid = self._next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            event, params = msg.get("method"), msg.get("params", {})
            if event == "Network.requestWillBeSent":
                self._requests[params["requestId"]] = params["request"]["url"]
            elif event == "Network.loadingFailed" and params.get("blockedReason"):
                self._blocked.add(params["requestId"])
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})  # type: ignore[no-any-return]

    @property
    def fetched_urls(self) -> list[str]:
        """Every URL the page asked for and the browser did not block (e.g. by CSP)."""
        return [u for rid, u in self._requests.items() if rid not in self._blocked]

    @property
    def blocked_urls(self) -> list[str]:
        return [u for rid, u in self._requests.items() if rid in self._blocked]

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, poll_s: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(RuntimeError):  # e.g. mid-navigation
                value = self.evaluate(expression)
                if value:
                    return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not true after {timeout_s:g}s: {expression}")
            time.sleep(poll_s)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def _devtools_port(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Chromium prints ``DevTools listening on ws://127.0.0.1:PORT/...`` on stderr."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode(errors="replace")
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if m:  # keep draining stderr so a chatty browser never blocks on a full pipe
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            return int(m.group(1))
    raise RuntimeError("chromium did not start its DevTools server:\n" + "".join(seen[-20:]))


def _drain(stream: IO[bytes]) -> None:
    with contextlib.suppress(Exception):
        while stream.read(65536):
            pass
