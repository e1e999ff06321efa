"""ContainerCluster: a zkv cluster in Docker containers, with fault helpers.

Theory of operation:
- Every cluster gets its own bridge network with a readable name; each member is a
  container named ``<network>-<member>`` that also answers to ``<member>`` (a network
  alias), so nodes address each other and the brokers by service name, as in compose.
- Everything we create carries our labels (``zkv.test=1``, session, pid, host; never
  ``org.testcontainers*``). Ryuk is off, so ``sweep()`` is the only reaper: the session
  sweeps its own objects at the end, and objects of dead sessions at the start.
- Ready means: the member's "<role> ... ready" log line appeared (counted, so a restart
  waits for a *new* line), then every broker answers a ping through its host port on
  127.0.0.1, then (for real clusters) every broker's status lists every node and a
  leader for every shard.
- Broker frontends are published on 127.0.0.1 at a host port chosen once per cluster, so
  a restarted broker comes back on the same port and clients keep their endpoints; the
  port is still read from Docker on every call (``broker_endpoint``), never cached.
- Growing: ``add_shard_group`` starts one more shard group on the same network, with the
  initial ring; moving keys to it is the test's business (``ops/rebalance.py``).
- Disks: with ``volumes`` each storage node's /data is a named volume of its own (as
  compose mounts them), so a test can lose a host for good (``lose``: container and
  volume gone), bring an id back on a blank disk (``start_empty``) or start a new node
  for ``zkv admin replace-replica`` (``add_spare``; secure: with a key pair of its own
  that no other process knows, so the change must carry it). Without ``volumes`` the
  data is in the container's writable layer, which also goes with ``lose``.
- Faults: SIGKILL + start (the writable layer, hence the WAL, survives), pause/unpause,
  disconnect/reconnect (aliases given again), iptables DROP rules in a ``ZKV`` chain for
  partial partitions (containers run with NET_ADMIN; rules name peer IPs at the time of
  the call, so re-apply them after a reconnect).
"""

from __future__ import annotations

import os

# testcontainers reads its configuration at import time: set it first.
for _key, _value in {
    "TESTCONTAINERS_RYUK_DISABLED": "true",
    "TESTCONTAINERS_CONNECTION_MODE": "docker_host",
    "TC_HOST": "127.0.0.1",
    "TC_POOLING_INTERVAL": "0.1",
}.items():
    os.environ.setdefault(_key, _value)

import contextlib  # noqa: E402
import inspect  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import docker  # noqa: E402
import docker.errors  # noqa: E402
import pytest  # noqa: E402
import zmq  # noqa: E402
from testcontainers.core.config import testcontainers_config as _tc_config  # noqa: E402
from testcontainers.core.container import DockerContainer  # noqa: E402
from testcontainers.core.network import Network  # noqa: E402

from zkv.protocol import codec  # noqa: E402
from zkv.protocol.messages import PingRequest, PongReply, Role  # noqa: E402

# In case testcontainers was imported before us (its config is a process singleton).
_tc_config.ryuk_disabled = True
_tc_config.tc_host_override = "127.0.0.1"
_tc_config.sleep_time = 0.1

log = logging.getLogger("zkv.containers")

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("ZKV_TEST_IMAGE", "zkv:dev")
BASE_IMAGE = os.environ.get("ZKV_TEST_BASE_IMAGE", "zkv-base:bookworm")
LABEL = "zkv.test"
SESSION = secrets.token_hex(4)
BROKER_PORT = 5555
NODE_PORT = 7100
#: a storage node's data dir in its container (a named volume with ``volumes``)
DATA_DIR = "/data"
IPTABLES_CHAIN = "ZKV"
#: where a secure cluster's keys dir is mounted in every container
KEYS_MOUNT = "/keys"
#: a fault test runs twice: plaintext, and with Curve on every socket (the secure
#: compose variant's setting): ``def test_x(cluster_factory, secure)`` passes it on
SECURITY = pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "secure"])


def our_labels(**extra: str) -> dict[str, str]:
    return {
        LABEL: "1",
        f"{LABEL}.session": SESSION,
        f"{LABEL}.pid": str(os.getpid()),
        f"{LABEL}.host": socket.gethostname(),
        **{f"{LABEL}.{k}": v for k, v in extra.items()},
    }


# --------------------------------------------------------------------------- sweeping


