"""The gateway's tokens file and policy, pure: parsing, permissions, generation,
constant-time lookup, the route table, 401/403 shapes, reloading, and the start-up
checks of ``zkv gateway`` (non-loopback without tokens, TLS files, the Curve key)."""

from __future__ import annotations

import argparse
import hmac
import json
import os
from pathlib import Path

import pytest

from zkv.gateway import auth, tokens
from zkv.gateway.auth import Authenticator, bearer_token, is_loopback_host, required_roles
from zkv.gateway.main import check_security
from zkv.gateway.tokens import TokenFileError, TokenTable, parse

pytestmark = pytest.mark.unit

CLIENT_T = "client-token-0123456789abcdef"
ADMIN_T = "admin-token-0123456789abcdef"
METRICS_T = "metrics-token-0123456789abcdef"
TEXT = f"""# a comment
client {CLIENT_T}
client second-client-token-xyz0123   # rotation: two at once

admin {ADMIN_T}
metrics {METRICS_T}
"""


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def table() -> TokenTable:
    return parse(TEXT)


# --------------------------------------------------------------------- the file


def test_parse_maps_tokens_to_roles_and_allows_several_per_role() -> None:
    t = table()
    assert t.role_of(CLIENT_T.encode()) == "client"
    assert t.role_of(b"second-client-token-xyz0123") == "client"
    assert t.role_of(ADMIN_T.encode()) == "admin"
    assert t.role_of(METRICS_T.encode()) == "metrics"
    assert t.role_of(b"nope-nope-nope-nope-nope") is None
    assert t.role_of(CLIENT_T[:-1].encode()) is None
    assert t.roles() == {"client": 2, "admin": 1, "metrics": 1}
    assert CLIENT_T.encode() not in repr(t).encode()  # digests only


@pytest.mark.parametrize(("text", "message"), [
    ("client", "line 1: expected '<role> <token>'"),
    (f"client {CLIENT_T} extra", "expected '<role> <token>', got 3"),
    (f"root {CLIENT_T}", "unknown role 'root'"),
    ("client short", "at least 16 characters"),
    ("client has,a,comma,in-it-0123", "at least 16 characters"),
    (f"client {CLIENT_T}\nadmin {CLIENT_T}", "line 2: this token is already listed"),
    ("# only a comment\n\n", "no tokens in it"),
])
def test_bad_files_are_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(TokenFileError, match=message.replace("(", r"\(")):
        parse(text)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_tokens_file_others_may_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "tokens", TEXT, mode)
    with pytest.raises(TokenFileError, match=f"permissions {mode:04o}.*chmod 600"):
        tokens.load(path)
    os.chmod(path, 0o600)
    assert tokens.load(path).roles()["client"] == 2
    os.chmod(path, 0o400)
    assert tokens.load(path).roles()["admin"] == 1


def test_missing_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read the tokens file"):
        tokens.load(tmp_path / "absent")


def test_generate_writes_one_token_per_role_mode_600_and_keeps_an_existing_file(
        tmp_path: Path) -> None:
    path = tmp_path / "gw" / "tokens"
    assert tokens.generate(path)
    assert path.stat().st_mode & 0o777 == 0o600
    t = tokens.load(path)
    assert t.roles() == {"client": 1, "admin": 1, "metrics": 1}
    client = tokens.token_for(path, "client")
    assert client is not None and t.role_of(client.encode()) == "client"
    before = path.read_text()
    assert not tokens.generate(path)
    assert path.read_text() == before


def test_lookup_compares_every_digest_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", counting)
    t = table()
    for token in (CLIENT_T, METRICS_T, "unknown-token-0123456789"):
        calls.clear()
        t.role_of(token.encode())
        # every entry, even after a match on the first one; equal-length digests
        assert len(calls) == len(t.entries) == 4
        assert all(len(a) == len(b) == 32 for a, b in calls)


# --------------------------------------------------------------------- the policy


