"""compose/docker-compose.yml boots with the docker-compose v1 CLI and serves put/get.

A unique project name, random loopback host ports, and an override file that puts our
sweep labels on every service, the network and the volumes; ``down -v`` in finally."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from tests.containers import cluster as cl

pytestmark = [pytest.mark.containers, pytest.mark.timeout(240)]

COMPOSE_FILE = cl.REPO_ROOT / "compose" / "docker-compose.yml"
SERVICES = ["broker0", "broker1", "gateway"] + [f"s{s}r{r}" for s in (0, 1) for r in range(3)]


def _override(path: Path) -> None:
    labels = "".join(f'      {k}: "{v}"\n' for k, v in cl.our_labels(compose="1").items())
    text = 'version: "3.8"\nservices:\n'
    for svc in SERVICES:
        text += f"  {svc}:\n    labels:\n{labels}"
    text += "networks:\n  zkv:\n    labels:\n" + labels
    text += "volumes:\n" + "".join(
        f"  {svc}-data:\n    labels:\n{labels}" for svc in SERVICES if svc.startswith("s")
    )
    path.write_text(text)


def test_compose_boot(
    docker_client: docker.DockerClient,
    zkv_image: str,
    tmp_path: Path,
    record_property: Callable,
) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:  # CI machines have it: there a missing CLI is a failure
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and docker-compose (v1 CLI) is not installed", pytrace=False)
        pytest.skip("docker-compose (v1 CLI) not installed; the compose test needs it")
    project = f"zkvtest{cl.secrets.token_hex(4)}"
    override = tmp_path / "labels.yml"
    _override(override)
    base = [exe, "-f", str(COMPOSE_FILE), "-f", str(override), "-p", project]
    env = {
        **os.environ,
        "ZKV_IMAGE": zkv_image,
        "ZKV_BROKER0_PUBLISH": "127.0.0.1:",
        "ZKV_BROKER1_PUBLISH": "127.0.0.1:",
        "ZKV_GATEWAY_PUBLISH": "127.0.0.1:",
        **{f"ZKV_{svc.upper()}_METRICS_PUBLISH": "127.0.0.1:" for svc in SERVICES
           if svc != "gateway"},
    }

    def compose(*args: str, timeout_s: float = 120) -> str:
        proc = subprocess.run(
            [*base, *args], env=env, capture_output=True, text=True, timeout=timeout_s
        )
        assert proc.returncode == 0, f"docker-compose {args} failed:\n{proc.stderr}"
        return proc.stdout

    t0 = time.monotonic()
    try:
        compose("up", "-d")
        by_service = {
            c.labels["com.docker.compose.service"]: c
            for c in docker_client.containers.list(
                all=True, filters={"label": f"com.docker.compose.project={project}"}
            )
        }
        assert set(by_service) == set(SERVICES)
        endpoints = []
        for b in ("broker0", "broker1"):
            port = compose("port", b, "5555").strip().rsplit(":", 1)[-1]
            endpoints.append(f"tcp://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        client = cl.make_client(endpoints, timeout_s=5)
        try:
            while True:
                try:
                    nodes = cl.status_nodes(client.status())
                    leaders = {n["shard_id"] for n in nodes if cl.is_leader(n.get("role"))}
                    if len(nodes) == 6 and leaders == {0, 1}:
                        break
                except Exception:  # still forming
                    pass
                assert time.monotonic() < deadline, "compose cluster did not converge"
                time.sleep(0.3)
            booted_s = time.monotonic() - t0
            for i in range(6):
                client.put(f"compose-{i}", f"v{i}")
            assert [client.get(f"compose-{i}") for i in range(6)] == [
                f"v{i}".encode() for i in range(6)
            ]
        finally:
            cl.close_client(client)
        _check_gateway(compose("port", "gateway", "8000").strip().rsplit(":", 1)[-1])
        # every broker and node serves /metrics on its own published port (the gateway
        # serves its own on its HTTP port, checked above)
        for svc in (s for s in SERVICES if s != "gateway"):
            port = compose("port", svc, "9100").strip().rsplit(":", 1)[-1]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            series = "zkv_broker_nodes " if svc.startswith("broker") else "zkv_node_raft_term "
            assert series in text, f"{svc}: no {series.strip()} in its /metrics"
        # health checks: brokers answer pings, nodes listen, the gateway answers /health
        deadline = time.monotonic() + 40
        while True:
            health = {}
            for svc, c in by_service.items():
                c.reload()
                health[svc] = c.attrs["State"].get("Health", {}).get("Status")
            if all(h == "healthy" for h in health.values()):
                break
            assert time.monotonic() < deadline, f"not all healthy: {health}"
            time.sleep(1.0)
        record_property("compose_boot_s", round(booted_s, 2))
        print(f"compose project {project} served put/get {booted_s:.1f}s after `up`; {health}")
    finally:
        subprocess.run([*base, "down", "-v", "--remove-orphans", "-t", "2"], env=env,
                       capture_output=True, timeout=120)  # fmt: skip


def _check_gateway(port: str) -> None:
    """The gateway service: ready once both shards have leaders, and serving the keys
    written through the SDK above."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the gateway never became ready"
        time.sleep(0.5)
    assert httpx.get(url + "/kv/compose-0", timeout=10).json()["value"] == "v0"
    r = httpx.put(url + "/kv/compose-http", json={"key": "compose-http", "value": "h"}, timeout=10)
    assert r.status_code == 200, r.text
    assert httpx.get(url + "/kv/compose-http", timeout=10).json()["value"] == "h"
