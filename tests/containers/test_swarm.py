"""The Swarm stack for real, on a single-node Swarm made for the test.

compose/docker-compose.yml + compose/docker-stack.secure.yml are deployed with
``docker stack deploy`` (keys as Swarm secrets and configs, every storage node pinned by
its node label; the one node carries them all), served put/get through the published
brokers with the SDK (Curve, client key) and through the gateway, then a lost host is
replaced as compose/README.md says: the label of s0r1's host goes, its task can no
longer be placed, the spare s0r3 (compose/docker-stack.spares.yml) gets a labelled host
and ``zkv admin replace-replica 0 s0r1 --node-id s0r3`` makes it a voter in s0r1's
place, with every key still there.

Last, s1r2's volume is wiped under it (same host, empty disk): it comes back as a
non-voter and the leader re-admits it with its new incarnation, as the README says.

Secure, because that is the stack's multi-machine form. Brokers and gateway are
published in host mode and services resolve by dnsrr: the routing mesh and VIPs need
IPVS, which the test machine's kernel lacks.

The engine is left as it was found: the test runs only on an engine in no swarm
(otherwise it skips and says so), makes one with ``docker swarm init``, and in ``finally``
removes the stack, waits for its containers and networks to go, removes its volumes,
leaves the swarm and removes the ``docker_gwbridge`` network the swarm created. The
node carries our sweep labels, so a swarm left by a killed run is recognised (its
creating process is dead) and left by the next run instead of making it skip.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.containers import cluster as cl

pytestmark = [pytest.mark.containers, pytest.mark.timeout(600)]

STACK = "zkvtest-swarm"
NAMESPACE = "com.docker.stack.namespace"
COMPOSE = cl.REPO_ROOT / "compose"
FILES = ["docker-compose.yml", "docker-stack.secure.yml"]
NODES = [f"s{s}r{r}" for s in (0, 1) for r in range(3)]
SERVICES = ["broker0", "broker1", "gateway", *NODES]
GWBRIDGE = "docker_gwbridge"


def _docker(*args: str, timeout_s: float = 120, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def _swarm_state(client: docker.DockerClient) -> str:
    return str(client.info().get("Swarm", {}).get("LocalNodeState", "inactive"))


def _leave_a_dead_runs_swarm(client: docker.DockerClient) -> None:
    """A swarm that a killed run of this test made (its only node carries our labels
    and the creating process is gone) is left, so it does not make this run skip."""
    if _swarm_state(client) != "active":
        return
    with contextlib.suppress(Exception):
        nodes = client.nodes.list()
        labels = nodes[0].attrs["Spec"].get("Labels") or {}
        if len(nodes) == 1 and labels.get(f"{cl.LABEL}.swarm") == "1" and cl._owner_dead(labels):
            _remove_stack(client)
            _docker("swarm", "leave", "--force", check=False)
            _wait("the engine out of the dead run's swarm", 30,
                  lambda: _swarm_state(client) == "inactive")
            _remove_volumes(client)
            if labels.get(f"{cl.LABEL}.gwbridge") == "made":
                _remove_gwbridge(client)


@contextlib.contextmanager
def single_node_swarm(client: docker.DockerClient) -> Iterator[str]:
    """``docker swarm init`` on an engine in no swarm; the engine as found afterwards."""
    _leave_a_dead_runs_swarm(client)
    state = _swarm_state(client)
    if state != "inactive":
        pytest.skip(f"the Docker engine is already part of a swarm (state {state!r}): the "
                    "test makes its own single-node swarm and must not deploy into, or "
                    "leave, one it did not create")
    had_gwbridge = bool(client.networks.list(names=[GWBRIDGE]))
    _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    try:
        node_id = str(client.info()["Swarm"]["NodeID"])
        made = {"gwbridge": "found" if had_gwbridge else "made"}
        labels = {**cl.our_labels(swarm="1", **made),
                  **{f"zkv.{n}": "true" for n in ["broker0", "broker1", "gateway", *NODES]}}
        _docker("node", "update", *(a for k, v in labels.items()
                                    for a in ("--label-add", f"{k}={v}")), node_id)
        yield node_id
    finally:
        _docker("swarm", "leave", "--force", check=False)
        _remove_volumes(client)  # if removing the stack failed before it got to them
        if not had_gwbridge:
            _remove_gwbridge(client)


def _remove_gwbridge(client: docker.DockerClient) -> None:
    """The swarm made docker_gwbridge; after leaving, only the ingress sandbox's
    endpoint may still be on it (it goes asynchronously, or never): disconnected."""
    names: list[str] = []
    for _ in range(30):
        try:
            net = client.networks.get(GWBRIDGE)
        except docker.errors.NotFound:
            return
        names = [c.get("Name", "") for c in (net.attrs.get("Containers") or {}).values()]
        for name in names:
            if name.endswith("ingress-sbox"):
                with contextlib.suppress(docker.errors.APIError):
                    net.disconnect(name, force=True)
        with contextlib.suppress(docker.errors.APIError):
            net.remove()
        time.sleep(0.5)
    raise AssertionError(
        f"{GWBRIDGE}, made by the test's swarm, could not be removed"
        + ("" if names else " (no container is on it: dockerd has lost count of its "
           "endpoints, moby#37018; restarting dockerd clears it)"))


#: how long the stack's networks may outlive its containers before we remove them: the
#: swarm's task manager removes them itself, and removing one at the same moment races
#: its endpoint deletions (dockerd logs "key modified ... retrying"); on a loaded engine
#: that race once left docker_gwbridge counting an endpoint that no longer existed
NETWORKS_LINGER_S = 20.0


def _remove_stack(client: docker.DockerClient, wait_s: float = 120) -> None:
    """``docker stack rm``, then wait for its containers and networks to go (a network
    the swarm has not removed ``NETWORKS_LINGER_S`` after the last container is removed
    here), then remove its volumes (local to this engine, left by ``stack rm``)."""
    _docker("stack", "rm", STACK, check=False)
    flt = {"label": f"{NAMESPACE}={STACK}"}
    deadline = time.monotonic() + wait_s
    containers_gone_at: float | None = None
    while True:
        # sparse: no inspect per container, which fails for one removed meanwhile
        containers = client.containers.list(all=True, sparse=True, filters=flt)
        networks = client.networks.list(filters=flt)
        if not containers and not networks:
            break
        now = time.monotonic()
        if now > deadline:
            raise AssertionError(f"stack {STACK} left {[c.id[:12] for c in containers]} and "
                                 f"{[n.name for n in networks]} after {wait_s:g}s")
        if containers:
            containers_gone_at = None
        elif containers_gone_at is None:
            containers_gone_at = now
        elif now - containers_gone_at > NETWORKS_LINGER_S:
            for net in networks:
                with contextlib.suppress(docker.errors.APIError):
                    net.remove()
        time.sleep(1.0)
    _remove_volumes(client)


def _remove_volumes(client: docker.DockerClient) -> None:
    """The stack's volumes (``stack rm`` leaves them), once no container uses them."""
    flt = {"label": f"{NAMESPACE}={STACK}"}
    for _ in range(30):
        if not client.containers.list(all=True, sparse=True, filters=flt):
            break
        time.sleep(1.0)
    for vol in client.volumes.list(filters=flt):
        with contextlib.suppress(docker.errors.APIError):
            vol.remove(force=True)


