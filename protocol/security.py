"""CurveZMQ keys, allow-lists and the ZAP handler shared by broker, node and SDK.

Theory of operation
-------------------
A cluster's keys live in one directory (``zkv keys generate DIR``, ``ops/keys.py``)::

    DIR/client/client.key(+_secret)       a data-only client identity
    DIR/admin/admin.key(+_secret)         a client that may also run admin operations
    DIR/nodes/<node-id>/<node-id>.key...  one pair per storage node
    DIR/brokers/<id>/<id>.key...          one pair per broker
    DIR/public/{nodes,brokers,clients,admins}/<name>.key   the allow-lists

Files are pyzmq's ``zmq.auth`` certificates. The *directory* a public certificate sits
in is its role; the file name is the identity's name (a node's id). A server process
loads its own pair and the allow-lists; a client loads its pair and the brokers' public
certificates (``DIR/public/brokers`` or ``<identity dir>/../public/brokers``).

Rules:

- Every zkv socket is Curve when the process has keys: the binding side is the Curve
  server (its own pair), the connecting side a Curve client that knows the server's
  public key in advance (a node's from ``public/nodes/<id>.key``; a broker's from
  ``public/brokers``, by the ``endpoints`` metadata of its certificate, or the only one).
- Each server socket names a ZAP domain (``frontend``, ``backend``, ``heartbeats``,
  ``peer``) and the ``ZapHandler`` accepts a handshake only if the presented public key
  is in an allow-list whose role the domain admits. A refused peer never gets a message
  through: libzmq drops the connection before the first message.
- An accepted connection's messages carry the ZAP ``User-Id`` ``"<role>:<name>"`` (read
  with ``frame.get("User-Id")`` on frames received with ``copy=False``). That, never a
  routing id or a payload field, is who sent a message.
- Secret key files must not be readable by group or others (like ssh): ``KeyFileError``.
- Allow-lists are re-read when a public directory changes (its mtime), so a new key can
  be added, and an old one removed, without restarting any server (key rotation).
  Connections already authenticated keep running; removing a key refuses its next
  handshake.
- Node keys are also learned from committed membership changes (``node_keys.py``:
  ``TrustStore.learn``), only ever as the member the configuration names; files win.

Why a ZAP handler of our own instead of ``zmq.auth.ThreadAuthenticator``: we need the
User-Id to be the role and name (ThreadAuthenticator reports the raw key), a different
allow-list per domain (role), and the reload above; the handler is 60 lines. It runs in
its own thread because ZAP is only consulted during handshakes: the poll loops of broker
and node never see it, so the hot path pays nothing per message (measured, README).
"""

from __future__ import annotations

import ipaddress
import os
import stat
import threading
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from zkv.protocol.errors import KVError
from zkv.protocol.node_keys import NODE, Principal, trust_map

__all__ = ["NODE", "Principal"]  # defined in node_keys.py, used from here
BROKER, CLIENT, ADMIN = "broker", "client", "admin"
#: role -> sub-directory of ``public/`` holding that role's public certificates
ROLE_DIRS = {NODE: "nodes", BROKER: "brokers", CLIENT: "clients", ADMIN: "admins"}
#: ZAP domain -> roles a server socket of that domain admits
DOMAIN_ROLES = {
    "frontend": frozenset({CLIENT, ADMIN}),
    "backend": frozenset({NODE}),
    "heartbeats": frozenset({NODE}),
    "peer": frozenset({NODE}),
}
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
SECRET_MODE_MASK = 0o077


class KeyFileError(KVError):
    """A key file or directory is missing, malformed or too open."""


