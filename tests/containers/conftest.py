"""Fixtures for the container suite (marker ``containers``).

- No Docker engine: every test here is skipped with the reason, unless ``CI=true``,
  where a missing engine is a failure.
- ``zkv_image`` (session): makes sure zkv-base:bookworm exists (compose/build-base.sh),
  refreshes the wheelhouse (compose/build-wheelhouse.sh) and builds zkv:dev with
  testcontainers' DockerImage. ``ZKV_TEST_SKIP_BUILD=1`` uses an existing zkv:dev as is.
- ``zkv_previous_image`` (session): the previous release's image (``zkv:previous``),
  built once from the repository's history (``tests/support/previous_release.py``) with
  that release's own Dockerfile and wheelhouse script, and kept: its source never
  changes. The rolling-upgrade test starts from it.
- Our objects carry the ``zkv.test`` label and are swept before (dead sessions) and
  after (this session) the run.
- ``cluster_factory``: one ContainerCluster per call, each on its own network, always
  closed at the end of the test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

# First import of testcontainers goes through cluster, which sets its env beforehand.
from tests.containers import cluster as cl

log = logging.getLogger("zkv.containers")

IN_CI = os.environ.get("CI", "").lower() == "true"


def _engine() -> tuple[docker.DockerClient | None, str]:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client, ""
    except Exception as exc:  # any failure: no usable engine
        return None, f"no Docker engine reachable ({exc.__class__.__name__}: {exc})"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client, why = _engine()
    if client is None:
        if IN_CI:
            pytest.fail(f"CI=true and {why}: the container suite must run in CI", pytrace=False)
        pytest.skip(f"{why}; set DOCKER_HOST or start dockerd to run tests/containers")
    swept = cl.sweep(client)
    if swept:
        log.warning("swept %d objects left by dead zkv test sessions", swept)
    try:
        yield client
    finally:
        cl.sweep(client, session=cl.SESSION)
        client.close()


def _run_script(script: str, timeout_s: float) -> None:
    path = cl.REPO_ROOT / "compose" / script
    env = {**os.environ, "PY": os.environ.get("PY", str(cl.REPO_ROOT / ".venv/bin/python"))}
    try:
        proc = subprocess.run(
            [str(path)], cwd=cl.REPO_ROOT, env=env, capture_output=True, text=True,
            timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"compose/{script} took more than {timeout_s}s", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"compose/{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def zkv_image(docker_client: docker.DockerClient) -> str:
    if os.environ.get("ZKV_TEST_SKIP_BUILD") == "1":
        try:
            docker_client.images.get(cl.IMAGE)
        except docker.errors.ImageNotFound:
            pytest.fail(f"ZKV_TEST_SKIP_BUILD=1 but {cl.IMAGE} does not exist", pytrace=False)
        return cl.IMAGE
    started = time.monotonic()
    try:
        docker_client.images.get(cl.BASE_IMAGE)
    except docker.errors.ImageNotFound:
        log.warning("%s missing: building it with compose/build-base.sh (~1 min)", cl.BASE_IMAGE)
        _run_script("build-base.sh", timeout_s=600)
        try:
            docker_client.images.get(cl.BASE_IMAGE)
        except docker.errors.ImageNotFound:
            pytest.fail(
                f"{cl.BASE_IMAGE} is missing and compose/build-base.sh did not make it; "
                "nothing can be pulled here",
                pytrace=False,
            )
    _run_script("build-wheelhouse.sh", timeout_s=300)
    from testcontainers.core.image import DockerImage

    image = DockerImage(
        path=str(cl.REPO_ROOT),
        dockerfile_path="compose/Dockerfile",
        tag=cl.IMAGE,
        clean_up=False,
        buildargs={"BASE_IMAGE": cl.BASE_IMAGE},
        rm=True,
        forcerm=True,
        labels={cl.LABEL + ".image": "1"},
    )
    try:
        image.build()
    except docker.errors.BuildError as exc:
        tail = "".join(str(c.get("stream", c.get("error", ""))) for c in exc.build_log)[-3000:]
        pytest.fail(f"building {cl.IMAGE} failed: {exc}\n{tail}", pytrace=False)
    log.info("image %s ready in %.1fs", cl.IMAGE, time.monotonic() - started)
    return cl.IMAGE


PREVIOUS_IMAGE = "zkv:previous"


@pytest.fixture(scope="session")
def zkv_previous_image(docker_client: docker.DockerClient, zkv_image: str) -> str:
    from tests.support.previous_release import PREVIOUS_RELEASE, PreviousReleaseMissing, extract

    release_label = cl.LABEL + ".release"
    with contextlib.suppress(docker.errors.ImageNotFound):
        if docker_client.images.get(PREVIOUS_IMAGE).labels.get(release_label) == PREVIOUS_RELEASE:
            return PREVIOUS_IMAGE
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zkv-previous-") as tmp:
        try:
            root = extract(Path(tmp) / "src")
        except PreviousReleaseMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        wheelhouse = root / "wheelhouse"
        wheelhouse.mkdir()
        # zkv_image filled ours (its deps are a superset): nothing is downloaded again
        for wheel in (cl.REPO_ROOT / "wheelhouse").glob("*.whl"):
            if not wheel.name.startswith("zkv-"):
                shutil.copy(wheel, wheelhouse)
        env = {**os.environ, "PY": os.environ.get("PY", str(cl.REPO_ROOT / ".venv/bin/python"))}
        proc = subprocess.run(
            ["bash", "compose/build-wheelhouse.sh"], cwd=root, env=env, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(f"the previous release's build-wheelhouse.sh failed:\n{proc.stderr}",
                        pytrace=False)
        from testcontainers.core.image import DockerImage

        image = DockerImage(
            path=str(root), dockerfile_path="compose/Dockerfile", tag=PREVIOUS_IMAGE,
            clean_up=False, buildargs={"BASE_IMAGE": cl.BASE_IMAGE}, rm=True, forcerm=True,
            labels={cl.LABEL + ".image": "1", release_label: PREVIOUS_RELEASE},
        )  # fmt: skip
        try:
            image.build()
        except docker.errors.BuildError as exc:
            tail = "".join(str(c.get("stream", c.get("error", ""))) for c in exc.build_log)[-3000:]
            pytest.fail(f"building {PREVIOUS_IMAGE} failed: {exc}\n{tail}", pytrace=False)
    log.info("image %s (%s) ready in %.1fs", PREVIOUS_IMAGE, PREVIOUS_RELEASE[:8],
             time.monotonic() - started)
    return PREVIOUS_IMAGE


def _network_name(nodeid: str) -> str:
    test = re.sub(r"[^a-z0-9]+", "-", nodeid.rsplit("::", 1)[-1].lower()).strip("-")
    return f"zkv-t-{test[:32]}-{cl.secrets.token_hex(3)}"


@pytest.fixture
def cluster_factory(
    request: pytest.FixtureRequest, docker_client: docker.DockerClient, zkv_image: str
) -> Iterator[Callable[..., cl.ContainerCluster]]:
    """``cluster_factory(**ClusterConfig fields)`` -> a started ContainerCluster."""
    made: list[cl.ContainerCluster] = []

    def make(**overrides: object) -> cl.ContainerCluster:
        cfg = cl.ClusterConfig(**{"image": zkv_image, **overrides})  # type: ignore[arg-type]
        cluster = cl.ContainerCluster(docker_client, _network_name(request.node.nodeid), cfg)
        made.append(cluster)
        cluster.start_all()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            if getattr(request.node, "rep_call_failed", False):
                for name in cluster.members:
                    with contextlib.suppress(Exception):
                        log.error("--- logs of %s\n%s", name, cluster.logs(name, tail=40))
            cluster.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.rep_call_failed = report.failed  # type: ignore[attr-defined]
    return report
