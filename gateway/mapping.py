"""HTTP <-> zkv translation, with no I/O: headers in, decisions out.

Theory of operation:

- A key is the URL path after ``/kv/`` (percent-decoded, so it may hold ``/`` and any
  UTF-8); the SDK encodes it to UTF-8 bytes. An empty key is refused (422).
- A value arrives either as the JSON body ``{"key": ..., "value": <text>}`` (or
  ``"value_base64"`` for bytes), whose ``key`` must equal the path's key, or as the raw
  body of any other content type. It leaves as JSON ``{"key", "value", "version"}``
  with ``value`` the text when the bytes are UTF-8, else ``value: null`` and an
  explicit ``value_base64``; or as raw bytes when the client accepts only
  ``application/octet-stream``.
- Versions are ETags: ``ETag: "<version>"``. ``If-Match: "<version>"`` turns a PUT into a
  compare-and-set on that version; ``If-None-Match: *`` turns it into create-only
  (compare-and-set on version 0, the SDK's "must not exist"). A mismatch is 412.
- Errors map by what the caller can do about them (``status_for``): fix the request
  (422, 413), come back later (503 + ``Retry-After``: no leader, fenced, unavailable),
  or find out what happened (504: no answer in time, so a write's outcome is unknown).
  The SDK retries retryable codes until its deadline and then raises ``Timeout`` *from*
  the last error, so a ``Timeout`` caused by ``NoLeader`` is still reported as 503.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from zkv.client.sdk import ClientClosed
from zkv.protocol.errors import (
    BadRequest,
    KVError,
    NoLeader,
    NotLeader,
    SessionExpired,
    TooLarge,
    Unavailable,
    WrongShard,
)
from zkv.protocol.errors import (
    Timeout as KVTimeout,
)
from zkv.protocol.messages import Consistency

RETRY_AFTER_S = 1
CONSISTENCY = {"linearizable": Consistency.LINEARIZABLE, "leader": Consistency.LEADER,
               "stale": Consistency.STALE}
_BUSY = (NoLeader, NotLeader, Unavailable, WrongShard, ClientClosed)


class HTTPProblem(Exception):
    """A request the gateway answers with ``status`` and a JSON ``{"detail": ...}``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, **self.extra}


@dataclass(frozen=True, slots=True)
class Precondition:
    """What a write's conditional headers ask for: ``expected_version`` None means an
    unconditional write; 0 means create-only; N means "only if the version is N"."""

    expected_version: int | None


def parse_key(key: str) -> str:
    if not key:
        raise HTTPProblem(422, "the key must not be empty: use /kv/<key>")
    return key


def parse_consistency(text: str | None) -> Consistency:
    if text is None or text == "":
        return Consistency.LINEARIZABLE
    try:
        return CONSISTENCY[text.lower()]
    except KeyError:
        raise HTTPProblem(422, f"consistency must be one of {', '.join(CONSISTENCY)}, "
                          f"not {text!r}") from None


def etag(version: int) -> str:
    return f'"{version}"'


def parse_precondition(if_match: str | None, if_none_match: str | None) -> Precondition:
    """``If-Match: "<version>"`` (quotes optional, W/ refused: versions are exact) or
    ``If-None-Match: *``; both at once is contradictory (422)."""
    if if_match is not None and if_none_match is not None:
        raise HTTPProblem(422, "use either If-Match or If-None-Match, not both")
    if if_none_match is not None:
        if if_none_match.strip() != "*":
            raise HTTPProblem(422, 'If-None-Match on a write must be "*" (create-only)')
        return Precondition(0)
    if if_match is None:
        return Precondition(None)
    text = if_match.strip()
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        text = text[1:-1]
    if not text.isdigit() or int(text) < 1:
        raise HTTPProblem(422, f'If-Match must be one version, "<n>" with n >= 1, '
                          f"not {if_match!r}")
    return Precondition(int(text))


def parse_put_body(key: str, content_type: str, body: bytes) -> bytes:
    """The value to store, from a JSON body ``{"key", "value" | "value_base64"}`` or,
    for any other content type, the raw body."""
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        return body
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPProblem(422, f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise HTTPProblem(422, 'the JSON body must be an object {"key": ..., "value": ...}')
    if "key" in doc and doc["key"] != key:
        raise HTTPProblem(422, f"the body's key {doc['key']!r} does not match the path's "
                          f"key {key!r}")
    if "key" not in doc:
        raise HTTPProblem(422, 'the JSON body needs "key" (equal to the path\'s key)')
    if isinstance(doc.get("value"), str) and "value_base64" not in doc:
        return str(doc["value"]).encode("utf-8")
    if isinstance(doc.get("value_base64"), str) and doc.get("value") is None:
        try:
            return base64.b64decode(doc["value_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise HTTPProblem(422, "value_base64 is not valid base64") from None
    raise HTTPProblem(422, 'the JSON body needs "value" (a string) or "value_base64"')


def value_document(key: str, value: bytes, version: int) -> dict[str, Any]:
    try:
        return {"key": key, "value": value.decode("utf-8"), "version": version}
    except UnicodeDecodeError:
        return {"key": key, "value": None,
                "value_base64": base64.b64encode(value).decode("ascii"), "version": version}


def wants_raw(accept: str | None) -> bool:
    """True when the client asks for octet-stream and not JSON (``Accept: */*`` and a
    missing header get JSON, as the original API answered)."""
    if not accept:
        return False
    types = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    return "application/octet-stream" in types and "application/json" not in types


def status_for(exc: BaseException, write: bool) -> HTTPProblem:
    """The HTTP answer for an error raised by the SDK (see the module doc)."""
    cause = exc.__cause__ if isinstance(exc, KVTimeout) else None
    if isinstance(exc, TooLarge):
        return HTTPProblem(413, str(exc))
    if isinstance(exc, (BadRequest, ValueError, TypeError)):
        return HTTPProblem(422, str(exc))
    if isinstance(exc, _BUSY) or isinstance(cause, _BUSY) or isinstance(exc, SessionExpired):
        what = type(cause if isinstance(cause, _BUSY) else exc).__name__
        detail = f"the shard cannot serve now ({what}); retry after {RETRY_AFTER_S}s"
        extra = {"outcome": "unknown"} if write and isinstance(exc, KVTimeout) else {}
        return HTTPProblem(503, detail, {"Retry-After": str(RETRY_AFTER_S)}, **extra)
    if isinstance(exc, KVTimeout):
        detail = "no answer from the cluster in time"
        if write:
            detail += ": the write's outcome is unknown (it may or may not have been applied)"
            return HTTPProblem(504, detail, outcome="unknown")
        return HTTPProblem(504, detail)
    if isinstance(exc, KVError):
        return HTTPProblem(500, f"{type(exc).__name__}: {exc}")
    raise exc
