"""The gateway's ASGI app: zkv's REST API over one ``AsyncKVClient`` per worker.

Theory of operation:

- The gateway holds no state of its own: every request becomes one SDK call on the
  worker's single ``AsyncKVClient``, which
  multiplexes every in-flight request on one DEALER socket and retries safely (a
  retried write is applied once). A gateway can be killed and restarted at any time.
- Routes: ``PUT/GET/DELETE /kv/{key:path}``, ``GET /health`` (the process answers),
  ``GET /ready`` (every shard of the ring has a live leader the broker hears),
  ``/metrics``, ``/ui`` and ``/ui/data`` (``ui.py``), and OpenAPI at ``/docs`` and
  ``/redoc`` whose scripts and styles are served from the package (fastapi-offline
  ships them): nothing is fetched from the network at run time.
- Translation of headers, bodies and errors lives in ``mapping.py`` (pure); the /kv
  handlers in ``kv.py``, served by a raw ASGI fast path ahead of FastAPI's router (the
  FastAPI routes exist for the OpenAPI schema and call the same handlers).
- ``zkv gateway`` runs uvicorn with ``protocol.KVHttpProtocol``, which answers plain
  /kv requests straight from the HTTP protocol (no ASGI cycle, one write per response)
  with the same handlers and tallies; every other request reaches the ASGI chain below.
- What uvicorn serves is ``GatewayApp``: metrics (counts everything), then the /kv
  fast path, then FastAPI (docs, health, ready, ui, metrics), chained *outside*
  FastAPI. Why: inside, every /kv request also crossed Starlette's and FastAPI's own
  middleware (server errors, body limit, telemetry), each wrapping ``send`` again. An
  exception escaping the fast path is uvicorn's to answer (500), as FastAPI's would be.
- With tokens (``auth``), ``BearerAuth`` sits between the metrics and the /kv fast path,
  so every request reaching ASGI is checked (and denied ones are still counted), and
  the protocol checks the /kv requests it answers itself with the same ``Authenticator``
  (``auth.py`` holds the policy: what stays open and why). The OpenAPI schema then
  declares the bearer scheme, so /docs can send a token. Without tokens nothing is
  checked and nothing is added to the request path.
- ``keys``: the Curve identity the worker's ``AsyncKVClient`` presents to the brokers
  (the gateway's own client key in a secure cluster).
- Configuration comes from arguments, or from the environment in ``app_from_env`` (what
  uvicorn calls in each worker when ``--workers`` > 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Receive, Scope, Send

from zkv.client.aio import AsyncKVClient
from zkv.gateway import ui
from zkv.gateway.auth import RELOAD_S, Authenticator, BearerAuth, openapi_security
from zkv.gateway.get_batcher import MAX_BATCH
from zkv.gateway.kv import KVFastPath, KVHandlers, KVService, Reply
from zkv.gateway.metrics import GatewayMetrics, History, MetricsMiddleware
from zkv.gateway.scan import scan_reply
from zkv.gateway.watch import watch_response

DEFAULT_TIMEOUT_S = 5.0
DOCS_STATIC = "/static-offline-docs"  # where fastapi-offline mounts its assets
LOCAL_ONLY_CSP = ("default-src 'self' blob: data:; script-src 'self' 'unsafe-inline' blob:; "
                  "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
                  "worker-src 'self' blob:")
JSON = "application/json"

_PUT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {"schema": {"type": "object", "required": ["key"], "properties": {
                "key": {"type": "string", "description": "must equal the path's key"},
                "value": {"type": "string", "description": "the value, as text"},
                "value_base64": {"type": "string", "description": "or: the value's bytes"}}},
                "example": {"key": "foo", "value": "bar"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(doc, ensure_ascii=False).encode(), status, headers, JSON)


def _response(reply: Reply) -> Response:
    return Response(reply.body, reply.status, reply.headers, reply.content_type)


def create_app(endpoints: str | list[str] | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
               metrics_enabled: bool = True, fast_path: bool = True,
               freeze_gc: bool = False, auth: Authenticator | None = None,
               keys: str | os.PathLike[str] | None = None,
               get_batch_max: int = MAX_BATCH) -> GatewayApp:
    """``fast_path=False`` leaves /kv to FastAPI's routes (the tests compare the two).
    ``freeze_gc``: once started, move every object then alive (FastAPI's and pydantic's
    models, the app: tens of thousands) out of the collector's reach (``gc.freeze``),
    so the full collections that requests' garbage triggers do not walk them again each
    time; for a server process, where they live as long as it does."""
    metrics = GatewayMetrics()
    history = History(metrics)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        kv = AsyncKVClient(endpoints, timeout_s=timeout_s, keys=keys)
        state["kv"] = kv
        if freeze_gc:
            gc.collect()
            gc.freeze()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(_sample(history))]
        if auth is not None and auth.path is not None:
            tasks.append(loop.create_task(_reload_tokens(auth)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await kv.close()

    app = FastAPIOffline(title="zkv gateway", version="0.1.0", lifespan=lifespan, redoc_url=None,
                         description="REST API of zkv, a sharded, replicated key-value store.")
    app.state.metrics = metrics
    app.state.history = history
    app.state.kv_state = state  # {"kv": AsyncKVClient} while running (tests may swap it)

    def client() -> AsyncKVClient:
        return state["kv"]  # type: ignore[no-any-return]

    handlers = KVHandlers(client, get_batch_max)

    @app.get("/health", summary="The gateway process is up")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/ready", summary="Every shard has a leader the broker can reach")
    async def ready() -> Response:
        try:
            status = await client().status(timeout=2.0)
        except Exception as exc:
            return _json({"ready": False, "detail": f"no broker answers: {exc}"}, 503,
                         {"Retry-After": "1"})
        view = ui.cluster_view(status)
        missing = [sid for sid, s in view["shards"].items() if not s["leader"]]
        if missing or not view["shards"]:
            return _json({"ready": False, "shards_without_leader": missing}, 503,
                         {"Retry-After": "1"})
        return _json({"ready": True,
                      "leaders": {sid: s["leader"] for sid, s in view["shards"].items()}})

    @app.get("/metrics", summary="Prometheus metrics of this gateway")
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    # Declared for the OpenAPI schema and as the fallback; ``KVFastPath`` answers these
    # requests before FastAPI routes them (see kv.py), with the same handlers.
    @app.put("/kv/{key:path}", summary="Store a value (CAS with If-Match / If-None-Match)",
             openapi_extra=_PUT_BODY)
    async def put(key: str, request: Request, ttl: str | None = None) -> Response:
        """``?ttl=SECONDS``: the key expires that long after the put (not with If-Match)."""
        return _response(await handlers.put(key, dict(request.headers), await request.body(),
                                             ttl))

    @app.get("/kv/{key:path}", summary="Read a value (JSON, or raw bytes via Accept)")
    async def get(key: str, request: Request, consistency: str | None = None) -> Response:
        return _response(await handlers.get(key, dict(request.headers), consistency))

    @app.delete("/kv/{key:path}", summary="Remove a key (404 if absent; If-Match: version)")
    async def delete(key: str, request: Request) -> Response:
        return _response(await handlers.delete(key, dict(request.headers)))

    @app.get("/kv", summary="One page of a prefix scan across every shard, in key order "
             "(pass the reply's cursor back for the next page; null: done)")
    async def scan(prefix: str = "", limit: str | None = None, cursor: str | None = None,
                   keys_only: str | None = None, consistency: str | None = None) -> Response:
        return _response(await scan_reply(client, prefix, limit, cursor, keys_only,
                                          consistency))

    @app.get("/watch", summary="Puts, deletes and expiries of keys starting with prefix, "
             "as server-sent events (id: the resume token; start= or Last-Event-ID resumes)")
    async def watch(request: Request, prefix: str = "", start: str | None = None,
                    key: str | None = None) -> Response:
        reply = watch_response(client, prefix, start, key,
                               request.headers.get("last-event-id"))
        return reply if isinstance(reply, Response) else _response(reply)

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> Response:
        # ReDoc's bundle links a logo on a CDN: the policy keeps the browser on this host.
        page = get_redoc_html(openapi_url="/openapi.json", title="zkv gateway - ReDoc",
                              redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_STATIC}/favicon.png",
                              with_google_fonts=False)
        return Response(page.body, media_type="text/html",
                        headers={"Content-Security-Policy": LOCAL_ONLY_CSP})

    ui.install(app, client)
    if auth is not None:
        _declare_bearer(app)
    asgi: Any = app
    if fast_path:
        asgi = KVFastPath(asgi, handlers)
    if auth is not None:  # in front of everything but the count: denials are counted
        asgi = BearerAuth(asgi, auth)
    if metrics_enabled:  # outermost, so it also counts the fast path
        asgi = MetricsMiddleware(asgi, metrics)
    kv = KVService(handlers, metrics if metrics_enabled else None, auth) if fast_path else None
    return GatewayApp(app, asgi, kv)


def _declare_bearer(app: FastAPI) -> None:
    """The OpenAPI schema with the bearer scheme on the protected operations."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_security(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class GatewayApp:
    """The ASGI app uvicorn serves: ``asgi`` (the chain in front of FastAPI, see the
    module doc), with the FastAPI app's ``state`` (metrics, history, the client), and
    ``kv``, what ``protocol.KVHttpProtocol`` needs to answer /kv requests without ASGI
    (None when the fast path is off)."""

    def __init__(self, fastapi: FastAPI, asgi: ASGIApp, kv: KVService | None = None) -> None:
        self.fastapi = fastapi
        self.state = fastapi.state
        self.kv = kv
        self._asgi = asgi

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)


