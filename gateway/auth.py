"""Who may call which gateway route: bearer tokens checked the same way on both paths.

Theory of operation:

- ``required_roles(path)`` is the whole policy, one table (None: open to anyone):

  ===========================================  ====================  ==================
  path                                         roles                 why
  ===========================================  ====================  ==================
  ``/kv/...``, ``/kv`` (every method)          client, admin         the data
  ``/metrics``                                 admin, metrics        operator data; a
                                                                     scraper's token
                                                                     reads no keys
  ``/ui/data``                                 admin                 cluster details
  ``/health``, ``/ready``                      open                  probes carry no
                                                                     token
  ``/docs``, ``/redoc``, ``/openapi.json``,    open                  the API's shape is
  their assets, ``/ui``, ``/ui/app.js``                              public; no data
  anything else                                any valid token       deny by default
  ===========================================  ====================  ==================

  Probes stay open as Kubernetes keeps ``/livez`` and ``/readyz`` open to anonymous
  users and etcd keeps ``/health`` open: a load balancer or kubelet cannot hold a
  secret, and the answer says only "up" and which node leads each shard (no key, value
  or address). ``/metrics`` needs a token as the Kubernetes API server's does
  (Prometheus sends one with ``authorization: {credentials_file: ...}``), because
  request rates by route and status are the operator's business; the ``metrics`` role
  lets a scraper in without letting it read or write keys. The live page's HTML and
  script hold no data and stay open so a browser can load the page and be asked for a
  token; the data it draws (``/ui/data``) is status detail, the admin role's.
- ``Authenticator.check(method, path, authorization)`` answers None (go on) or the
  ``Reply`` to send: **401** with ``WWW-Authenticate: Bearer realm="zkv"`` when no token
  came (RFC 6750 3.1: no error code then), or with ``error="invalid_token"`` for a token
  that is unknown or not a Bearer credential; **403** with ``error="insufficient_scope"``
  when the token is valid but its role may not use the route. Both fast paths
  (``protocol.KVHttpProtocol`` for plain /kv requests, and ``BearerAuth`` in front of
  the ASGI chain for everything else) call this same method, so they cannot disagree.
- Token lookup is constant time (``tokens.TokenTable.role_of``).
- The tokens file is re-read when its mtime, size, inode or mode changes
  (``reload_if_changed``, called about once a second by a task of each worker; never on
  the request path). A file that became invalid is reported and the previous tokens
  stay in force: a typo during a rotation must not lock everyone out or let everyone in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from zkv.gateway import tokens
from zkv.gateway.kv import Receive, Reply, Scope, Send, json_reply, send_reply
from zkv.gateway.tokens import ADMIN, CLIENT, METRICS, ROLES, TokenFileError, TokenTable

DATA_ROLES = frozenset({CLIENT, ADMIN})
METRICS_ROLES = frozenset({ADMIN, METRICS})
STATUS_ROLES = frozenset({ADMIN})
ANY_ROLE = frozenset(ROLES)
OPEN_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json", "/ui", "/ui/app.js"})
OPEN_PREFIXES = ("/static-offline-docs/",)  # fastapi-offline's Swagger/ReDoc assets
REALM = 'Bearer realm="zkv"'
RELOAD_S = 1.0


def required_roles(path: str) -> frozenset[str] | None:
    """The roles that may use ``path`` (ASGI's percent-decoded path); None: open."""
    if path.startswith("/kv/") or path in ("/kv", "/watch"):  # "/kv": the scan route
        return DATA_ROLES
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    if path == "/metrics":
        return METRICS_ROLES
    if path == "/ui/data":
        return STATUS_ROLES
    return ANY_ROLE


def authorization(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The Authorization header's value (lower-case names, as uvicorn gives them);
    several are joined with ", " and so never read as one valid token."""
    found = [v for k, v in headers if k == b"authorization"]
    if not found:
        return None
    return found[0] if len(found) == 1 else b", ".join(found)


def bearer_token(value: bytes | None) -> bytes | None:
    """The credential of ``Bearer <token>`` (scheme case-insensitive), else None."""
    if value is None:
        return None
    scheme, _, credential = value.strip().partition(b" ")
    credential = credential.strip()
    if scheme.lower() != b"bearer" or not credential:
        return None
    return credential


def unauthorized(detail: str, error: str | None) -> Reply:
    challenge = REALM if error is None else f'{REALM}, error="{error}"'
    return json_reply({"detail": detail}, 401, {"WWW-Authenticate": challenge})


#: the 401s do not depend on the request: built once (a flood of them costs little)
MISSING = unauthorized("a bearer token is required: Authorization: Bearer <token>", None)
NOT_BEARER = unauthorized("the Authorization header is not 'Bearer <token>'", "invalid_token")
UNKNOWN = unauthorized("the bearer token is not valid", "invalid_token")


def forbidden(role: str, method: str, path: str, allowed: Iterable[str]) -> Reply:
    need = " or ".join(sorted(allowed))
    return json_reply({"detail": f"the token's role {role!r} may not {method} {path} "
                       f"(it needs {need})", "role": role},
                      403, {"WWW-Authenticate": f'{REALM}, error="insufficient_scope"'})


def _stamp(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)


class Authenticator:
    """The gateway's tokens (from a file, re-read when it changes) and the policy."""

    def __init__(self, path: Path | None, table: TokenTable | None = None) -> None:
        """From ``path`` (``TokenFileError`` if it is unusable); ``table`` alone: fixed
        tokens (tests)."""
        self.path = None if path is None else Path(path)
        self._stamp = None if self.path is None else _stamp(self.path)
        if table is None:
            if self.path is None:
                raise ValueError("an Authenticator needs a tokens file or a table")
            table = tokens.load(self.path)
        self.table = table

    def check(self, method: str, path: str, authorization: bytes | None) -> Reply | None:
        """None when the request may go on, else the 401/403 to answer (module doc)."""
        allowed = required_roles(path)
        if allowed is None:
            return None
        token = bearer_token(authorization)
        if token is None:
            if authorization is None or not authorization.strip():
                return MISSING
            return NOT_BEARER
        role = self.table.role_of(token)
        if role is None:
            return UNKNOWN
        if role not in allowed:
            return forbidden(role, method, path, allowed)
        return None

    def reload_if_changed(self) -> str | None:
        """Re-read the tokens file if it changed; a line to log when something happened."""
        if self.path is None:
            return None
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            table = tokens.load(self.path)
        except TokenFileError as exc:
            return f"tokens file not reloaded, the previous tokens stay in force: {exc}"
        self.table = table
        return f"tokens reloaded from {self.path}: {describe(table)}"


def describe(table: TokenTable) -> str:
    return ", ".join(f"{n} {role}" for role, n in table.roles().items())


class BearerAuth:
    """Raw ASGI middleware: ``Authenticator.check`` for every HTTP request reaching the
    ASGI chain (the /kv requests the protocol answers itself are checked there)."""

    def __init__(self, app: Any, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        denied = self.auth.check(scope.get("method", "GET"), scope["path"],
                                 authorization(scope["headers"]))
        if denied is None:
            await self.app(scope, receive, send)
        elif kind == "websocket":  # closing before accept: the server answers 403
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send_reply(send, denied)


def is_loopback_host(host: str) -> bool:
    """Whether listening on ``host`` stays on this machine ("0.0.0.0", "::" and names
    other than localhost do not)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def openapi_security(schema: dict[str, Any]) -> dict[str, Any]:
    """Mark the protected operations of an OpenAPI ``schema`` with a bearer scheme (from
    ``required_roles``, so the docs follow the policy), so Swagger UI's Authorize button
    sends the token."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer",
        "description": "a token from the gateway's tokens file (--tokens)"}
    for path, operations in schema.get("paths", {}).items():
        roles = required_roles(path)
        if roles is None:
            continue
        for op in operations.values():
            if isinstance(op, dict):
                op["security"] = [{"bearer": []}]
                note = f"Roles: {', '.join(sorted(roles))}."
                op["description"] = f"{op.get('description', '')}\n\n{note}".strip()
    return schema

