"""Headless Chromium on the gateway's pages, against a real cluster under load.

``/ui`` must show every shard's leader and a non-empty throughput chart once load
runs, and a SIGKILLed leader's replacement within 3 s; ``/docs`` and ``/redoc`` must
render from the gateway alone (every URL the browser requests is the gateway's).
Screenshots are kept in ``artifacts/`` (gitignored) and in the test's tmp dir.

Chromium is Debian's ``chromium`` (``make browser`` installs it; ``make test`` runs that
target). Without it the test skips, except under CI, where it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.cdp import Browser, chromium_path
from tests.support.gateway import running_gateway
from zkv.gateway.process import GatewayProcess
from zkv.ops.cluster import LocalCluster

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
LEADER_CHANGE_S_MAX = 3.0


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing under CI: `make browser` should have installed it")
        pytest.skip("chromium is not installed (run `make browser` as root to install "
                    "Debian's chromium package)")
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    data = tmp_path_factory.mktemp("browser-cluster")
    with LocalCluster(data, shards=2, replicas=3, port=0, fsync="always") as c:
        c.wait_ready(30)
        yield c


@pytest.fixture(scope="module")
def gateway(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    with running_gateway(cluster, tmp_path_factory.mktemp("browser-logs")) as gw:
        yield gw


@pytest.fixture
def browser(chromium: str) -> Iterator[Browser]:
    b = Browser.start(chromium)
    try:
        yield b
    finally:
        b.close()


def _keep_artifact(shot: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)


def _load(url: str, stop: threading.Event) -> None:
    """Bounded background traffic: PUT and GET until told to stop (or 120 s)."""
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=url, timeout=10) as c:
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                c.put(f"/kv/load{i % 200}", content=b"x" * 64)
                c.get(f"/kv/load{(i * 7) % 200}")
            except httpx.HTTPError:
                time.sleep(0.05)
            i += 1


_LEADERS_JS = ("JSON.stringify(Object.fromEntries([...document.querySelectorAll('[data-shard]')]"
               ".map(e => [e.dataset.shard, e.dataset.leader])))")


def test_ui_shows_leaders_chart_and_a_leader_change(
        browser: Browser, gateway: GatewayProcess, cluster: LocalCluster, tmp_path: Path) -> None:
    import json

    stop = threading.Event()
    load = threading.Thread(target=_load, args=(gateway.url, stop), daemon=True)
    load.start()
    try:
        browser.navigate(gateway.url + "/ui")
        leaders = cluster.leaders()
        expected = {str(s): n for s, n in leaders.items()}
        compact = json.dumps(expected, separators=(",", ":"))
        browser.wait_for(f"{_LEADERS_JS} === {json.dumps(compact)}", 15)
        # A non-empty chart: samples drawn, and traffic on the requests/s line.
        browser.wait_for("Number(document.getElementById('chart').dataset.points) >= 3 && "
                         "document.getElementById('rps-line') !== null && "
                         "Number(document.getElementById('rps-now').textContent) > 0", 20)
        n_points = browser.evaluate(
            "document.getElementById('rps-line').getAttribute('points').split(' ').length")
        assert n_points >= 3
        text = browser.evaluate("document.body.innerText")
        for sid, leader in expected.items():
            assert f"shard {sid} · leader {leader}" in text
        assert "Ring shares" in text and "follower" in text
        shot = browser.screenshot(tmp_path / "ui-before-kill.png")
        _keep_artifact(shot)

        old = leaders[0]
        assert old is not None
        cluster.kill_node(old, signal.SIGKILL)
        killed_at = time.monotonic()
        new = browser.wait_for(
            "(() => { const e = document.querySelector('[data-shard=\"0\"]');"
            f" const l = e && e.dataset.leader; return l && l !== {json.dumps(old)} ? l : ''; }})()",
            LEADER_CHANGE_S_MAX + 2, poll_s=0.05)
        took_s = time.monotonic() - killed_at
        shot = browser.screenshot(tmp_path / "ui-after-kill.png")
        _keep_artifact(shot)
        assert took_s <= LEADER_CHANGE_S_MAX, f"the page showed {new} after {took_s:.2f}s"
        assert new != old and new.startswith("s0r")
        assert browser.evaluate(
            f"document.querySelector('[data-node=\"{old}\"]')?.className") in ("down", None)
    finally:
        stop.set()
        load.join(15)
        cluster.restart_node(leaders[0] or "s0r0")
    own = gateway.url + "/"
    assert all(u.startswith(own) or u == "about:blank" for u in browser.fetched_urls), \
        browser.fetched_urls


@pytest.mark.parametrize("page,rendered", [
    ("/docs", "document.querySelectorAll('.swagger-ui .opblock').length >= 4 && "
              "document.querySelector('.swagger-ui .info .title').textContent"),
    ("/redoc", "document.querySelectorAll('[data-section-id]').length >= 4 && "
               "document.querySelector('h1').textContent"),
])
def test_docs_render_offline(browser: Browser, gateway: GatewayProcess, tmp_path: Path,
                             page: str, rendered: str) -> None:
    browser.navigate(gateway.url + page)
    title = browser.wait_for(rendered, 20)
    assert "zkv gateway" in title
    _keep_artifact(browser.screenshot(tmp_path / f"docs{page.replace('/', '-')}.png"))
    own = gateway.url + "/"
    local = (own, "about:blank", "data:", f"blob:{own}")
    outside = [u for u in browser.fetched_urls if not u.startswith(local)]
    assert outside == [], f"{page} fetched from the network: {outside}"
