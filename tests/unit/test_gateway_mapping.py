"""The gateway's pure parts: header, body and error translation (``mapping``), the live
page's view of a broker status (``ui.cluster_view``) and the latency quantiles drawn
from histogram buckets (``metrics``)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the gateway needs the http extra (zkv[http])")

from zkv.client.sdk import ClientClosed  # noqa: E402
from zkv.gateway import mapping, metrics, ui  # noqa: E402
from zkv.gateway.mapping import HTTPProblem  # noqa: E402
from zkv.protocol.errors import (  # noqa: E402
    BadRequest,
    InternalError,
    NoLeader,
    NotLeader,
    Timeout,
    TooLarge,
    Unavailable,
)
from zkv.protocol.messages import Consistency  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("if_match,if_none_match,expected", [
    (None, None, None), ('"7"', None, 7), ("7", None, 7), (' "12" ', None, 12),
    (None, "*", 0), (None, " * ", 0),
])
def test_preconditions(if_match: str | None, if_none_match: str | None,
                       expected: int | None) -> None:
    assert mapping.parse_precondition(if_match, if_none_match).expected_version == expected


@pytest.mark.parametrize("if_match,if_none_match", [
    ('W/"7"', None), ('"0"', None), ("*", None), ('"a"', None), ('"1", "2"', None),
    (None, '"3"'), ('"1"', "*"),
])
def test_bad_preconditions_are_422(if_match: str | None, if_none_match: str | None) -> None:
    with pytest.raises(HTTPProblem) as e:
        mapping.parse_precondition(if_match, if_none_match)
    assert e.value.status == 422


def test_put_bodies() -> None:
    assert mapping.parse_put_body("k", "application/json", b'{"key": "k", "value": "v"}') == b"v"
    assert mapping.parse_put_body("k", "application/json; charset=utf-8",
                                  '{"key": "k", "value": "é"}'.encode()) == "é".encode()
    b64 = base64.b64encode(b"\x00\xff").decode()
    assert mapping.parse_put_body("k", "application/json",
                                  f'{{"key": "k", "value_base64": "{b64}"}}'.encode()) == b"\x00\xff"
    assert mapping.parse_put_body("k", "application/octet-stream", b"{raw") == b"{raw"
    assert mapping.parse_put_body("k", "", b"\x00") == b"\x00"
    for body in (b'{"key": "x", "value": "v"}', b'{"value": "v"}', b"{", b'"s"',
                 b'{"key": "k", "value": 1}', b'{"key": "k", "value": "v", "value_base64": "dg=="}',
                 b'{"key": "k", "value_base64": "!!"}'):
        with pytest.raises(HTTPProblem) as e:
            mapping.parse_put_body("k", "application/json", body)
        assert e.value.status == 422, body


def test_value_documents_and_accept() -> None:
    assert mapping.value_document("k", b"hi", 3) == {"key": "k", "value": "hi", "version": 3}
    assert mapping.value_document("k", b"\xff", 3) == {"key": "k", "value": None,
                                                       "value_base64": "/w==", "version": 3}
    assert mapping.wants_raw("application/octet-stream")
    assert not mapping.wants_raw(None) and not mapping.wants_raw("*/*")
    assert not mapping.wants_raw("application/json, application/octet-stream")
    assert mapping.parse_consistency(None) is Consistency.LINEARIZABLE
    assert mapping.parse_consistency("Stale") is Consistency.STALE
    with pytest.raises(HTTPProblem):
        mapping.parse_consistency("eventual")
    with pytest.raises(HTTPProblem):
        mapping.parse_key("")


def _timeout_from(cause: Exception | None) -> Timeout:
    try:
        raise Timeout("deadline") from cause
    except Timeout as exc:
        return exc


@pytest.mark.parametrize("exc,write,status,outcome", [
    (TooLarge("big"), True, 413, None),
    (BadRequest("bad"), True, 422, None),
    (ValueError("empty"), False, 422, None),
    (TypeError("int"), False, 422, None),
    (NoLeader(), True, 503, None),
    (NotLeader(), False, 503, None),
    (Unavailable(), True, 503, None),
    (ClientClosed("closed"), False, 503, None),
    (_timeout_from(NoLeader()), True, 503, "unknown"),
    (_timeout_from(NoLeader()), False, 503, None),
    (_timeout_from(None), True, 504, "unknown"),
    (_timeout_from(Timeout("attempt")), False, 504, None),
    (InternalError("bug"), True, 500, None),
])
def test_error_mapping(exc: Exception, write: bool, status: int, outcome: str | None) -> None:
    p = mapping.status_for(exc, write)
    assert p.status == status
    assert p.body().get("outcome") == outcome
    assert (p.headers.get("Retry-After") == "1") == (status == 503)
    if status == 504 and write:
        assert "outcome is unknown" in p.detail


def test_unknown_exceptions_propagate() -> None:
    with pytest.raises(KeyError):
        mapping.status_for(KeyError("x"), True)


def _node(nid: str, shard: int, role: int, term: int, last: int, live: bool = True) -> dict:
    return {"node_id": nid, "shard_id": shard, "role": role, "term": term, "last_index": last,
            "commit_index": last, "key_count": last * 10, "live": live, "age_ms": 5}


def test_cluster_view_picks_the_live_leader_of_the_highest_term() -> None:
    status = {"broker_id": "b0", "ring": {"epoch": 1, "shards": [0, 1, 2], "vnodes": 64},
              "nodes": [_node("s0r0", 0, 2, 3, 9, live=False),  # a killed leader's last word
                        _node("s0r1", 0, 2, 4, 8), _node("s0r2", 0, 0, 4, 5),
                        _node("s1r0", 1, 0, 1, 1)]}
    view = ui.cluster_view(status)
    s0, s1, s2 = (view["shards"][k] for k in ("0", "1", "2"))
    assert (s0["leader"], s0["term"], s0["keys"]) == ("s0r1", 4, 80)
    assert [(r["node_id"], r["role"], r["lag"]) for r in s0["replicas"]] == [
        ("s0r0", "down", None), ("s0r1", "leader", 0), ("s0r2", "follower", 3)]
    assert s1["leader"] is None and s1["replicas"][0]["lag"] is None
    assert s2 == {"leader": None, "term": None, "keys": None, "share": s2["share"], "replicas": []}
    assert abs(sum(s["share"] for s in view["shards"].values()) - 1) < 1e-3


def test_quantiles_interpolate_inside_buckets() -> None:
    buckets = [(0.001, 0.0), (0.002, 50.0), (0.005, 100.0), (float("inf"), 100.0)]
    assert metrics._quantile_ms(0.5, buckets, 100) == pytest.approx(2.0)
    assert metrics._quantile_ms(0.25, buckets, 100) == pytest.approx(1.5)
    assert metrics._quantile_ms(0.99, buckets, 100) == pytest.approx(4.94)
    assert metrics._quantile_ms(0.5, buckets, 0) is None
    assert metrics._quantile_ms(1.0, [(0.001, 0.0), (float("inf"), 5.0)], 5) == 1.0


def test_history_turns_histogram_totals_into_per_second_points() -> None:
    m = metrics.GatewayMetrics()
    h = metrics.History(m, length=3)
    h.sample(now=100.0)
    assert h.series() == []
    for _ in range(10):
        m.count("kv", "get", 200, 0.0015)
    h.sample(now=102.0)
    (p,) = h.series()
    assert p["rps"] == 5.0 and 1.0 <= p["p50_ms"] <= 2.0
    for t in (103.0, 104.0, 105.0):
        h.sample(now=t)
    assert len(h.series()) == 3 and h.series()[-1]["rps"] == 0.0
    assert h.series()[-1]["p99_ms"] is None


def test_cluster_up_runs_without_gateway_when_the_extra_is_missing(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import argparse
    import types

    from zkv.gateway import process
    from zkv.ops import cluster_cli

    monkeypatch.setattr(process, "http_available",
                        lambda: "fastapi is not installed (pip install 'zkv[http]')")
    said: list[str] = []
    fake = types.SimpleNamespace(endpoint="tcp://127.0.0.1:1", host="127.0.0.1",
                                 data_dir=tmp_path, gateway_keys=None, gateway_tokens=None)
    args = argparse.Namespace(http_port=8000, http_workers=1)
    assert cluster_cli._start_gateway(fake, args, said.append) is None  # type: ignore[arg-type]
    assert said == ["no HTTP gateway: the http extra is not installed (fastapi is not "
                    "installed (pip install 'zkv[http]')); running without it"]
    said.clear()
    assert cluster_cli._start_gateway(fake, argparse.Namespace(http_port=0, http_workers=1),
                                      said.append) is None  # type: ignore[arg-type]
    assert said == []
