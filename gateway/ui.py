"""The live cluster page: ``/ui`` (static HTML + JS shipped in the package) and
``/ui/data`` (JSON the page polls twice a second).

Theory of operation:

- ``cluster_view`` turns the broker's status (one heartbeat row per node it remembers)
  into what an operator reads: per shard its leader (the *live* node claiming leader at
  the highest term: a SIGKILLed leader's last heartbeat must not keep it on the page),
  its replicas with role, term, lag (entries behind the leader's last index) and keys,
  and the ring's share of each shard. Pure, unit-tested.
- ``/ui/data`` adds the gateway's per-second throughput and latency (``History``). The
  broker status behind it is cached for ``STATUS_CACHE_S`` so several open pages cost
  the broker one status request per period, not one per poll.
- No network at run time: the page is hand-written HTML, CSS and JS drawing its chart
  as inline SVG; nothing is loaded from anywhere but this gateway.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from zkv.client.aio import AsyncKVClient
from zkv.protocol.messages import Role
from zkv.protocol.ring import Ring, RingConfig

STATUS_CACHE_S = 0.25
# The page may load from this gateway only (its own style block is inline).
UI_CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"
_ROLES = {int(r): r.name.lower() for r in Role}


def _role(value: Any) -> str:
    try:
        return _ROLES.get(int(value), str(value).lower())
    except (TypeError, ValueError):
        return str(value).lower()


def cluster_view(status: dict[str, Any]) -> dict[str, Any]:
    """``{"broker_id", "ring": {...}, "shards": {sid: {"leader", "term", "share", "keys",
    "replicas": [...]}}}`` from a broker status (see the module doc)."""
    ring = dict(status.get("ring") or {})
    shards: dict[int, dict[str, Any]] = {int(s): {"replicas": []} for s in ring.get("shards", [])}
    for node in status.get("nodes", []):
        sid = int(node.get("shard_id", -1))
        row = {"node_id": str(node.get("node_id")), "role": _role(node.get("role")),
               "term": int(node.get("term", 0)), "last_index": int(node.get("last_index", 0)),
               "commit_index": int(node.get("commit_index", 0)),
               "keys": node.get("key_count"), "live": bool(node.get("live", True)),
               "age_ms": node.get("age_ms")}
        if not row["live"]:
            row["role"] = "down"
        shards.setdefault(sid, {"replicas": []})["replicas"].append(row)
    shares: dict[int, float] = {}
    if ring.get("shards") and ring.get("vnodes"):
        shares = Ring(RingConfig(int(ring.get("epoch", 0)), tuple(ring["shards"]),
                                 int(ring["vnodes"]))).shares()
    out: dict[str, Any] = {}
    for sid, shard in sorted(shards.items()):
        replicas = sorted(shard["replicas"], key=lambda r: r["node_id"])
        leaders = [r for r in replicas if r["role"] == "leader"]
        leader = max(leaders, key=lambda r: r["term"]) if leaders else None
        for r in replicas:
            r["lag"] = (None if leader is None or not r["live"]
                        else max(0, leader["last_index"] - r["last_index"]))
        out[str(sid)] = {
            "leader": None if leader is None else leader["node_id"],
            "term": None if leader is None else leader["term"],
            "keys": None if leader is None else leader["keys"],
            "share": round(shares.get(sid, 0.0), 4),
            "replicas": replicas,
        }
    return {"broker_id": status.get("broker_id"), "ring": ring, "shards": out}


def _asset(name: str) -> bytes:
    return resources.files("zkv.gateway").joinpath("static", name).read_bytes()


def install(app: FastAPI, client: Callable[[], AsyncKVClient]) -> None:
    """Add ``/ui``, ``/ui/app.js`` and ``/ui/data`` to ``app``."""
    cache: dict[str, Any] = {"at": 0.0, "view": None, "error": None}
    page, script = _asset("ui.html"), _asset("ui.js")

    @app.get("/ui", include_in_schema=False)
    async def ui_page() -> Response:
        return HTMLResponse(page, headers={"Content-Security-Policy": UI_CSP})

    @app.get("/ui/app.js", include_in_schema=False)
    async def ui_script() -> Response:
        return Response(script, media_type="text/javascript")

    @app.get("/ui/data", summary="What the live page shows, as JSON")
    async def ui_data() -> Response:
        now = time.monotonic()
        if now - cache["at"] >= STATUS_CACHE_S:
            cache["at"] = now
            try:
                cache["view"], cache["error"] = cluster_view(await client().status(timeout=1.0)), None
            except Exception as exc:  # the page says so; it keeps polling
                cache["error"] = f"no broker answers: {exc}"
        return JSONResponse({"time": time.time(), "cluster": cache["view"],
                             "error": cache["error"], "series": app.state.history.series()})
