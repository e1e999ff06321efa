"""The original README's curl commands, verbatim, against the gateway that
``zkv cluster up`` (what ``make run`` runs) starts; and ``zkv cluster up`` carrying on
without a gateway when its port is taken."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from zkv.client.cli import build_parser
from zkv.gateway.process import port_free
from zkv.ops.cluster import free_port, free_port_block

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

README_PORT = 8000
# Verbatim from the README of the service zkv grew out of.
README_CURLS = [
    "curl http://localhost:8000/health",
    """curl -X PUT http://localhost:8000/kv/foo -H 'Content-Type: application/json' -d '{"key": "foo", "value": "bar"}'""",
    "curl http://localhost:8000/kv/foo",
    "curl -X DELETE http://localhost:8000/kv/foo",
]


def _cluster_up(data: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "zkv.client.cli", "cluster", "up", "--data-dir", str(data),
           "--port", str(free_port_block(3)), "--fsync", "always", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out, err


@pytest.fixture
def gateway_port() -> Iterator[int]:
    """8000 as in the README when it is free here, else any free port (the commands'
    port is then rewritten, nothing else)."""
    yield README_PORT if port_free("127.0.0.1", README_PORT) else free_port()


def test_cluster_up_defaults_to_a_gateway_on_8000() -> None:
    args = build_parser().parse_args(["cluster", "up"])
    assert args.http_port == README_PORT and args.http_workers == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_commands_against_cluster_up(tmp_path: Path, gateway_port: int) -> None:
    proc = _cluster_up(tmp_path / "data", "--http-port", str(gateway_port))
    try:
        assert proc.stdout is not None
        serving = proc.stdout.readline()
        assert serving.startswith("zkv cluster up: serving on tcp://"), serving
        line = proc.stdout.readline()
        assert line.startswith(f"zkv cluster up: HTTP gateway on http://127.0.0.1:{gateway_port}"), line
        answers = []
        for command in README_CURLS:
            command = command.replace(":8000/", f":{gateway_port}/")
            done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, (command, done.stderr)
            answers.append(json.loads(done.stdout))
        health, put, get, delete = answers
        assert health == {"status": "ok"}
        assert put == {"key": "foo", "version": put["version"]} and put["version"] >= 1
        assert get == {"key": "foo", "value": "bar", "version": put["version"]}
        assert delete == {"key": "foo", "deleted": True}
    finally:
        _out, err = _stop(proc)
    assert proc.returncode == 0, err
    assert port_free("127.0.0.1", gateway_port), "the gateway outlived zkv cluster up"


def test_cluster_up_runs_without_a_gateway_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = _cluster_up(tmp_path / "data", "--shards", "1", "--replicas", "1",
                           "--http-port", str(port))
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("zkv cluster up: serving on tcp://")
            time.sleep(1.0)  # the supervisor keeps running without the gateway
            assert proc.poll() is None
        finally:
            _out, err = _stop(proc)
    assert f"no HTTP gateway: port {port} on 127.0.0.1 is taken; running without it" in err
    assert proc.returncode == 0, err


def _pids_with(*words: str) -> list[int]:
    """Processes whose command line holds every one of ``words``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(w.encode() in argv for w in words):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_the_gateway_dies_with_a_killed_supervisor(tmp_path: Path) -> None:
    """SIGKILL of `zkv cluster up` takes its gateway too, as it takes its nodes and
    brokers: a gateway left behind held port 8000 after a killed supervisor, so the next
    `make run` or `make compose-up` could not serve HTTP."""
    port = free_port_block(1)
    proc = _cluster_up(tmp_path / "data", "--shards", "1", "--replicas", "1",
                       "--http-port", str(port))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("zkv cluster up: serving on tcp://")
        assert proc.stdout.readline().startswith("zkv cluster up: HTTP gateway on")
        gateways = _pids_with("gateway", "--port", str(port))
        assert gateways, "no gateway process found"
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _pids_with("gateway", "--port", str(port)):
            assert time.monotonic() < deadline, "the gateway outlived its supervisor"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _pids_with("gateway", "--port", str(port)):
            os.kill(pid, signal.SIGKILL)