def _free_port() -> int:
    """A port free on every interface (host-mode publishing binds 0.0.0.0), below the
    ephemeral range and away from the compose defaults."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 29999)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 20000-29999")


def _wait(what: str, timeout_s: float, probe: Callable[[], Any], every_s: float = 0.5) -> Any:
    return cl.wait_until(what, timeout_s, probe, every_s)


def _converged(kv: Any, nodes: set[str]) -> bool:
    status = cl.status_nodes(kv.status())
    leaders = {n["shard_id"] for n in status if cl.is_leader(n.get("role"))}
    return {n["node_id"] for n in status} >= nodes and leaders == {0, 1}


def _node(kv: Any, node_id: str) -> dict[str, Any]:
    """``node_id``'s status entry, with its ``extra`` (membership, incarnation) inlined."""
    node = next(n for n in cl.status_nodes(kv.status()) if n["node_id"] == node_id)
    return {**node, **(node.get("extra") or {})}


def _logs(client: docker.DockerClient) -> str:
    out = []
    with contextlib.suppress(Exception):  # containers come and go while we read
        for c in client.containers.list(all=True, sparse=True,
                                        filters={"label": f"{NAMESPACE}={STACK}"}):
            with contextlib.suppress(Exception):
                name = c.attrs.get("Names", [c.id])[0]
                out.append(f"--- {name}\n{c.logs(tail=25).decode(errors='replace')}")
    return "\n".join(out)