def _owner_dead(labels: dict[str, str]) -> bool:
    """True if the session that created an object is gone (same host, pid not alive)."""
    if labels.get(f"{LABEL}.host") != socket.gethostname():
        return False  # another machine's session: not ours to judge
    try:
        pid = int(labels.get(f"{LABEL}.pid", "0"))
    except ValueError:
        return True
    if pid <= 0:
        return True
    if pid == os.getpid():
        return labels.get(f"{LABEL}.session") != SESSION
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep(client: docker.DockerClient, *, session: str | None = None) -> int:
    """Remove our containers, networks and volumes: those of ``session`` if given,
    else those whose creating process is dead. Returns how many objects went."""

    def mine(labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        if LABEL not in labels:
            return False
        if session is not None:
            return labels.get(f"{LABEL}.session") == session
        return _owner_dead(labels)

    removed = 0
    for c in client.containers.list(all=True, filters={"label": LABEL}):
        if mine(c.labels):
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True, v=True)
                removed += 1
    for n in client.networks.list(filters={"label": LABEL}):
        if mine(n.attrs.get("Labels")):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                n.remove()
                removed += 1
    for v in client.volumes.list(filters={"label": LABEL}):
        if mine(v.attrs.get("Labels")):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                v.remove(force=True)
                removed += 1
    return removed


# --------------------------------------------------------------------------- probes


def wait_until(what: str, timeout_s: float, probe: Callable[[], Any],
               every_s: float = 0.1) -> Any:
    """``probe()``'s first truthy result; its exceptions count as "not yet" (the cluster
    is still converging). ``AssertionError`` naming ``what`` and the last result after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = probe()
            if last:
                return last
        except Exception as exc:  # still converging
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s (last: {last!r})")
        time.sleep(every_s)


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the broker's host port for a cluster)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(endpoint: str, timeout_ms: int = 1000, keys: Path | None = None) -> str | None:
    """Raw PingRequest to one broker (no SDK, no retry): its broker id, or None. With
    ``keys`` (a client identity dir) over Curve, as a secure broker requires."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if keys is not None:
            from zkv.protocol.security import Curve

            Curve.for_identity(keys).broker_client(sock, endpoint)
        sock.connect(endpoint)
        sock.send_multipart(codec.encode(PingRequest(client_id=os.urandom(8), request_id=1)))
        if not sock.poll(timeout_ms, zmq.POLLIN):
            return None
        reply = codec.decode(sock.recv_multipart())
        return reply.broker_id if isinstance(reply, PongReply) else None
    except Exception:  # a probe: any failure means "not answering"
        return None
    finally:
        sock.close(0)


# --------------------------------------------------------------------------- SDK adapter


def make_client(endpoints: Sequence[str], timeout_s: float = 5.0,
                keys: Path | None = None) -> Any:
    """A ``client.KVClient`` on ``endpoints`` (with ``keys``: a Curve client identity);
    the one place that knows its constructor."""
    from zkv.client import KVClient

    params = inspect.signature(KVClient).parameters
    kwargs: dict[str, Any] = {}
    if keys is not None:
        kwargs["keys"] = keys
    for name, value in (
        ("timeout_s", timeout_s),
        ("timeout", timeout_s),
        ("deadline_s", timeout_s),
        ("timeout_ms", int(timeout_s * 1000)),
    ):
        if name in params:
            kwargs[name] = value
            break
    first = next(iter(params), "")
    if first in ("endpoint", "broker", "address", "url"):
        return KVClient(endpoints[0], **kwargs)
    return KVClient(list(endpoints), **kwargs)


def close_client(client: Any) -> None:
    with contextlib.suppress(Exception):
        client.close()


def status_nodes(status: Any) -> list[dict[str, Any]]:
    """The node entries of a status answer, whatever the SDK wraps them in."""
    nodes = status.get("nodes") if isinstance(status, dict) else getattr(status, "nodes", status)
    out = []
    for n in nodes or ():
        if isinstance(n, dict):
            out.append(dict(n))
        else:
            out.append({k: getattr(n, k) for k in dir(n) if not k.startswith("_")})
    return out


def is_leader(role: Any) -> bool:
    if isinstance(role, str):
        return role.upper().rsplit(".", 1)[-1] == "LEADER"
    try:
        return int(role) == int(Role.LEADER)
    except (TypeError, ValueError):
        return False


