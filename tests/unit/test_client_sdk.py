"""KVClient against a fake broker thread: round trips, retries, Lazy Pirate, errors."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.support.fake_broker import DROP, FakeBroker, broker  # noqa: F401
from zkv.client import (
    BadRequest,
    ClientClosed,
    Consistency,
    KVClient,
    Timeout,
    TooLarge,
)
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    ErrorReply,
    GetRequest,
    PongReply,
    PutReply,
    PutRequest,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def client(b: FakeBroker, **kw: Any) -> KVClient:
    kw.setdefault("timeout_s", 2.0)
    return KVClient(b.endpoint, seed=1, **kw)


def test_round_trip_of_every_op(broker: FakeBroker) -> None:  # noqa: F811
    broker.status_nodes = ({"node_id": "s0r0", "shard_id": 0, "role": 2, "age_ms": 3},)
    with client(broker) as kv:
        assert kv.get("missing") is None
        v1 = kv.put("k", "v1")
        assert kv.get("k") == b"v1"
        assert kv.get_versioned("k") == (b"v1", v1)
        assert kv.cas("k", v1 + 100, "nope") is False
        assert kv.cas("k", v1, "v2") is True
        assert kv.get("k") == b"v2"
        assert kv.cas("new", 0, "x") is True
        assert kv.delete("k") is True
        assert kv.delete("k") is False
        assert kv.get("k") is None
        assert kv.ping() == "fake-b0"
        status = kv.status()
        assert status["broker_id"] == "fake-b0"
        assert status["nodes"][0]["node_id"] == "s0r0"
        assert status["ring"]["shards"] == [0]


def test_str_and_bytes_keys_and_values(broker: FakeBroker) -> None:  # noqa: F811
    with client(broker) as kv:
        kv.put("clé", "välue")
        assert kv.get("clé".encode()) == "välue".encode()
        kv.put(b"\x00\xff", b"\x01\x02")
        assert kv.get(b"\x00\xff") == b"\x01\x02"
        for bad in (1, 1.5, None, ["x"]):
            with pytest.raises(TypeError):
                kv.put(bad, "v")  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                kv.put("k", bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            kv.cas("k", "1", "v")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            kv.cas("k", -1, "v")


def test_too_large_is_refused_before_sending(broker: FakeBroker) -> None:  # noqa: F811
    with client(broker, key_bytes_max=8, value_bytes_max=16) as kv:
        with pytest.raises(TooLarge):
            kv.put("k" * 9, "v")
        with pytest.raises(TooLarge):
            kv.put("k", "v" * 17)
        with pytest.raises(TooLarge):
            kv.get("k" * 9)
        kv.put("k" * 8, "v" * 16)
    assert len(broker.requests(PutRequest)) == 1
    with client(broker) as kv, pytest.raises(TooLarge):
        kv.put("k", b"x" * (1024 * 1024 + 1))


def test_requests_carry_client_id_increasing_ids_and_lowest_pending(
    broker: FakeBroker,  # noqa: F811
) -> None:
    with client(broker) as kv:
        kv.put("a", "1")
        kv.get("a", consistency=Consistency.STALE)
        kv.put("b", "2")
    msgs = [m for _, m in broker.received]
    assert [m.request_id for m in msgs] == [1, 2, 3]
    assert {m.client_id for m in msgs} == {kv.client_id}
    assert len(kv.client_id) == 16
    assert msgs[1].consistency == Consistency.STALE
    assert [m.lowest_pending for m in msgs if isinstance(m, PutRequest)] == [1, 3]


def test_dropped_reply_resends_same_request_after_reset() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        return DROP if seen == 1 else None

    with FakeBroker(hook) as b, client(b, attempt_timeout_s=0.2) as kv:
        v = kv.put("k", "v")
        assert kv.get("k") == b"v"
        puts = b.requests(PutRequest)
        assert len(puts) == 2
        assert puts[0] == puts[1]  # same client id, request id, payload
        assert b.apply_count == 1
        assert kv.resets == 2 and kv.resends == 2
        assert b.data[b"k"] == (b"v", v)
        # Lazy Pirate: each retry came from a fresh socket (a new ROUTER identity).
        idents = [ident for ident, _ in b.received]
        assert len(set(idents)) == 3


def test_dropped_reply_to_write_is_deduplicated_by_the_node() -> None:
    # The write is applied but the reply is lost: the retry must get the same answer.
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, PutRequest) and seen == 1:
            b.answer(msg)  # apply, then lose the reply
            return DROP
        return None

    with FakeBroker(hook) as b, client(b, attempt_timeout_s=0.2) as kv:
        assert kv.put("k", "v") == 1
        assert b.apply_count == 1


def test_round_robin_over_endpoints_on_timeout() -> None:
    with FakeBroker(lambda i, m, s: DROP) as dead, FakeBroker() as live:
        kv = KVClient([dead.endpoint, live.endpoint], timeout_s=3, attempt_timeout_s=0.2)
        with kv:
            assert kv.ping() == "fake-b0"
            assert kv.endpoint == live.endpoint
        assert len(dead.received) == 1 and len(live.received) == 1


def test_not_leader_is_retried_then_succeeds() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, PutRequest) and seen <= 2:
            return ErrorReply(msg.request_id, ErrorCode.NOT_LEADER, "", "s0r1")
        return None

    with FakeBroker(hook) as b, client(b) as kv:
        start = time.monotonic()
        assert kv.put("k", "v") == 1
        assert time.monotonic() - start < 1.0  # backoff is brief
        puts = b.requests(PutRequest)
        assert len(puts) == 3 and len(set(puts)) == 1
        assert kv.resets == 0  # retryable errors resend on the same socket


def test_no_leader_until_deadline_raises_timeout_with_cause() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        return ErrorReply(msg.request_id, ErrorCode.NO_LEADER)

    with FakeBroker(hook) as b, client(b, timeout_s=0.3) as kv:
        start = time.monotonic()
        with pytest.raises(Timeout) as info:
            kv.get("k")
        assert 0.1 < time.monotonic() - start < 1.0
        assert "NO_LEADER" in str(info.value)
        assert info.value.__cause__ is not None


def test_timeout_raised_after_the_deadline() -> None:
    with FakeBroker(lambda i, m, s: DROP) as b, client(b) as kv:
        start = time.monotonic()
        with pytest.raises(Timeout):
            kv.put("k", "v", timeout=0.5)
        elapsed = time.monotonic() - start
        assert 0.45 < elapsed < 1.2
        assert len(b.requests(PutRequest)) >= 1


def test_retries_bound_the_resends() -> None:
    with FakeBroker(lambda i, m, s: DROP) as b:
        with client(b, retries=2, attempt_timeout_s=0.05) as kv, pytest.raises(Timeout):
            kv.ping()
        assert len(b.received) == 3


def test_non_matching_request_ids_are_discarded() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        # Stale replies, garbage, then the real answer.
        return [
            PongReply(msg.request_id + 1000, "stale"),
            PutReply(msg.request_id - 1, 99),
            [b"not msgpack at all"],
            PongReply(msg.request_id, "real"),
        ]

    with FakeBroker(hook) as b, client(b) as kv:
        assert kv.ping() == "real"
        assert kv.ping() == "real"


def test_non_retryable_error_raises_typed_exception() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        return ErrorReply(msg.request_id, ErrorCode.BAD_REQUEST, "bad key")

    with FakeBroker(hook) as b, client(b) as kv:
        with pytest.raises(BadRequest, match="bad key"):
            kv.get("k")
        assert len(b.received) == 1


def test_server_too_large_maps_to_too_large() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        return ErrorReply(msg.request_id, ErrorCode.TOO_LARGE, "value over 10 bytes")

    with FakeBroker(hook) as b, client(b) as kv, pytest.raises(TooLarge):
        kv.put("k", "v")


def test_closed_client_refuses_calls(broker: FakeBroker) -> None:  # noqa: F811
    kv = client(broker)
    kv.close()
    with pytest.raises(ClientClosed):
        kv.ping()


def test_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZKV_ENDPOINT", "tcp://10.0.0.1:1, tcp://10.0.0.2:2")
    kv = KVClient()
    assert kv.endpoints == ["tcp://10.0.0.1:1", "tcp://10.0.0.2:2"]
    kv.close()
    monkeypatch.delenv("ZKV_ENDPOINT")
    with KVClient() as kv:
        assert kv.endpoints == ["tcp://127.0.0.1:5555"]


def test_get_request_encodes_consistency_default(broker: FakeBroker) -> None:  # noqa: F811
    with client(broker, consistency=Consistency.LEADER) as kv:
        kv.get("x")
    (req,) = broker.requests(GetRequest)
    assert req.consistency == Consistency.LEADER
    assert codec.route_fields(codec.encode(req)[0]) == (GetRequest.TYPE, b"x", 1)