def check_secret_file(path: Path) -> None:
    """Refuse a secret key file that group or others may read or write (like ssh)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read secret key {path}: {exc.strerror}") from exc
    if mode & SECRET_MODE_MASK:
        raise KeyFileError(
            f"secret key {path} has permissions {stat.S_IMODE(mode):04o}: it must not be "
            f"accessible by others (run: chmod 600 {path})"
        )


def load_pair(identity_dir: Path) -> tuple[bytes, bytes]:
    """The (public, secret) z85 keys of the one ``*.key_secret`` in ``identity_dir``."""
    secrets = sorted(Path(identity_dir).glob("*.key_secret"))
    if len(secrets) != 1:
        raise KeyFileError(f"{identity_dir}: expected one *.key_secret file, found {len(secrets)}")
    check_secret_file(secrets[0])
    try:
        public, secret = zmq.auth.load_certificate(secrets[0])
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{secrets[0]}: not a Curve certificate: {exc}") from exc
    if secret is None:
        raise KeyFileError(f"{secrets[0]}: no secret key in it")
    return public, secret


def load_public(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a Curve certificate: {exc}") from exc
    return public


def cert_metadata(path: Path) -> dict[str, str]:
    """The ``metadata`` section of a zmq.auth certificate (``key = "value"`` lines)."""
    meta: dict[str, str] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line.startswith(" "):
            section = line.strip()
        elif section == "metadata" and "=" in line:
            k, _, v = line.partition("=")
            meta[k.strip()] = v.strip().strip('"')
    return meta


def is_loopback(endpoint: str) -> bool:
    """Whether a ``tcp://host:port`` (or ``ipc://``/``inproc://``) stays on this machine."""
    if not endpoint.startswith("tcp://"):
        return endpoint.startswith(("ipc://", "inproc://"))
    host = endpoint[6:].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", "0.0.0.0" fail above or here; a name may resolve anywhere


class TrustStore:
    """Public key -> ``Principal``, from ``DIR/public/*/``; reloaded when a dir changes.
    Plus the node keys of committed configurations (``learn``; ``node_keys.py``)."""

    def __init__(self, keys_dir: Path) -> None:
        self.public_dir = Path(keys_dir) / "public"
        if not self.public_dir.is_dir():
            raise KeyFileError(f"{keys_dir}: no public/ directory of allowed keys")
        self._stamp: tuple[object, ...] = ()
        self._files: dict[bytes, Principal] = {}
        self._learned: dict[bytes, str] = {}
        self._keys: dict[bytes, Principal] = {}
        self._lock = threading.Lock()
        self.refresh()

    def learn(self, configured: dict[bytes, str]) -> None:
        """Trust exactly these configuration keys (key -> node id) besides the files:
        the ones learned before and not named again are dropped."""
        with self._lock:
            self._learned = dict(configured)
            self._keys = trust_map(self._files, self._learned)

    @property
    def learned(self) -> dict[bytes, str]:
        with self._lock:
            return dict(self._learned)

    def _dir_stamp(self) -> tuple[object, ...]:
        """What changes when a key is added, removed or replaced, even in place (``cp``
        over a certificate leaves the directory's mtime alone): every file's mtime."""
        stamps: list[object] = []
        for sub in ROLE_DIRS.values():
            try:
                with os.scandir(self.public_dir / sub) as it:
                    stamps.append(sorted((e.name, e.stat().st_mtime_ns) for e in it))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def refresh(self) -> None:
        stamp = self._dir_stamp()
        if stamp == self._stamp:
            return
        keys: dict[bytes, Principal] = {}
        for role, sub in ROLE_DIRS.items():
            for path in sorted((self.public_dir / sub).glob("*.key")):
                keys[load_public(path)] = Principal(role, path.stem)
        with self._lock:
            self._files, self._stamp = keys, stamp
            self._keys = trust_map(keys, self._learned)

    def lookup(self, public: bytes) -> Principal | None:
        self.refresh()
        with self._lock:
            return self._keys.get(public)

    def node_key(self, node_id: str) -> bytes:
        return load_public(self.public_dir / "nodes" / f"{node_id}.key")


def file_node_key(public_dir: Path, node_id: str) -> bytes | None:
    """The key of node ``node_id``'s published certificate; None if it has none."""
    path = Path(public_dir) / "nodes" / f"{node_id}.key"
    return load_public(path) if path.exists() else None


def broker_key_for(public_dir: Path, endpoint: str) -> bytes:
    """The public key of the broker at ``endpoint``: the certificate whose ``endpoints``
    metadata names it, else the only broker certificate there is."""
    certs = sorted((Path(public_dir) / "brokers").glob("*.key"))
    if not certs:
        raise KeyFileError(f"{public_dir}/brokers: no broker certificate")
    for cert in certs:
        if endpoint in cert_metadata(cert).get("endpoints", "").split(","):
            return load_public(cert)
    if len(certs) == 1:
        return load_public(certs[0])
    raise KeyFileError(f"no broker certificate in {public_dir}/brokers lists {endpoint}")