def test_swarm_stack_secure_put_get_and_replace_a_lost_host(
    docker_client: docker.DockerClient, zkv_image: str, tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed (docker stack deploy needs it)")
    from zkv.ops.keys import cluster_node_ids, generate

    ports: set[int] = set()
    while len(ports) < 13:  # host-mode publishing: two brokers, the gateway, 10 metrics
        ports.add(_free_port())
    p0, p1, pgw, *metrics = sorted(ports)
    keys = tmp_path / "keys"
    brokers = {b: [f"tcp://{b}:5555", f"tcp://{b}:5556", f"tcp://{b}:5557",
                   f"tcp://127.0.0.1:{p}"] for b, p in (("broker0", p0), ("broker1", p1))}
    # --replicas 4: the spares s0r3 / s1r3 that replace-replica brings in
    generate(keys, cluster_node_ids(2, 4), list(brokers), broker_endpoints=brokers,
             gateway="gateway")
    env = {
        **os.environ,
        "ZKV_IMAGE": zkv_image,
        "ZKV_STACK_KEYS": str(keys),
        "ZKV_BROKER0_PUBLISH": str(p0),
        "ZKV_BROKER1_PUBLISH": str(p1),
        "ZKV_GATEWAY_PUBLISH": str(pgw),
        **{f"ZKV_{n.upper()}_METRICS_PUBLISH": str(port) for n, port in
           zip(["broker0", "broker1", *NODES, "s0r3", "s1r3"], metrics, strict=True)},
    }

    def deploy(*files: str) -> None:
        args = [a for f in files for a in ("-c", str(COMPOSE / f))]
        _docker("stack", "deploy", "--resolve-image", "never", *args, STACK, env=env)

    endpoints = [f"tcp://127.0.0.1:{p0}", f"tcp://127.0.0.1:{p1}"]
    kv: Any = None
    with single_node_swarm(docker_client) as node_id:
        try:
            for vol in docker_client.volumes.list(filters={"label": f"{NAMESPACE}={STACK}"}):
                vol.remove(force=True)  # a killed run's data must not be adopted
            t0 = time.monotonic()
            deploy(*FILES)
            from zkv.client import KVClient

            kv = KVClient(endpoints, timeout_s=5, keys=keys / "client")
            _wait("the stack electing a leader per shard", 150,
                  lambda: _converged(kv, set(NODES)))
            booted_s = time.monotonic() - t0
            for i in range(20):
                kv.put(f"swarm-{i}", f"v{i}")
            assert [kv.get(f"swarm-{i}") for i in range(20)] == [
                f"v{i}".encode() for i in range(20)]
            _check_gateway(pgw, keys / "gateway" / "tokens")
            by_service = {c.labels["com.docker.swarm.service.name"][len(STACK) + 1:]: c
                          for c in docker_client.containers.list(
                              filters={"label": f"{NAMESPACE}={STACK}"})}
            assert set(by_service) == set(SERVICES), sorted(by_service)
            find = ["find", "/run/secrets/zkv", "(", "-name", "*.key_secret", "-o", "-name",
                    "tokens", ")", "-exec", "stat", "-L", "-c", "%a", "{}", "+"]
            for svc, c in by_service.items():  # keys: secrets 0400, public keys configs
                # retried: on a loaded engine an exec now and then comes back empty
                _wait(f"{svc}: its secret files mode 0400", 30,
                      lambda c=c: _modes_are_0400(c.exec_run(find).output.decode()),
                      every_s=1.0)
            _wait("every task healthy", 60, lambda: all(
                _health(c) == "healthy" for c in by_service.values()), every_s=1.0)

            # a host lost for good: its label goes, so s0r1's task cannot be placed again
            t1 = time.monotonic()
            _docker("node", "update", "--label-rm", "zkv.s0r1", node_id)
            _docker("service", "update", "--detach", "--force", f"{STACK}_s0r1")
            _wait("s0r1 gone", 60, lambda: not docker_client.containers.list(
                sparse=True, filters={"label": f"com.docker.swarm.service.name={STACK}_s0r1"}))
            _docker("node", "update", "--label-add", "zkv.s0r3=true", node_id)
            deploy(*FILES, "docker-stack.spares.yml")
            zkv = str(cl.REPO_ROOT / ".venv" / "bin" / "zkv")
            proc = subprocess.run(
                [zkv, "--endpoint", ",".join(endpoints), "--keys", str(keys / "admin"),
                 "admin", "replace-replica", "0", "s0r1", "--node-id", "s0r3",
                 "--peer-addr", "tcp://s0r3:7100", "--wait", "120"],
                capture_output=True, text=True, timeout=180)  # fmt: skip
            assert proc.returncode == 0, f"replace-replica failed:\n{proc.stdout}\n{proc.stderr}"
            replaced_s = time.monotonic() - t1
            from zkv.ops.membership import members

            with KVClient(endpoints, timeout_s=10, keys=keys / "admin") as admin:
                conf = members(admin, 0)
            assert sorted(conf.voters) == ["s0r0", "s0r2", "s0r3"], conf
            assert [kv.get(f"swarm-{i}") for i in range(20)] == [
                f"v{i}".encode() for i in range(20)]
            kv.put("swarm-after", "replaced")
            assert kv.get("swarm-after") == b"replaced"
            # s1r3 has no labelled host: its task waits, and nothing else moved
            assert not docker_client.containers.list(
                sparse=True, filters={"label": f"com.docker.swarm.service.name={STACK}_s1r3"})

            # same host, empty volume: s1r2 restarts with a wiped data dir (and its
            # --bootstrap); it must not found or vote, and comes back as a voter with a
            # new incarnation once the leader has re-admitted it
            t2 = time.monotonic()
            old_inc = _node(kv, "s1r2").get("incarnation")
            _docker("service", "scale", "--detach", f"{STACK}_s1r2=0")
            _wait("s1r2 stopped", 60, lambda: not docker_client.containers.list(
                sparse=True, filters={"label": f"com.docker.swarm.service.name={STACK}_s1r2"}))
            docker_client.containers.run(
                zkv_image, ["find", "/data", "-mindepth", "1", "-delete"], remove=True,
                volumes={f"{STACK}_s1r2-data": {"bind": "/data", "mode": "rw"}},
                labels=cl.our_labels())
            _docker("service", "scale", "--detach", f"{STACK}_s1r2=1")
            back = _wait("s1r2 re-admitted with a new incarnation", 120, lambda: (
                (n := _node(kv, "s1r2")).get("membership") == "voter"
                and n.get("incarnation") not in (None, old_inc) and n))
            readmit_s = time.monotonic() - t2
            assert [kv.get(f"swarm-{i}") for i in range(20)] == [
                f"v{i}".encode() for i in range(20)]
            record_property("swarm_boot_s", round(booted_s, 1))
            record_property("swarm_replace_s", round(replaced_s, 1))
            record_property("swarm_readmit_s", round(readmit_s, 1))
            print(f"swarm stack {STACK}: put/get {booted_s:.1f}s after deploy; s0r1 "
                  f"replaced by s0r3 in {replaced_s:.1f}s; replace-replica said: "
                  f"{(proc.stdout + proc.stderr).strip()!r}; s1r2 on a wiped volume re-admitted "
                  f"in {readmit_s:.1f}s ({back.get('incarnation')} was {old_inc})")
        except BaseException:
            print(_logs(docker_client))
            raise
        finally:
            if kv is not None:
                cl.close_client(kv)
            _remove_stack(docker_client)
    assert _swarm_state(docker_client) == "inactive"


def _modes_are_0400(output: str) -> bool:
    """True when every file ``find`` listed is 0400; raises with what it saw otherwise
    (``_wait`` reports the last exception)."""
    if output.split() and set(output.split()) == {"400"}:
        return True
    raise AssertionError(f"modes {output!r}")


def _health(container: Any) -> str | None:
    container.reload()
    return container.attrs["State"].get("Health", {}).get("Status")


def _check_gateway(port: int, tokens: Path) -> None:
    """The gateway, a client of the secure brokers with its own key and bearer tokens
    from Swarm secrets: ready, refusing a request without a token, and serving the keys
    written through the SDK to one with the client token."""
    import httpx

    token = next(line.split()[1] for line in tokens.read_text().splitlines()
                 if line.split()[:1] == ["client"])
    auth = {"Authorization": f"Bearer {token}"}
    url = f"http://127.0.0.1:{port}"
    _wait("the gateway ready", 60,
          lambda: httpx.get(url + "/ready", headers=auth, timeout=5).status_code == 200)
    assert httpx.get(url + "/kv/swarm-0", timeout=10).status_code == 401
    assert httpx.get(url + "/kv/swarm-0", headers=auth, timeout=10).json()["value"] == "v0"