def caught_up(nodes: list[dict[str, Any]], shard: int, node: str) -> tuple[bool, str | None]:
    """Whether ``node`` is back in ``shard`` per one status answer, and the leader it was
    judged against (the node claiming leadership at the highest term).

    A follower is back once it has applied everything the leader has committed. A node
    that restarted may also win the next election (a rolling upgrade's old leader often
    does: its log is the longest); by Raft's election rule a leader holds every committed
    entry, so it is back once it has applied what it has committed. A node still claiming
    leadership at a lower term than the leader's is not back."""
    me = next((n for n in nodes if n.get("node_id") == node), None)
    leaders = [n for n in nodes if n.get("shard_id") == shard and is_leader(n.get("role"))]
    if not leaders:
        return False, None
    leader = max(leaders, key=lambda n: n.get("term", 0))
    leader_id = str(leader["node_id"])
    if me is None:
        return False, leader_id
    if leader_id == node:
        return me.get("applied_index", -1) >= me.get("commit_index", 0) > 0, leader_id
    if is_leader(me.get("role")):
        return False, leader_id
    target = leader.get("commit_index", 0)
    return me.get("applied_index", -1) >= target > 0, leader_id


# --------------------------------------------------------------------------- the cluster


@dataclass
class Member:
    name: str
    kind: str  # "broker" or "node"
    shard: int | None
    command: list[str]
    ready_re: re.Pattern[str]
    tc: DockerContainer | None = None
    #: the named volume at /data (``ClusterConfig.volumes``); a new one after ``lose``
    volume: str | None = None
    #: a keys dir of its own (a spare's), mounted at /keys instead of the cluster's
    keys_dir: Path | None = None
    #: the image it runs when not the cluster's (``upgrade``)
    image: str | None = None

    @property
    def container(self) -> Any:
        assert self.tc is not None, f"{self.name} was never started"
        return self.tc.get_wrapped_container()


BrokerCommand = Callable[[str], list[str]]
NodeCommand = Callable[[str, int, dict[str, str], list[str]], list[str]]


@dataclass
class ClusterConfig:
    shards: int = 2
    replicas: int = 3
    brokers: int = 2
    heartbeat_ms: int = 100
    election_timeout_ms: int = 1000
    fsync: str = "always"
    image: str = IMAGE
    broker_command: BrokerCommand | None = None
    node_command: NodeCommand | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # path in container -> content
    expect_leaders: bool = True  # False for the harness self-test with fake processes
    #: Curve on every socket, as the secure compose variant runs it: a keys dir made on
    #: the host (``zkv keys generate``) mounted read-only at /keys in every container
    secure: bool = False
    #: each storage node's /data on a named volume of its own (labelled for the sweep),
    #: as compose runs them: a lost host's disk is then a volume a test deletes
    volumes: bool = False