def test_route_table() -> None:
    for path in ("/kv/a", "/kv/a/b", "/kv/", "/kv"):  # /kv: the scan (GET /kv?prefix=)
        assert required_roles(path) == {"client", "admin"}, path
    for path in ("/health", "/ready", "/docs", "/redoc", "/openapi.json", "/ui", "/ui/app.js",
                 "/docs/oauth2-redirect", "/static-offline-docs/swagger-ui.css"):
        assert required_roles(path) is None, path
    assert required_roles("/metrics") == {"admin", "metrics"}
    assert required_roles("/ui/data") == {"admin"}
    for path in ("/", "/kvx", "/health/", "/admin", "/metrics/x", "/HEALTH"):
        assert required_roles(path) == {"client", "admin", "metrics"}, path


def test_bearer_header_parsing() -> None:
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer   abc  ") == b"abc"
    assert bearer_token(b"BEARER abc") == b"abc"
    for value in (None, b"", b"Bearer", b"Bearer ", b"Basic YWxhZGRpbjpvcGVu", b"abc"):
        assert bearer_token(value) is None, value
    assert auth.authorization([(b"host", b"t")]) is None
    assert auth.authorization([(b"authorization", b"Bearer a")]) == b"Bearer a"
    assert auth.authorization([(b"authorization", b"Bearer a"),
                               (b"authorization", b"Bearer b")]) == b"Bearer a, Bearer b"


def _doc(reply: object) -> dict[str, object]:
    return json.loads(reply.body)  # type: ignore[attr-defined,no-any-return]


def test_check_answers_401_and_403_with_rfc6750_challenges() -> None:
    a = Authenticator(None, table())
    missing = a.check("GET", "/kv/x", None)
    assert missing is not None and missing.status == 401
    assert missing.headers == {"WWW-Authenticate": 'Bearer realm="zkv"'}
    assert "bearer token is required" in str(_doc(missing)["detail"])
    for header in (b"Bearer wrong-token-0123456789", b"Basic YWxhZGRpbjpvcGVu",
                   f"Bearer {CLIENT_T}x".encode(), f"Bearer {CLIENT_T}, Bearer x".encode()):
        bad = a.check("GET", "/kv/x", header)
        assert bad is not None and bad.status == 401, header
        assert bad.headers["WWW-Authenticate"] == 'Bearer realm="zkv", error="invalid_token"'
    denied = a.check("GET", "/metrics", f"Bearer {CLIENT_T}".encode())
    assert denied is not None and denied.status == 403
    assert denied.headers["WWW-Authenticate"] == 'Bearer realm="zkv", error="insufficient_scope"'
    assert _doc(denied) == {"detail": "the token's role 'client' may not GET /metrics (it needs "
                            "admin or metrics)", "role": "client"}
    assert a.check("GET", "/kv/x", f"Bearer {CLIENT_T}".encode()) is None
    assert a.check("PUT", "/kv/x", f"bearer {ADMIN_T}".encode()) is None
    assert a.check("GET", "/metrics", f"Bearer {METRICS_T}".encode()) is None
    assert a.check("GET", "/metrics", f"Bearer {ADMIN_T}".encode()) is None
    reply = a.check("DELETE", "/kv/x", f"Bearer {METRICS_T}".encode())
    assert reply is not None and reply.status == 403
    reply = a.check("GET", "/ui/data", f"Bearer {CLIENT_T}".encode())
    assert reply is not None and reply.status == 403
    assert a.check("GET", "/ui/data", f"Bearer {ADMIN_T}".encode()) is None
    assert a.check("GET", "/health", None) is None
    assert a.check("GET", "/health", b"Bearer garbage") is None  # open means open


