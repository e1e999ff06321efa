"""``GET /watch?prefix=&start=`` through the HTTP gateway against a real local cluster
(the fixtures of ``test_gateway.py``): server-sent events with the resume token as id,
resumed from ``Last-Event-ID``; the raw /kv fast path is untouched."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.process.test_gateway import cluster, gateway, http, logs  # noqa: F401 - fixtures

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def _read_events(http: httpx.Client, n: int, **kw: object) -> list[dict[str, object]]:  # noqa: F811
    out: list[dict[str, object]] = []
    with http.stream("GET", "/watch", timeout=20, **kw) as r:  # type: ignore[arg-type]
        assert r.status_code == 200 and r.headers["content-type"].startswith(
            "text/event-stream")
        msg: dict[str, object] = {}
        for line in r.iter_lines():
            if line.startswith("id: "):
                msg["id"] = line[4:]
            elif line.startswith("event: "):
                msg["event"] = line[7:]
            elif line.startswith("data: "):
                msg["data"] = json.loads(line[6:])
            elif not line and msg:
                out.append(msg)
                msg = {}
                if len(out) == n:
                    return out
    return out


def test_watch_as_server_sent_events(http: httpx.Client) -> None:  # noqa: F811
    for i in range(3):
        assert http.put(f"/kv/sse/{i}", content=b"v%d" % i).status_code == 200
    assert http.delete("/kv/sse/0").status_code in (200, 204)
    token = ",".join(f"{s}:0" for s in
                     http.get("/ready").json().get("leaders", {}))  # every shard from 0
    first = _read_events(http, 2, params={"prefix": "sse/", "start": token})
    assert all(m["event"] in ("put", "delete") and m["id"] for m in first)
    rest = _read_events(http, 2, params={"prefix": "sse/"},
                        headers={"Last-Event-ID": str(first[-1]["id"])})
    seen = [(m["event"], m["data"]["key"]) for m in first + rest]  # type: ignore[index]
    assert len(set(seen)) == 4 and ("delete", "sse/0") in seen
    assert http.get("/watch", params={"prefix": "x", "start": "bad"}).status_code == 422
    assert http.get("/kv/sse/1").status_code == 200  # the fast path still answers