async def _sample(history: History) -> None:
    while True:
        await asyncio.sleep(1.0)
        with contextlib.suppress(Exception):  # a sampling hiccup must not stop the page
            history.sample()


async def _reload_tokens(auth: Authenticator) -> None:
    log = logging.getLogger("uvicorn.error")  # where the gateway's log lines go
    while True:
        await asyncio.sleep(RELOAD_S)
        try:
            line = auth.reload_if_changed()
        except Exception as exc:  # keep the tokens in force and keep watching
            line = f"tokens file not reloaded: {exc}"
        if line is not None:  # warning: the default log level, and a change of who may call
            log.warning(line)


def app_from_env() -> GatewayApp:
    """The app for one uvicorn worker, configured by ``zkv gateway`` through the env
    (``ZKV_GATEWAY_TOKENS``: the tokens file; ``ZKV_GATEWAY_KEYS``: the Curve identity)."""
    tokens = os.environ.get("ZKV_GATEWAY_TOKENS") or None
    return create_app(
        os.environ.get("ZKV_ENDPOINT") or None,
        timeout_s=float(os.environ.get("ZKV_GATEWAY_TIMEOUT_S") or DEFAULT_TIMEOUT_S),
        metrics_enabled=os.environ.get("ZKV_GATEWAY_METRICS", "1") != "0",
        freeze_gc=True,
        auth=None if tokens is None else Authenticator(Path(tokens)),
        keys=os.environ.get("ZKV_GATEWAY_KEYS") or None,
        get_batch_max=int(os.environ.get("ZKV_GATEWAY_GET_BATCH_MAX") or MAX_BATCH),
    )
