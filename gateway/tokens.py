"""The HTTP gateway's bearer tokens: the tokens file, and token -> role in constant time.

Theory of operation:

- A tokens file (``zkv gateway --tokens FILE``) has one token a line, ``<role> <token>``,
  with ``#`` comments and blank lines ignored. Roles: ``client`` (the /kv data
  operations), ``admin`` (data operations, ``/metrics`` and the live page's cluster
  details) and ``metrics`` (``/metrics`` only: what a Prometheus scraper needs, and
  nothing that reads or writes keys). ``client`` and ``admin`` mean what they mean for
  Curve keys (``protocol/security.py``); ``metrics`` exists only here, because a
  scraper's credential should not be able to read the data it watches.
- A role may have several tokens: that is how a token is rotated with no downtime (add
  the new one, move its users, remove the old one; the gateway re-reads the file when
  it changes, see ``auth.Authenticator``).
- The file is a secret like a Curve secret key: one that group or others may read or
  write is refused (``chmod 600``), as ssh refuses a loose private key. A token must be
  at least ``TOKEN_CHARS_MIN`` characters of RFC 6750's token alphabet, and a token may
  not appear twice: a short or mistyped file is an error, never a silently open gateway.
- Lookup hashes the presented token (SHA-256) and compares the digest with *every*
  known digest with ``hmac.compare_digest``, without stopping at a match: the time it
  takes says nothing about how much of a token was right, how long the real tokens are,
  or which line matched. The table keeps digests only, never the tokens themselves.

Pure: parsing takes text; ``load`` reads one file; no clock, no sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLIENT, ADMIN, METRICS = "client", "admin", "metrics"
ROLES = (CLIENT, ADMIN, METRICS)
TOKEN_CHARS_MIN = 16
#: RFC 6750's b64token: what may follow ``Bearer `` in an Authorization header
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
SECRET_MODE_MASK = 0o077


class TokenFileError(ValueError):
    """A tokens file that is missing, malformed, empty or readable by others."""


@dataclass(frozen=True, slots=True)
class TokenTable:
    """SHA-256 digest of each known token, with its role (see the module doc)."""

    entries: tuple[tuple[bytes, str], ...]

    def role_of(self, token: bytes) -> str | None:
        """The role of ``token``, or None; constant time in the token (module doc)."""
        digest = hashlib.sha256(token).digest()
        found: str | None = None
        for known, role in self.entries:
            if hmac.compare_digest(digest, known):
                found = role
        return found

    def roles(self) -> dict[str, int]:
        """How many tokens each role has (for the start-up line; never the tokens)."""
        counts = dict.fromkeys(ROLES, 0)
        for _, role in self.entries:
            counts[role] += 1
        return {r: n for r, n in counts.items() if n}


def parse(text: str, source: str = "tokens") -> TokenTable:
    """The table of a tokens file's text; ``TokenFileError`` naming the line if bad."""
    entries: list[tuple[bytes, str]] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source} line {number}"
        if len(parts) != 2:
            raise TokenFileError(f"{where}: expected '<role> <token>', got {len(parts)} "
                                 "field(s)")
        role, token = parts
        if role not in ROLES:
            raise TokenFileError(f"{where}: unknown role {role!r} (one of {', '.join(ROLES)})")
        if len(token) < TOKEN_CHARS_MIN or not _TOKEN.match(token):
            raise TokenFileError(f"{where}: a token must be at least {TOKEN_CHARS_MIN} "
                                 "characters of A-Z a-z 0-9 - . _ ~ + / (zkv generates "
                                 "them with secrets.token_urlsafe(32))")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        if digest in seen:
            raise TokenFileError(f"{where}: this token is already listed (a token has one "
                                 "role)")
        seen.add(digest)
        entries.append((digest, role))
    if not entries:
        raise TokenFileError(f"{source}: no tokens in it: every protected route would refuse "
                             "everyone")
    return TokenTable(tuple(entries))


def check_permissions(path: Path) -> os.stat_result:
    """Refuse a tokens file that group or others may read or write (like ssh)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise TokenFileError(f"cannot read the tokens file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise TokenFileError(f"the tokens file {path} is not a regular file")
    if st.st_mode & SECRET_MODE_MASK:
        raise TokenFileError(
            f"the tokens file {path} has permissions {stat.S_IMODE(st.st_mode):04o}: it must "
            f"not be accessible by others (run: chmod 600 {path})")
    return st


def load(path: Path) -> TokenTable:
    path = Path(path)
    check_permissions(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the tokens file {path}: {exc}") from exc
    return parse(text, str(path))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def generate(path: Path, roles: Iterable[str] = ROLES) -> bool:
    """Write a tokens file with one new token per role, mode 0600; an existing file is
    kept (its tokens may be in use). True when it was written."""
    path = Path(path)
    if path.exists():
        return False
    lines = ["# zkv HTTP gateway bearer tokens: <role> <token>, one a line. Several tokens",
             "# per role are allowed (rotation: add the new one, move clients, remove the",
             "# old one; the gateway re-reads this file when it changes).",
             *(f"{role} {new_token()}" for role in roles)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return True


def token_for(path: Path, role: str) -> str | None:
    """The first token of ``role`` in a tokens file (for tests and printed examples)."""
    for raw in Path(path).read_text(encoding="ascii").splitlines():
        parts = raw.split("#", 1)[0].split()
        if len(parts) == 2 and parts[0] == role:
            return parts[1]
    return None
