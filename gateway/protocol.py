"""uvicorn's httptools protocol with the /kv requests answered in the protocol itself.

Theory of operation:

- Why: behind uvicorn, each /kv request crossed an ASGI cycle (a ``RequestResponseCycle``
  with its event, the proxy-headers and metrics middlewares, two ``send`` messages) and
  left as two ``transport.write`` calls, status line and headers then the body: two
  ``send`` syscalls per response. Profiled under load that was over a third of the
  gateway's CPU, for a gateway whose job is to add little to the store behind it.
- ``KVHttpProtocol`` subclasses uvicorn's ``HttpToolsProtocol`` and takes over only
  requests that ``fast_request`` accepts: GET, PUT or DELETE on a path starting
  ``/kv/``, no ``Transfer-Encoding``, ``Expect`` or ``Upgrade``, a body only on PUT and
  only with a ``Content-Length`` up to ``BODY_BYTES_MAX``. Such a request becomes a
  ``KVCycle``: one task that waits for the body, calls the same ``kv.answer`` as the
  ASGI fast path, tallies the same metrics, and writes status line, headers and body
  with ONE ``transport.write``, the bytes uvicorn itself would have written
  (``encode_response``). Anything else (/docs, /ui, /metrics, /health, other methods,
  chunked bodies, 100-continue, upgrades, a configured ``root_path`` or concurrency
  limit, a gateway built without the fast path) goes to uvicorn's normal path, unchanged.
- Keep-alive and pipelining: a ``KVCycle`` stands in uvicorn's ``cycle`` and
  ``pipeline`` exactly where a ``RequestResponseCycle`` would (same attributes, started
  through ``run_asgi``), so a request arriving before the previous response is queued,
  reading pauses, and responses leave in request order whichever path serves each one.
  ``Connection: close`` / HTTP/1.0 / a server shutting down close after the response.
- The keep-alive timeout is kept with one timer per connection instead of one per
  response (see ``on_response_complete``); the connection still closes after
  ``timeout_keep_alive`` idle seconds.
- Bearer tokens: when the service has an ``Authenticator``, each request it takes is
  checked with the same ``check`` the ASGI chain's ``BearerAuth`` calls, on the same
  decoded path, when its headers are complete. A denied request still has its body read
  (bounded as any other) so the connection stays in step, but the body is dropped and
  the 401/403 is the answer; no SDK call is made.
- The protocol finds the service (``GatewayApp.kv``) by unwrapping the app uvicorn
  loaded (``.app`` of uvicorn's own middlewares); without one it is plain uvicorn.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from zkv.gateway.auth import authorization
from zkv.gateway.kv import BODY_BYTES_MAX, METHODS, KVService, Reply, answer

_OPS = {"GET": "get", "PUT": "put", "DELETE": "delete"}
_NOT_FAST = (b"transfer-encoding", b"expect", b"upgrade")
_ERROR_500 = Reply(500, b"Internal Server Error", "text/plain; charset=utf-8")


def find_service(app: Any, depth: int = 8) -> KVService | None:
    """The ``KVService`` of the gateway app under uvicorn's wrappers, if any."""
    for _ in range(depth):
        if app is None:
            return None
        kv = getattr(app, "kv", None)
        if isinstance(kv, KVService):
            return kv
        app = getattr(app, "app", None)
    return None


def fast_request(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]
                 ) -> tuple[str, str, bytes, int] | None:
    """(method, key, query, content length) when the protocol answers the request itself,
    None when it goes to the ASGI app (see the module doc). ``headers`` have lower-case
    names, as uvicorn's parser callbacks store them."""
    if not url.startswith(b"/kv/"):
        return None
    m = method.decode("ascii", "replace")
    if m not in METHODS:
        return None
    length = 0
    for name, value in headers:
        if name in _NOT_FAST:
            return None
        if name == b"content-length":
            if not value.isdigit():
                return None
            length = int(value)
    if (length > BODY_BYTES_MAX) or (length and m != "PUT"):
        return None
    try:
        parsed = httptools.parse_url(url)
        path = parsed.path.decode("ascii")
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        return None  # uvicorn's own path decides what to answer
    if "%" in path:
        path = urllib.parse.unquote(path)
    if not path.startswith("/kv/"):
        return None
    return m, path[4:], parsed.query or b"", length


def encode_response(reply: Reply, default_headers: list[tuple[bytes, bytes]],
                    keep_alive: bool) -> bytes:
    """Status line, headers and body in one buffer: what uvicorn writes in two for the
    ASGI fast path's ``send_reply`` (its default headers, content type and length, the
    reply's headers with lower-case names, ``connection: close`` when not kept alive)."""
    out = [STATUS_LINE[reply.status]]
    for name, value in default_headers:
        out += (name, b": ", value, b"\r\n")
    out += (b"content-type: ", reply.content_type.encode("latin-1"), b"\r\ncontent-length: ",
            str(len(reply.body)).encode("ascii"), b"\r\n")
    for name_s, value_s in reply.headers.items():
        out += (name_s.lower().encode("latin-1"), b": ", value_s.encode("latin-1"), b"\r\n")
    if not keep_alive:
        out.append(b"connection: close\r\n")
    out += (b"\r\n", reply.body)
    return b"".join(out)