def find_public_dir(keys_dir: Path) -> Path:
    """``DIR/public`` for a cluster keys dir, ``DIR/../public`` for a client's identity
    dir, ``DIR/../../public`` for a node's or broker's."""
    here = Path(keys_dir).resolve()
    for candidate in (here / "public", here.parent / "public", here.parent.parent / "public"):
        if candidate.is_dir():
            return candidate
    raise KeyFileError(f"{keys_dir}: no public/ directory next to or inside it")


class Curve:
    """One process's Curve setup: its own pair, and helpers to secure its sockets."""

    def __init__(self, public: bytes, secret: bytes, public_dir: Path) -> None:
        self.public, self.secret, self.public_dir = public, secret, public_dir

    @classmethod
    def for_identity(cls, identity_dir: Path, public_dir: Path | None = None) -> Curve:
        public, secret = load_pair(identity_dir)
        return cls(public, secret, public_dir or find_public_dir(identity_dir))

    def server(self, sock: zmq.Socket[Any], domain: str) -> None:
        """Make ``sock`` (before bind) a Curve server checked by ZAP ``domain``."""
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def client(self, sock: zmq.Socket[Any], server_public: bytes) -> None:
        """Make ``sock`` (before connect) a Curve client of the server ``server_public``."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def broker_client(self, sock: zmq.Socket[Any], endpoint: str) -> None:
        self.client(sock, broker_key_for(self.public_dir, endpoint))

    def node_key_file(self, node_id: str) -> Path:
        return self.public_dir / "nodes" / f"{node_id}.key"

    def node_client(self, sock: zmq.Socket[Any], node_id: str) -> bytes:
        """Dial node ``node_id`` expecting its published key; returns that key."""
        key = load_public(self.node_key_file(node_id))
        self.client(sock, key)
        return key


class ZapHandler:
    """Answers libzmq's ZAP requests for one context from a ``TrustStore``."""

    def __init__(self, ctx: zmq.Context[Any], trust: TrustStore, log: Any = None) -> None:
        self.trust, self.log = trust, log
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)  # before any Curve server binds in this context
        self._stopping = False
        self.accepted = self.refused = 0
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)
        self._thread.start()

    def decide(self, domain: str, mechanism: bytes, credentials: list[bytes]) -> Principal | None:
        if mechanism != b"CURVE" or len(credentials) != 1:
            return None
        who = self.trust.lookup(zmq.utils.z85.encode(credentials[0]))
        if who is None or who.role not in DOMAIN_ROLES.get(domain, ()):
            return None
        return who

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stopping:
            if not poller.poll(100):
                continue
            frames = self.sock.recv_multipart()
            try:
                split = frames.index(b"")
            except ValueError:
                continue
            envelope, req = frames[: split + 1], frames[split + 1 :]
            if len(req) < 6:
                continue
            version, request_id, domain, address, _identity, mechanism = req[:6]
            try:
                who = self.decide(domain.decode(errors="replace"), mechanism, req[6:])
            except Exception as exc:  # a bad allow-list file: refuse, say why, keep going
                who = None
                if self.log is not None:
                    self.log.error("cannot check a key: {}", exc)
            if who is None:
                self.refused += 1
                # a refused peer reconnects every ~100 ms: log the first few, then samples
                if self.log is not None and (self.refused <= 10 or self.refused % 1000 == 0):
                    self.log.warning("refused a {} connection from {} to {} ({} refused so far)",
                                     mechanism.decode(errors="replace"),
                                     address.decode(errors="replace"),
                                     domain.decode(errors="replace"), self.refused)
                reply = [version, request_id, b"400", b"key not allowed", b"", b""]
            else:
                self.accepted += 1
                reply = [version, request_id, b"200", b"OK", who.user_id.encode(), b""]
            self.sock.send_multipart(envelope + reply)

    def close(self) -> None:
        self._stopping = True
        self._thread.join(timeout=1.0)
        self.sock.close(linger=0)


def user_id(frame: zmq.Frame) -> str:
    """The ZAP User-Id of the connection a (``copy=False``) frame came on; "" if none."""
    try:
        uid = frame.get("User-Id")
    except zmq.ZMQError:
        return ""
    return uid if isinstance(uid, str) else ""


def peer_node_id(frame: zmq.Frame) -> str | None:
    """The node id a frame's connection authenticated as, or None if not a node key."""
    uid = user_id(frame)
    return uid[5:] if uid.startswith("node:") else None
