"""The /kv/{key} handlers, framework-free, and the raw ASGI path that serves them.

Theory of operation:

- ``KVHandlers`` does one request: headers (a dict with lower-case names), the key and
  the body in; a ``Reply`` (status, body, content type, headers) out. It never raises
  for a request it can answer: ``HTTPProblem`` and SDK errors become replies through
  ``mapping``. ``If-Match`` is atomic on both writes: PUT's is a CAS, DELETE's a delete
  carrying the expected version, decided where the shard applies it (412 with the key's
  current version when it does not match).
- ``KVFastPath`` is an ASGI middleware in front of FastAPI's router: requests for
  ``/kv/...`` with GET, PUT or DELETE go straight to ``KVHandlers``; everything else
  (and every other method) goes on to FastAPI. Why: FastAPI's routing and dependency
  solving cost several times the handler itself (measured: ~5x CPU per request), and a
  gateway's job is to add little to the store behind it. The same handlers back the
  FastAPI routes declared for the OpenAPI schema, so the docs describe this code.
- ``PUT /kv/{key}?ttl=SECONDS``: the key expires SECONDS after the put (the SDK's
  ``put(ttl=)``); with ``If-Match`` / ``If-None-Match`` it is refused (400): a CAS
  carries no TTL, and a CAS then an expire would not be one atomic write.
- Bodies are read up to ``BODY_BYTES_MAX`` (a 1 MiB value base64-encoded in JSON, plus
  room); a larger body is refused with 413 before it is all read, so memory stays
  bounded whatever a client sends.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from zkv.client.aio import AsyncKVClient
from zkv.client.ttl import ttl_ms
from zkv.gateway import mapping
from zkv.gateway.get_batcher import MAX_BATCH, GetBatcher
from zkv.gateway.mapping import HTTPProblem, etag
from zkv.gateway.metrics import GatewayMetrics

if TYPE_CHECKING:
    from zkv.gateway.auth import Authenticator

JSON = "application/json"
BODY_BYTES_MAX = 2 * 1024 * 1024
METHODS = frozenset({"GET", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(doc, ensure_ascii=False).encode(), JSON, headers or {})


def problem_reply(p: HTTPProblem) -> Reply:
    return json_reply(p.body(), p.status, p.headers)


def _precondition_failed(key: str, version: int) -> Reply:
    return json_reply({"detail": "precondition failed: the key's version is "
                       f"{version or 'none (absent)'}", "key": key, "version": version}, 412)


class KVHandlers:
    def __init__(self, client: Callable[[], AsyncKVClient], get_batch_max: int = MAX_BATCH,
                 ) -> None:
        self.client = client
        self.gets = GetBatcher(client, get_batch_max)  # a loop turn's GETs leave as one batch

    async def put(self, key: str, headers: Mapping[str, str], body: bytes,
                  ttl: str | None = None) -> Reply:
        try:
            key = mapping.parse_key(key)
            cond = mapping.parse_precondition(headers.get("if-match"),
                                              headers.get("if-none-match"))
            value = mapping.parse_put_body(key, headers.get("content-type", ""), body)
            kv = self.client()
            if ttl is not None:
                seconds = parse_ttl(ttl, cond.expected_version is not None)
                version = await kv.put(key, value, ttl=seconds)
                return json_reply({"key": key, "version": version, "ttl": seconds}, 200,
                                  {"ETag": etag(version)})
            if cond.expected_version is None:
                version = await kv.put(key, value)
            else:
                swapped, version = await kv.cas_versioned(key, cond.expected_version, value)
                if not swapped:
                    return _precondition_failed(key, version)
        except HTTPProblem as p:
            return problem_reply(p)
        except Exception as exc:
            return problem_reply(mapping.status_for(exc, write=True))
        return json_reply({"key": key, "version": version}, 200, {"ETag": etag(version)})

    async def get(self, key: str, headers: Mapping[str, str], consistency: str | None) -> Reply:
        try:
            key = mapping.parse_key(key)
            level = mapping.parse_consistency(consistency)
            found = await self.gets.get_versioned(key, consistency=level)
        except HTTPProblem as p:
            return problem_reply(p)
        except Exception as exc:
            return problem_reply(mapping.status_for(exc, write=False))
        if found is None:
            return json_reply({"detail": "key not found", "key": key}, 404)
        value, version = found
        if mapping.wants_raw(headers.get("accept")):
            return Reply(200, value, "application/octet-stream", {"ETag": etag(version)})
        return json_reply(mapping.value_document(key, value, version), 200,
                          {"ETag": etag(version)})

    async def delete(self, key: str, headers: Mapping[str, str]) -> Reply:
        try:
            key = mapping.parse_key(key)
            cond = mapping.parse_precondition(headers.get("if-match"), None)
            existed, current = await self.client().delete_versioned(
                key, expected_version=cond.expected_version)
            if not existed and cond.expected_version is not None:
                return _precondition_failed(key, current)
        except HTTPProblem as p:
            return problem_reply(p)
        except Exception as exc:
            return problem_reply(mapping.status_for(exc, write=True))
        if not existed:
            return json_reply({"detail": "key not found", "key": key}, 404)
        return json_reply({"key": key, "deleted": True})


def parse_ttl(text: str, conditional: bool) -> float:
    """``?ttl=``: seconds > 0; ``HTTPProblem(400)`` if not, or with a precondition."""
    if conditional:
        raise HTTPProblem(400, "ttl cannot be combined with If-Match / If-None-Match")
    try:
        seconds = float(text)
        ttl_ms(seconds)  # the SDK's own check: > 0, finite, not over the longest TTL
    except (ValueError, TypeError) as exc:
        raise HTTPProblem(400, f"bad ttl {text!r}: {exc}") from None
    return seconds


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def answer(handlers: KVHandlers, method: str, key: str, headers: Mapping[str, str],
                 query: bytes, body: bytes) -> Reply:
    """One /kv request (``method`` in GET, PUT, DELETE; ``key`` percent-decoded), as both
    fast paths serve it: ``KVFastPath`` here and ``protocol.KVHttpProtocol``."""
    if method == "GET":
        consistency = None
        if query:
            consistency = dict(parse_qsl(query.decode("latin-1"))).get("consistency")
        return await handlers.get(key, headers, consistency)
    if method == "PUT":
        ttl = dict(parse_qsl(query.decode("latin-1"))).get("ttl") if query else None
        return await handlers.put(key, headers, body, ttl)
    return await handlers.delete(key, headers)


def too_large_reply() -> Reply:
    return problem_reply(HTTPProblem(413, f"the body is over {BODY_BYTES_MAX} bytes"))


@dataclass(frozen=True, slots=True)
class KVService:
    """What ``protocol.KVHttpProtocol`` needs to answer /kv requests itself: the handlers,
    the metrics tally when the gateway counts (None with ``--no-metrics``), and the
    bearer-token check when the gateway has tokens (None: open)."""

    handlers: KVHandlers
    metrics: GatewayMetrics | None
    auth: Authenticator | None = None


class KVFastPath:
    """ASGI middleware: /kv/ requests to ``KVHandlers`` without FastAPI's router."""

    def __init__(self, app: Callable[..., Awaitable[None]], handlers: KVHandlers) -> None:
        self.app = app
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/kv/") or \
                scope["method"] not in METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        body = b""
        if method == "PUT":
            read = await read_body(receive)
            if read is None:
                await send_reply(send, too_large_reply())
                return
            body = read
        reply = await answer(self.handlers, method, path[4:], headers,
                             scope.get("query_string") or b"", body)
        await send_reply(send, reply)


async def read_body(receive: Receive) -> bytes | None:
    """The request body, or None once it exceeds ``BODY_BYTES_MAX`` (not read further)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client went away: nothing to answer anyway
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > BODY_BYTES_MAX:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_reply(send: Send, reply: Reply) -> None:
    headers = [(b"content-type", reply.content_type.encode()),
               (b"content-length", str(len(reply.body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})