class _Signal:
    """The part of ``asyncio.Event`` uvicorn's parser callbacks use (``set``), and a
    ``wait`` for the one task that waits: no lock-free waiter list per request."""

    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class KVCycle:
    """One /kv request answered by the protocol; in uvicorn's ``cycle``/``pipeline``
    slots it offers what uvicorn reads and writes there (``body``, ``more_body``,
    ``message_event``, ``response_complete``, ``disconnected``, ``keep_alive``,
    ``run_asgi``)."""

    __slots__ = ("proto", "service", "method", "key", "query", "headers", "body",
                 "more_body", "message_event", "response_complete", "disconnected",
                 "keep_alive", "denied")

    def __init__(self, proto: KVHttpProtocol, service: KVService, method: str, key: str,
                 query: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool,
                 has_body: bool, denied: Reply | None = None) -> None:
        """``denied``: the 401/403 to answer instead of serving the request."""
        self.proto = proto
        self.denied = denied
        self.service = service
        self.method, self.key, self.query, self.headers = method, key, query, headers
        self.body = bytearray()
        self.more_body = has_body
        self.message_event = _Signal()
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = keep_alive

    async def run_asgi(self, app: Any = None) -> None:
        """Named as uvicorn's cycles are: the protocol starts queued cycles this way."""
        proto = self.proto
        while self.more_body and not self.disconnected:
            proto.flow.resume_reading()  # paused when the body passed uvicorn's mark
            await self.message_event.wait()
        if self.disconnected:
            return  # nobody to answer; and a cut-off body must not be stored
        metrics = self.service.metrics
        started = metrics.begin() if metrics is not None else 0.0
        code = 500
        try:
            if self.denied is not None:
                reply = self.denied
            else:
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers}
                reply = await answer(self.service.handlers, self.method, self.key, headers,
                                     self.query, bytes(self.body))
            data = encode_response(reply, proto.server_state.default_headers, self.keep_alive)
            code = reply.status
        except BaseException as exc:  # as uvicorn's run_asgi: log it, answer 500, close
            proto.logger.error("Exception in the /kv fast path", exc_info=exc)
            self.keep_alive = False
            data = encode_response(_ERROR_500, proto.server_state.default_headers, False)
        finally:
            if metrics is not None:
                metrics.end_kv(_OPS[self.method], code, started)
        if proto.flow.write_paused and not self.disconnected:
            await proto.flow.drain()
        if self.disconnected or proto.transport.is_closing():
            return  # gone while we served (uvicorn marks only the newest cycle of a pipeline)
        proto.transport.write(data)
        self.response_complete = True
        if not self.keep_alive:
            proto.transport.close()
        proto.on_response_complete()


class KVHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; /kv requests are answered by ``KVCycle`` (see the
    module doc). Pass it as ``uvicorn.run(..., http=KVHttpProtocol)``."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        fast_ok = config.root_path == "" and config.limit_concurrency is None
        self.kv_service = find_service(self.app) if fast_ok else None
        #: when the connection last became idle (its last response sent, no data since);
        #: None while a request is being read or served
        self.idle_since: float | None = None

    # The keep-alive timeout, lazily: uvicorn arms a timer after every response and
    # cancels it when the next request's bytes arrive, a timer made and dropped per
    # request (~3 us with uvloop). Here one timer per connection checks, when it fires,
    # whether the connection has been idle for the whole timeout, and re-arms for the
    # rest if it has not: the same closing time, without the per-request timer.

    def _unset_keepalive_if_required(self) -> None:
        self.idle_since = None  # busy; the timer, if armed, will find that out

    def on_response_complete(self) -> None:
        """uvicorn's, but marking the connection idle instead of arming a new timer."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.idle_since = None
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_cycle(cycle, app)
            return
        self.idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_at(
                self.idle_since + self.timeout_keep_alive, self._keep_alive_check)

    def _start_cycle(self, cycle: Any, app: Any) -> None:
        """Run ``cycle`` (uvicorn's or a ``KVCycle``) as a task the server tracks: with
        uvicorn's own helper where it has one (recent versions; it also honours
        ``reset_contextvars``), else as earlier versions did inline."""
        start = getattr(super(), "_start_asgi_task", None)
        if start is not None:
            start(cycle, app)
            return
        task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _keep_alive_check(self) -> None:
        self.timeout_keep_alive_task = None
        if self.idle_since is None:
            return  # serving: the next response marks it idle and arms the timer again
        due = self.idle_since + self.timeout_keep_alive
        if self.loop.time() >= due:
            self.timeout_keep_alive_handler()
        else:
            self.timeout_keep_alive_task = self.loop.call_at(due, self._keep_alive_check)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.idle_since = None
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def on_headers_complete(self) -> None:
        service = self.kv_service
        if service is None:
            super().on_headers_complete()
            return
        parser = self.parser
        fast = fast_request(parser.get_method(), self.url, self.headers)
        if fast is None or parser.should_upgrade():
            super().on_headers_complete()
            return
        method, key, query, length = fast
        http_version = parser.get_http_version()
        keep_alive = http_version != "1.0" and parser.should_keep_alive()
        denied = None
        if service.auth is not None:
            denied = service.auth.check(method, "/kv/" + key, authorization(self.headers))
        cycle = KVCycle(self, service, method, key, query, self.headers, keep_alive, length > 0,
                        denied)
        existing = self.cycle
        self.cycle = cycle  # type: ignore[assignment]  # the attributes uvicorn uses
        if existing is None or existing.response_complete:
            self._start_cycle(cycle, self.app)
        else:  # pipelined behind a response not yet sent: wait for it, as uvicorn does
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))  # type: ignore[arg-type]