def test_reload_picks_up_a_new_token_and_keeps_the_old_ones_on_a_bad_file(
        tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", f"client {CLIENT_T}\n")
    a = Authenticator(path)
    new = "rotated-client-token-0123456789"
    assert a.reload_if_changed() is None  # unchanged
    write(path, f"client {CLIENT_T}\nclient {new}\n")
    assert "tokens reloaded" in str(a.reload_if_changed())
    assert a.check("GET", "/kv/x", f"Bearer {new}".encode()) is None
    write(path, f"client {new}\n")  # the old one retired
    a.reload_if_changed()
    reply = a.check("GET", "/kv/x", f"Bearer {CLIENT_T}".encode())
    assert reply is not None and reply.status == 401
    write(path, "client oops\n")  # a typo mid-rotation: the previous tokens stay
    assert "not reloaded" in str(a.reload_if_changed())
    assert a.check("GET", "/kv/x", f"Bearer {new}".encode()) is None
    assert a.reload_if_changed() is None  # said once, not every second
    write(path, f"admin {ADMIN_T}\n", 0o644)  # too open: refused as at start
    assert "chmod 600" in str(a.reload_if_changed())
    os.chmod(path, 0o600)  # fixing only the mode is a change too
    assert "tokens reloaded" in str(a.reload_if_changed())
    assert a.check("GET", "/metrics", f"Bearer {ADMIN_T}".encode()) is None


def test_openapi_security_follows_the_policy() -> None:
    schema = {"paths": {"/kv/{key}": {"get": {}, "put": {"description": "Store."}},
                        "/health": {"get": {}}, "/metrics": {"get": {}}}}
    out = auth.openapi_security(schema)
    assert out["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert out["paths"]["/kv/{key}"]["get"]["security"] == [{"bearer": []}]
    assert out["paths"]["/kv/{key}"]["put"]["description"] == "Store.\n\nRoles: admin, client."
    assert "security" not in out["paths"]["/health"]["get"]
    assert out["paths"]["/metrics"]["get"]["description"] == "Roles: admin, metrics."


# --------------------------------------------------------------------- zkv gateway checks


def test_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.com", ""):
        assert not is_loopback_host(host), host


def _args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"host": "127.0.0.1", "tokens": None, "tls_cert": None,
                               "tls_key": None, "insecure": False, "keys_dir": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_non_loopback_without_tokens_is_refused_unless_insecure(tmp_path: Path) -> None:
    why, _ = check_security(_args(host="0.0.0.0"))
    assert why is not None and "refusing to listen on 0.0.0.0" in why
    assert "--tokens" in why and "--insecure" in why
    why, warnings = check_security(_args(host="0.0.0.0", insecure=True))
    assert why is None and any("--insecure" in w for w in warnings)
    assert check_security(_args()) == (None, [])  # loopback: open, as before
    path = write(tmp_path / "tokens", TEXT)
    why, warnings = check_security(_args(host="0.0.0.0", tokens=path))
    assert why is None
    assert any("plaintext" in w for w in warnings)  # tokens without TLS off loopback


def test_bad_tokens_tls_or_key_files_stop_the_gateway(tmp_path: Path) -> None:
    loose = write(tmp_path / "loose", TEXT, 0o644)
    why, _ = check_security(_args(tokens=loose))
    assert why is not None and "chmod 600" in why
    cert = write(tmp_path / "cert.pem", "x", 0o644)
    key = write(tmp_path / "key.pem", "x", 0o644)
    assert check_security(_args(tls_cert=cert))[0] == "--tls-cert and --tls-key go together"
    why, _ = check_security(_args(tls_cert=cert, tls_key=key))
    assert why is not None and "the TLS key" in why and "chmod 600" in why
    os.chmod(key, 0o600)
    assert check_security(_args(tls_cert=cert, tls_key=key))[0] is None
    why, _ = check_security(_args(tls_cert=tmp_path / "absent", tls_key=key))
    assert why is not None and "not found" in why
    why, _ = check_security(_args(keys_dir=tmp_path))
    assert why is not None and "the gateway's Curve key" in why


def test_keys_generate_gives_the_gateway_a_client_key_and_tokens(tmp_path: Path) -> None:
    from zkv.ops.keys import generate
    from zkv.protocol.security import TrustStore, load_pair

    keys = generate(tmp_path / "keys", ["s0r0"], ["b0"], gateway="gateway")
    public, _ = load_pair(keys / "gateway")
    who = TrustStore(keys).lookup(public)
    assert who is not None and (who.role, who.name) == ("client", "gateway")  # never admin
    path = keys / "gateway" / "tokens"
    assert path.stat().st_mode & 0o777 == 0o600
    assert tokens.load(path).roles() == {"client": 1, "admin": 1, "metrics": 1}
    before = path.read_text()
    generate(keys, ["s0r0", "s1r0"], ["b0"], gateway="gateway")  # growing keeps the tokens
    assert path.read_text() == before
    assert not (generate(tmp_path / "none", [], ["b0"]) / "gateway").exists()
