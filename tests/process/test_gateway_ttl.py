"""``PUT /kv/{key}?ttl=`` through the HTTP gateway against a real local cluster (the
fixtures of ``test_gateway.py``): the key is served, then gone once its TTL passed."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.process.test_gateway import cluster, gateway, http, logs  # noqa: F401 - fixtures

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def test_put_with_ttl_then_gone(http: httpx.Client) -> None:  # noqa: F811
    t0 = time.time()
    r = http.put("/kv/ttl-key?ttl=1.5", content=b"v", headers={"Content-Type": "text/plain"})
    assert r.status_code == 200 and r.json()["ttl"] == 1.5, r.text
    assert http.get("/kv/ttl-key").status_code == 200
    assert http.put("/kv/ttl-key?ttl=-1", content=b"v").status_code == 400
    assert http.put("/kv/ttl-key?ttl=1", content=b"v", headers={"If-Match": '"1"'}
                    ).status_code == 400
    time.sleep(max(0.0, t0 + 1.6 - time.time()))
    assert http.get("/kv/ttl-key").status_code == 404
    spec = http.get("/openapi.json").json()
    params = spec["paths"]["/kv/{key}"]["put"].get("parameters", [])
    assert any(p["name"] == "ttl" for p in params)
