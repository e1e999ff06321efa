"""Keys on disk, allow-lists and the ZAP decision (``protocol/security.py``, ``ops/keys.py``)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import zmq

from zkv.ops.keys import ensure_identity, generate
from zkv.protocol.errors import ErrorCode, KVError, PermissionDenied, error_for_code
from zkv.protocol.security import (
    ADMIN,
    CLIENT,
    NODE,
    Curve,
    KeyFileError,
    TrustStore,
    ZapHandler,
    broker_key_for,
    cert_metadata,
    is_loopback,
    load_pair,
    load_public,
)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return generate(tmp_path / "keys", ["s0r0", "s0r1"], ["b0"])


def test_layout_and_permissions(keys: Path) -> None:
    for ident in ("client", "admin", "nodes/s0r0", "nodes/s0r1", "brokers/b0"):
        name = ident.rsplit("/", 1)[-1]
        secret = keys / ident / f"{name}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert (keys / ident / f"{name}.key").exists()
    assert sorted(p.name for p in (keys / "public" / "nodes").iterdir()) == ["s0r0.key", "s0r1.key"]
    assert [p.name for p in (keys / "public" / "clients").iterdir()] == ["client.key"]
    assert [p.name for p in (keys / "public" / "admins").iterdir()] == ["admin.key"]
    # pyzmq reads them
    public, secret = zmq.auth.load_certificate(keys / "client" / "client.key_secret")
    assert secret is not None and load_public(keys / "public" / "clients" / "client.key") == public


def test_generation_is_idempotent_and_keeps_existing_keys(keys: Path) -> None:
    before = load_pair(keys / "nodes" / "s0r0")
    generate(keys, ["s0r0", "s1r0"], ["b0"])
    assert load_pair(keys / "nodes" / "s0r0") == before
    assert (keys / "public" / "nodes" / "s1r0.key").exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_loose_secret_files_are_refused(keys: Path, mode: int) -> None:
    secret = keys / "client" / "client.key_secret"
    os.chmod(secret, mode)
    with pytest.raises(KeyFileError, match=f"{mode:04o}.*chmod 600"):
        load_pair(keys / "client")
    assert issubclass(KeyFileError, KVError)


def test_trust_store_roles_and_reload(keys: Path) -> None:
    trust = TrustStore(keys)
    node_pub, _ = load_pair(keys / "nodes" / "s0r1")
    client_pub, _ = load_pair(keys / "client")
    admin_pub, _ = load_pair(keys / "admin")
    assert trust.lookup(node_pub) is not None and trust.lookup(node_pub).user_id == "node:s0r1"  # type: ignore[union-attr]
    assert trust.lookup(client_pub).role == CLIENT  # type: ignore[union-attr]
    assert trust.lookup(admin_pub).role == ADMIN  # type: ignore[union-attr]
    assert trust.lookup(zmq.curve_keypair()[0]) is None
    time.sleep(0.01)  # a new mtime for the directory
    new = ensure_identity(keys, CLIENT, "client-2")  # rotation: add the new key ...
    new_pub, _ = load_pair(new)
    assert trust.lookup(new_pub) is not None
    (keys / "public" / "clients" / "client.key").unlink()  # ... remove the old one
    assert trust.lookup(client_pub) is None


def test_zap_decision_per_domain(keys: Path) -> None:
    ctx = zmq.Context()
    zap = ZapHandler(ctx, TrustStore(keys))
    try:
        raw = {name: zmq.utils.z85.decode(load_pair(keys / d)[0])
               for name, d in (("node", "nodes/s0r0"), ("client", "client"), ("admin", "admin"))}
        assert zap.decide("peer", b"CURVE", [raw["node"]]).role == NODE  # type: ignore[union-attr]
        assert zap.decide("peer", b"CURVE", [raw["client"]]) is None  # not a member key
        assert zap.decide("backend", b"CURVE", [raw["admin"]]) is None
        assert zap.decide("heartbeats", b"CURVE", [raw["client"]]) is None
        assert zap.decide("frontend", b"CURVE", [raw["client"]]).role == CLIENT  # type: ignore[union-attr]
        assert zap.decide("frontend", b"CURVE", [raw["node"]]) is None
        assert zap.decide("frontend", b"NULL", []) is None
        assert zap.decide("nowhere", b"CURVE", [raw["admin"]]) is None
    finally:
        zap.close()
        ctx.term()


def test_broker_key_by_endpoint_metadata(tmp_path: Path) -> None:
    keys = generate(tmp_path / "k", [], ["b0", "b1"], broker_endpoints={
        "b0": ["tcp://h:1", "tcp://h:2"], "b1": ["tcp://h:4"]})
    public = keys / "public"
    assert cert_metadata(public / "brokers" / "b1.key") == {"endpoints": "tcp://h:4"}
    assert broker_key_for(public, "tcp://h:2") == load_pair(keys / "brokers" / "b0")[0]
    assert broker_key_for(public, "tcp://h:4") == load_pair(keys / "brokers" / "b1")[0]
    with pytest.raises(KeyFileError, match="tcp://h:9"):
        broker_key_for(public, "tcp://h:9")
    # a client identity dir finds the public dir next to it
    assert Curve.for_identity(keys / "client").public_dir == public.resolve()


@pytest.mark.parametrize(("endpoint", "local"), [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:1", True), ("tcp://[::1]:1", True),
    ("tcp://127.3.4.5:1", True), ("ipc:///tmp/x", True), ("tcp://*:5555", False),
    ("tcp://0.0.0.0:1", False), ("tcp://10.0.0.1:1", False), ("tcp://broker:1", False),
])
def test_is_loopback(endpoint: str, local: bool) -> None:
    assert is_loopback(endpoint) is local


def test_permission_denied_is_a_typed_error() -> None:
    exc = error_for_code(ErrorCode.PERMISSION_DENIED, "needs admin")
    assert isinstance(exc, PermissionDenied) and exc.code == ErrorCode.PERMISSION_DENIED