class ContainerCluster:
    def __init__(self, docker_client: docker.DockerClient, name: str, config: ClusterConfig):
        self.docker = docker_client
        self.name = name
        self.cfg = config
        self.network: Network | None = None
        self.host_ports: dict[str, int] = {}
        self.members: dict[str, Member] = {}
        self.brokers = [f"broker{b}" for b in range(config.brokers)]
        #: with ``secure``: the cluster's keys dir on the host (made in ``start_all``)
        self.keys_dir: Path | None = None
        #: every volume made for this cluster, removed by ``close`` (and by the sweep)
        self.volumes: list[str] = []
        self._volume_seq = itertools.count()
        self.nodes_by_shard = {
            s: [f"s{s}r{r}" for r in range(config.replicas)] for s in range(config.shards)
        }
        for b in self.brokers:
            self._add(b, "broker", None, self._broker_command(b))
        for s, names in self.nodes_by_shard.items():
            self._add_group(s, names)

    # ----------------------------------------------------------------- construction

    def _add_group(self, shard: int, names: list[str]) -> None:
        for n in names:
            peers = {p: f"tcp://{p}:{NODE_PORT}" for p in names if p != n}
            backends = [f"tcp://{b}:{BROKER_PORT + 1}" for b in self.brokers]
            self._add(n, "node", shard, self._node_command(n, shard, peers, backends))

    def _add(self, name: str, kind: str, shard: int | None, command: list[str]) -> None:
        pattern = r"\bbroker\b.*\bready\b" if kind == "broker" else rf"\bnode\s+{name}\b.*\bready\b"
        self.members[name] = Member(name, kind, shard, command, re.compile(pattern))

    def _broker_command(self, broker_id: str) -> list[str]:
        if self.cfg.broker_command:
            return self.cfg.broker_command(broker_id)
        return [
            "zkv-broker", "--host", "0.0.0.0", "--port", str(BROKER_PORT),
            "--broker-id", broker_id, *self._security_args(),
            "--heartbeat-ms", str(self.cfg.heartbeat_ms),
            "--election-timeout-ms", str(self.cfg.election_timeout_ms),
        ]  # fmt: skip

    def _node_command(
        self, node_id: str, shard: int, peers: dict[str, str], backends: list[str],
        *, bootstrap: bool = True,
    ) -> list[str]:
        if self.cfg.node_command:
            return self.cfg.node_command(node_id, shard, peers, backends)
        return [
            "zkv-node", "--node-id", node_id, "--shard", str(shard),
            "--data-dir", DATA_DIR,
            "--listen", f"tcp://0.0.0.0:{NODE_PORT}",
            "--advertise", f"tcp://{node_id}:{NODE_PORT}",
            "--peers", ",".join(f"{p}={a}" for p, a in peers.items()),
            "--brokers", ",".join(backends),
            "--shards", ",".join(str(s) for s in range(self.cfg.shards)),
            "--fsync", self.cfg.fsync, *(["--bootstrap"] if bootstrap else []),
            *self._security_args(),
            "--heartbeat-ms", str(self.cfg.heartbeat_ms),
            "--election-timeout-ms", str(self.cfg.election_timeout_ms),
        ]  # fmt: skip

    def _security_args(self) -> list[str]:
        # plaintext on the private network, or the keys dir mounted at /keys
        return ["--keys", KEYS_MOUNT] if self.cfg.secure else ["--insecure"]

    def _make_keys(self) -> None:
        """Every broker's, node's, client's and admin's pair, as `make compose-keys` makes
        them: broker certificates list the endpoints they serve (inside the network and
        this cluster's host port), so a client of several brokers picks each one's key."""
        from zkv.ops.keys import generate

        self.keys_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-keys-"))
        nodes = [n for names in self.nodes_by_shard.values() for n in names]
        endpoints = {
            b: [f"tcp://{b}:{BROKER_PORT + i}" for i in range(3)]
            + [f"tcp://127.0.0.1:{self.host_ports[b]}"]
            for b in self.brokers
        }
        generate(self.keys_dir, nodes, self.brokers, broker_endpoints=endpoints)

    @property
    def client_keys(self) -> Path | None:
        return self.keys_dir / "client" if self.keys_dir is not None else None

    @property
    def admin_keys(self) -> Path | None:
        return self.keys_dir / "admin" if self.keys_dir is not None else None

    def _spare_keys(self, node_id: str) -> Path:
        """A new host's keys dir, as README "Node keys from membership changes" makes
        it: the node's own pair, published nowhere else, and copies of the cluster's
        public node and broker certificates (whom it dials)."""
        from zkv.ops.keys import ensure_identity
        from zkv.protocol.security import NODE

        assert self.keys_dir is not None
        spare = Path(tempfile.mkdtemp(prefix=f"{self.name}-{node_id}-keys-"))
        os.chmod(spare, 0o700)
        ensure_identity(spare, NODE, node_id)
        for role in ("nodes", "brokers"):
            (spare / "public" / role).mkdir(parents=True, exist_ok=True)
            for cert in (self.keys_dir / "public" / role).glob("*.key"):
                shutil.copyfile(cert, spare / "public" / role / cert.name)
        return spare

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> ContainerCluster:
        try:
            self.start_all()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_all(self, timeout_s: float = 60.0) -> None:
        try:
            self.docker.images.get(self.cfg.image)
        except docker.errors.ImageNotFound:
            raise RuntimeError(
                f"image {self.cfg.image} is missing and cannot be pulled here: build it "
                "with `make image` (compose/build-base.sh + compose/build-wheelhouse.sh)"
            ) from None
        started = time.monotonic()
        self.network = Network(docker_network_kw={"labels": our_labels(cluster=self.name)})
        self.network.name = self.name
        self.network.create()
        for name in self.brokers:
            self.host_ports[name] = free_port()
        if self.cfg.secure:
            self._make_keys()
        for m in self.members.values():
            m.tc = self._container_for(m)
            m.tc.start()
        self.wait_ready(list(self.members), timeout_s=timeout_s)
        if self.cfg.expect_leaders:
            self.wait_converged(timeout_s=timeout_s)
        log.info("cluster %s up in %.1fs", self.name, time.monotonic() - started)

    def add_shard_group(self, shard: int, timeout_s: float = 30.0) -> list[str]:
        """Start a new shard group (``cfg.replicas`` nodes ``s<shard>r<i>``) on the
        cluster network, as ``ops/cluster.py`` does for ``zkv admin add-shard``: with
        the cluster's *initial* ring (``--shards`` of the original shards), so it owns no
        key until a ring change moves some to it. Returns once every broker lists its
        nodes and a leader of it. ``close()`` removes them with the rest."""
        if shard in self.nodes_by_shard:
            raise ValueError(f"shard {shard} already has a group")
        names = [f"s{shard}r{r}" for r in range(self.cfg.replicas)]
        self._add_group(shard, names)
        self.nodes_by_shard[shard] = names
        for name in names:
            m = self.members[name]
            m.tc = self._container_for(m)
            m.tc.start()
        self.wait_ready(names, timeout_s=timeout_s)
        self.wait_converged(timeout_s=timeout_s)
        return names

    def _container_for(self, m: Member, command: list[str] | None = None) -> DockerContainer:
        tc = (
            DockerContainer(m.image or self.cfg.image)
            .with_name(f"{self.name}-{m.name}")
            .with_command(command or m.command)
            .with_network(self.network)  # type: ignore[arg-type]
            .with_network_aliases(m.name)
            .with_kwargs(
                init=True,
                cap_add=["NET_ADMIN"],
                hostname=m.name,
                labels=our_labels(cluster=self.name, member=m.name),
            )
        )
        if m.kind == "broker":
            # Loopback only, at a fixed port: a restarted broker comes back on it.
            tc.ports[f"{BROKER_PORT}/tcp"] = ("127.0.0.1", self.host_ports[m.name])  # type: ignore[assignment]
        for path, content in self.cfg.files.items():
            tc.with_copy_into_container(content, path, 0o755)
        keys = m.keys_dir or self.keys_dir
        if keys is not None:
            tc.with_volume_mapping(str(keys), KEYS_MOUNT, "ro")
        if m.kind == "node" and self.cfg.volumes:
            if m.volume is None:
                m.volume = self._new_volume(m.name)
            tc.with_volume_mapping(m.volume, DATA_DIR, "rw")
        return tc

    def _new_volume(self, member: str) -> str:
        """An empty named volume for ``member``'s data (a new name each time: a volume
        deleted a moment ago may still be going)."""
        name = f"{self.name}-{member}-data-{next(self._volume_seq)}"
        self.docker.volumes.create(name=name, labels=our_labels(cluster=self.name, member=member))
        self.volumes.append(name)
        return name

    def _remove_volume(self, name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.docker.volumes.get(name).remove(force=True)

    def close(self) -> None:
        """Remove every container, volume and the network, even after a partial start."""
        for m in self.members.values():
            if m.tc is not None:
                with contextlib.suppress(Exception):
                    m.container.remove(force=True, v=True)
        for volume in self.volumes:
            with contextlib.suppress(Exception):
                self._remove_volume(volume)
        if self.network is not None:
            with contextlib.suppress(Exception):
                self.network.remove()
        for keys in [self.keys_dir, *(m.keys_dir for m in self.members.values())]:
            if keys is not None:
                shutil.rmtree(keys, ignore_errors=True)

    # ----------------------------------------------------------------- readiness

    def _ready_count(self, m: Member) -> int:
        logs = m.container.logs(stdout=True, stderr=True).decode("utf-8", "replace")
        return len(m.ready_re.findall(logs))

    def logs(self, name: str, tail: int = 60) -> str:
        c = self.members[name].container
        return str(c.logs(stdout=True, stderr=True, tail=tail).decode("utf-8", "replace"))

    def wait_ready(
        self, names: Iterable[str], timeout_s: float = 30.0, baseline: dict[str, int] | None = None
    ) -> None:
        """Wait for a new ready line from each member, then for brokers to answer pings."""
        pending = set(names)
        baseline = baseline or {}
        deadline = time.monotonic() + timeout_s
        while pending:
            for name in sorted(pending):
                m = self.members[name]
                if self._ready_count(m) > baseline.get(name, 0):
                    pending.discard(name)
                    continue
                m.container.reload()
                if m.container.status in ("exited", "dead"):
                    raise RuntimeError(f"{name} exited before ready:\n{self.logs(name)}")
            if pending and time.monotonic() > deadline:
                raise TimeoutError(
                    f"not ready after {timeout_s}s: {sorted(pending)}\n"
                    + "\n".join(f"--- {n}\n{self.logs(n)}" for n in sorted(pending))
                )
            if pending:
                time.sleep(0.1)
        for name in names:
            if self.members[name].kind == "broker":
                self.wait_ping(name, timeout_s=max(1.0, deadline - time.monotonic()))

    def wait_ping(self, broker: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while ping(self.broker_endpoint(broker), timeout_ms=500, keys=self.client_keys) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{broker} does not answer pings:\n{self.logs(broker)}")
            time.sleep(0.1)

    def wait_converged(
        self,
        timeout_s: float = 30.0,
        *,
        brokers: Iterable[str] | None = None,
        down: Iterable[str] = (),
    ) -> None:
        """Every broker lists every node (except those ``down``) and knows a leader for
        every shard."""
        everyone = {n for names in self.nodes_by_shard.values() for n in names} - set(down)
        deadline = time.monotonic() + timeout_s
        for broker in brokers or self.brokers:
            while True:
                try:
                    nodes = self.status(broker)
                    seen = {n.get("node_id") for n in nodes}
                    led = {n.get("shard_id") for n in nodes if is_leader(n.get("role"))}
                    if everyone <= seen and set(self.nodes_by_shard) <= led:
                        break
                    why = f"missing nodes {sorted(everyone - seen)}, shards without leader {sorted(set(self.nodes_by_shard) - led)}"
                except Exception as exc:  # the SDK may time out while the cluster forms
                    why = repr(exc)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster {self.name} did not converge via {broker}: {why}")
                time.sleep(0.2)

    # ----------------------------------------------------------------- addressing

    def broker_endpoint(self, broker: str) -> str:
        """The broker's frontend as seen from the host, looked up from Docker each time."""
        c = self.members[broker].container
        c.reload()
        bindings = (c.attrs["NetworkSettings"]["Ports"] or {}).get(f"{BROKER_PORT}/tcp")
        port = int(bindings[0]["HostPort"]) if bindings else self.host_ports[broker]
        return f"tcp://127.0.0.1:{port}"

    def endpoints(self, brokers: Iterable[str] | None = None) -> list[str]:
        return [self.broker_endpoint(b) for b in (brokers or self.brokers)]

    def client(self, brokers: Iterable[str] | None = None, timeout_s: float = 5.0) -> Any:
        return make_client(self.endpoints(brokers), timeout_s=timeout_s, keys=self.client_keys)

    def ip(self, name: str) -> str:
        c = self.members[name].container
        c.reload()
        assert self.network is not None
        return str(c.attrs["NetworkSettings"]["Networks"][self.name]["IPAddress"])

    # ----------------------------------------------------------------- cluster state

    def status(self, broker: str | None = None, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """Node entries from ``KVClient.status()`` through one broker (default: the first)."""
        client = make_client([self.broker_endpoint(broker or self.brokers[0])], timeout_s,
                             keys=self.client_keys)
        try:
            return status_nodes(client.status())
        finally:
            close_client(client)

    def rows(self, broker: str | None = None) -> dict[str, dict[str, Any]]:
        """``status`` by node id, the heartbeat's ``extra`` (membership, incarnation)
        inlined."""
        return {n["node_id"]: {**n, **(n.get("extra") or {})} for n in self.status(broker)}

    def leader_of(self, shard: int, broker: str | None = None) -> str | None:
        """The node claiming leadership of ``shard`` at the highest term, per a broker."""
        leaders = [
            n
            for n in self.status(broker)
            if n.get("shard_id") == shard and is_leader(n.get("role"))
        ]
        if not leaders:
            return None
        return str(max(leaders, key=lambda n: n.get("term", 0))["node_id"])

    def wait_for_leader(
        self,
        shard: int,
        *,
        not_in: Iterable[str] = (),
        broker: str | None = None,
        timeout_s: float = 20.0,
    ) -> str:
        excluded = set(not_in)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(Exception):
                leader = self.leader_of(shard, broker)
                if leader is not None and leader not in excluded:
                    return leader
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader of shard {shard} outside {sorted(excluded)}")
            time.sleep(0.1)

    def wait_caught_up(self, shard: int, node: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """Wait until ``node`` is back in its shard (see ``caught_up``); returns its status
        entry."""
        deadline = time.monotonic() + timeout_s
        me: dict[str, Any] | None = None
        leader = None
        while True:
            with contextlib.suppress(Exception):
                nodes = self.status()
                done, leader = caught_up(nodes, shard, node)
                me = next((n for n in nodes if n.get("node_id") == node), None)
                if done and me is not None:
                    return me
            if time.monotonic() > deadline:
                raise AssertionError(f"{node} did not catch up with {leader}: {me}")
            time.sleep(0.2)

    def followers_of(self, shard: int, leader: str) -> list[str]:
        return [n for n in self.nodes_by_shard[shard] if n != leader]

    # ----------------------------------------------------------------- faults

    def kill(self, name: str) -> None:
        """SIGKILL the member's process tree; the container (and its data) stays."""
        c = self.members[name].container
        c.kill(signal="SIGKILL")
        c.wait(timeout=10)

    def start(self, name: str, timeout_s: float = 30.0) -> None:
        """Start a killed member again and wait for its new ready line (and ping)."""
        m = self.members[name]
        baseline = {name: self._ready_count(m)}
        m.container.start()
        self.wait_ready([name], timeout_s=timeout_s, baseline=baseline)

    def restart(self, name: str, timeout_s: float = 30.0) -> None:
        self.kill(name)
        self.start(name, timeout_s=timeout_s)

    def upgrade(self, name: str, image: str, command: list[str],
                timeout_s: float = 30.0) -> float:
        """A rolling upgrade's step: stop the member as an orchestrator does (SIGTERM,
        then SIGKILL after 10 s), remove its container, keep its volume, and start
        ``image`` with ``command`` on it. Returns the seconds the member was down (from
        the stop to its new ready line)."""
        m = self.members[name]
        started = time.monotonic()
        m.container.stop(timeout=10)
        m.container.remove(v=False)
        m.image, m.command = image, command
        m.tc = self._container_for(m)
        m.tc.start()
        self.wait_ready([name], timeout_s=timeout_s)
        return time.monotonic() - started

    def lose(self, name: str) -> None:
        """A host lost for good: the member's process dies (SIGKILL, no handover), its
        container is removed and its disk (volume, or writable layer) deleted. The
        member stays known: ``start_empty`` brings its id back on a blank disk."""
        m = self.members[name]
        if m.tc is not None:
            with contextlib.suppress(docker.errors.NotFound):
                m.container.remove(force=True, v=True)
            m.tc = None
        if m.volume is not None:
            self._remove_volume(m.volume)
            m.volume = None

    def start_empty(self, name: str, *, drop: Iterable[str] = (), timeout_s: float = 30.0) -> None:
        """Start a lost member again under its id, same command (``--bootstrap`` too, as
        a compose file passes it on every start), on a new empty disk. ``drop``: members
        whose traffic to and from it is dropped from its first packet on (iptables rules
        set up before the node starts), e.g. its shard's leader, so that it can neither
        catch up nor be re-admitted while a test looks at it; ``iptables_heal`` lifts
        them."""
        m = self.members[name]
        if m.tc is not None:
            raise ValueError(f"{name} still has a container: lose() it first")
        command = m.command
        drops = list(drop)
        if drops:
            script = self._drop_script(drops, "both", {d: self.ip(d) for d in drops})
            command = ["sh", "-c", f'{script} && exec "$@"', "sh", *m.command]
        m.tc = self._container_for(m, command)
        m.tc.start()
        self.wait_ready([name], timeout_s=timeout_s)

    def add_spare(self, shard: int, name: str, timeout_s: float = 30.0) -> Path | None:
        """Start a new storage node for ``shard`` on a new host (container and volume),
        as compose's spares run: no ``--bootstrap``, so it founds nothing and waits, a
        non-voter, until ``zkv admin replace-replica`` / ``add-replica`` adds it. Its
        peers are the shard's nodes. Secure: it gets a key pair of its own that no other
        process trusts; returns its public certificate, which the change must carry
        (``--public-key``). ``replaced`` records it in ``nodes_by_shard`` once it is in."""
        if name in self.members:
            raise ValueError(f"{name} exists already")
        names = self.nodes_by_shard[shard]
        peers = {p: f"tcp://{p}:{NODE_PORT}" for p in names}
        backends = [f"tcp://{b}:{BROKER_PORT + 1}" for b in self.brokers]
        self._add(name, "node", shard, self._node_command(name, shard, peers, backends,
                                                          bootstrap=False))
        m = self.members[name]
        if self.cfg.secure:
            m.keys_dir = self._spare_keys(name)
        m.tc = self._container_for(m)
        m.tc.start()
        self.wait_ready([name], timeout_s=timeout_s)
        if m.keys_dir is None:
            return None
        return m.keys_dir / "nodes" / name / f"{name}.key"

    def replaced(self, shard: int, old: str, new: str) -> None:
        """Bookkeeping after ``replace-replica``: ``new`` serves ``shard`` in ``old``'s
        place (convergence waits and ``followers_of`` go by ``nodes_by_shard``)."""
        self.nodes_by_shard[shard] = [new if n == old else n for n in self.nodes_by_shard[shard]]

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """The ``zkv`` CLI on the host, through every broker's host port (secure: with the
        admin key), as an operator runs it. Returns the finished process."""
        keys = ["--keys", str(self.admin_keys)] if self.admin_keys is not None else []
        return subprocess.run(
            [sys.executable, "-m", "zkv.client.cli", "--endpoint", ",".join(self.endpoints()),
             *keys, *args],
            capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip

    def pause(self, name: str) -> None:
        self.members[name].container.pause()

    def unpause(self, name: str) -> None:
        self.members[name].container.unpause()

    def disconnect(self, name: str) -> None:
        """Take the member off the cluster network entirely (a full partition)."""
        self.docker.networks.get(self.name).disconnect(self.members[name].container, force=True)

    def reconnect(self, name: str) -> None:
        """Put it back, with its alias (lost otherwise). Its IP may change."""
        self.docker.networks.get(self.name).connect(self.members[name].container, aliases=[name])

    def exec(self, name: str, script: str) -> tuple[int, str]:
        rc, out = self.members[name].container.exec_run(["sh", "-c", script], user="root")
        return int(rc), out.decode("utf-8", "replace")

    def iptables_drop(
        self,
        name: str,
        from_names: Iterable[str],
        *,
        direction: str = "both",
        addresses: dict[str, str] | None = None,
    ) -> None:
        """Drop traffic between ``name`` and each of ``from_names`` (in, out or both), by
        rules inside ``name``. Other links stay up: a partial partition. ``addresses``
        (member -> IP, looked up beforehand) saves one Docker call per member, so a
        fault on a loaded machine takes effect at once rather than seconds later."""
        rc, out = self.exec(name, self._drop_script(from_names, direction, addresses))
        if rc != 0:
            raise RuntimeError(f"iptables in {name} failed ({rc}): {out}")

    def _drop_script(
        self, from_names: Iterable[str], direction: str, addresses: dict[str, str] | None
    ) -> str:
        """The shell commands that put DROP rules for ``from_names`` in our chain."""
        rules = []
        for other in from_names:
            ip = addresses[other] if addresses is not None else self.ip(other)
            if direction in ("both", "in"):
                rules.append(f"iptables -w -A {IPTABLES_CHAIN} -s {ip} -j DROP")
            if direction in ("both", "out"):
                rules.append(f"iptables -w -A {IPTABLES_CHAIN} -d {ip} -j DROP")
        return " && ".join(
            [
                f"(iptables -w -N {IPTABLES_CHAIN} 2>/dev/null || true)",
                f"(iptables -w -C INPUT -j {IPTABLES_CHAIN} 2>/dev/null || iptables -w -I INPUT -j {IPTABLES_CHAIN})",
                f"(iptables -w -C OUTPUT -j {IPTABLES_CHAIN} 2>/dev/null || iptables -w -I OUTPUT -j {IPTABLES_CHAIN})",
                *rules,
            ]
        )

    def iptables_heal(self, name: str) -> None:
        rc, out = self.exec(name, f"iptables -w -F {IPTABLES_CHAIN} 2>/dev/null || true")
        if rc != 0:
            raise RuntimeError(f"iptables flush in {name} failed ({rc}): {out}")

    def iptables_rules(self, name: str) -> str:
        return self.exec(name, f"iptables -w -S {IPTABLES_CHAIN} 2>&1")[1]
