"""``GET /watch?prefix=&start=&key=``: the events of a prefix as server-sent events.

Each event is one SSE message: ``id:`` the resume token, ``event:`` its kind (``put``,
``delete``, ``expire``), ``data:`` a JSON object ``{"key", "value", "version",
"token"}`` (a key or value that is not UTF-8: ``null`` and a ``_base64`` twin, as in
``GET /kv``). ``start=TOKEN`` resumes right after the event that carried it; a browser's
``EventSource`` reconnects by itself with ``Last-Event-ID`` (the last id), which is
honoured when ``start`` is absent, so a reconnect neither loses nor repeats events.
``key=true``: ``prefix`` is one exact key. A comment line (``: keep-alive``) goes out
every ``KEEPALIVE_S`` without events, so proxies keep the stream open. A history that no
longer reaches back to the token ends the stream with ``event: compacted`` whose data
holds the token to restart from (after re-reading the keys with ``GET /kv?prefix=``).
Each stream is one watch of the gateway's ``AsyncKVClient``: held polls, no state of
the gateway's beyond the open response; a slow reader only slows its own stream (the
ASGI server's send back-pressure stops the polling).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse

from zkv.client.aio import AsyncKVClient
from zkv.client.watch import Event, parse_token
from zkv.gateway.kv import Reply, problem_reply
from zkv.gateway.mapping import HTTPProblem
from zkv.gateway.scan import item_document, parse_bool
from zkv.protocol.watch import WatchCompacted

KEEPALIVE_S = 15.0


def sse_message(ev: Event) -> bytes:
    doc: dict[str, Any] = item_document(ev.key, ev.value if ev.kind == "put" else None,
                                        ev.version)
    doc["token"] = ev.token
    return (f"id: {ev.token}\nevent: {ev.kind}\n"
            f"data: {json.dumps(doc, separators=(',', ':'))}\n\n").encode()


async def _stream(client: AsyncKVClient, prefix: str, start: str | None,
                  exact: bool) -> AsyncIterator[bytes]:
    events = client.watch_key(prefix, start) if exact else client.watch(prefix, start)
    it = events.__aiter__()
    yield b": watching\n\n"  # the headers and a first line go out at once
    nxt: asyncio.Task[Event] | None = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=KEEPALIVE_S)
            if not done:
                yield b": keep-alive\n\n"
                continue
            try:
                ev = nxt.result()
            except WatchCompacted as exc:
                data = json.dumps({"token": exc.token, "detail": str(exc)})
                yield f"event: compacted\ndata: {data}\n\n".encode()
                return
            finally:
                nxt = None
            yield sse_message(ev)
    finally:
        if nxt is not None:
            nxt.cancel()
        with contextlib.suppress(Exception):
            await it.aclose()  # type: ignore[attr-defined]


def watch_response(client: Callable[[], AsyncKVClient], prefix: str, start: str | None,
                   key: str | None, last_event_id: str | None) -> StreamingResponse | Reply:
    token = start if start else (last_event_id or None)
    try:
        if token is not None:
            try:
                parse_token(token)
            except ValueError as exc:
                raise HTTPProblem(422, f"start: {exc}") from None
        exact = parse_bool(key)
        if exact and not prefix:
            raise HTTPProblem(422, "key=true needs the key in prefix")
    except HTTPProblem as p:
        return problem_reply(p)
    return StreamingResponse(_stream(client(), prefix, token, exact),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
