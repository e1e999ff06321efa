"""KVClient over in-memory brokers and a fake clock: round trips, retries, broker moves,
Lazy Pirate resets, errors. No socket, no wall-clock wait (the real zmq edges are
covered by tests/process/test_client_zmq.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.fake_transport import DROP, FakeBrokerCore, FakeClock, FakeNet, Hook
from zkv.client import (
    BadRequest,
    ClientClosed,
    Consistency,
    KVClient,
    NoLeader,
    Timeout,
    TooLarge,
)
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    ErrorReply,
    GetRequest,
    PingRequest,
    PongReply,
    PutReply,
    PutRequest,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]

B0, B1 = "fake://b0", "fake://b1"


class Setup:
    """Brokers on a FakeNet and clients wired to it."""

    def __init__(self, *hooks: Hook | None) -> None:
        self.clock = FakeClock()
        self.net = FakeNet(self.clock)
        self.endpoints = [f"fake://b{i}" for i in range(max(1, len(hooks)))]
        self.brokers = [self.net.add(e, h, f"fake-b{i}")
                        for i, (e, h) in enumerate(zip(self.endpoints, hooks or (None,), strict=True))]

    @property
    def b(self) -> FakeBrokerCore:
        return self.brokers[0]

    def client(self, endpoints: list[str] | None = None, **kw: Any) -> KVClient:
        kw.setdefault("timeout_s", 2.0)
        return KVClient(endpoints or self.endpoints, seed=1, connect=self.net.connect,
                        clock=self.clock, **kw)


@pytest.fixture
def env() -> Setup:
    return Setup(None)


def test_round_trip_of_every_op(env: Setup) -> None:
    env.b.status_nodes = ({"node_id": "s0r0", "shard_id": 0, "role": 2, "age_ms": 3},)
    with env.client() as kv:
        assert kv.get("missing") is None
        v1 = kv.put("k", "v1")
        assert kv.get("k") == b"v1"
        assert kv.get_versioned("k") == (b"v1", v1)
        assert kv.cas("k", v1 + 100, "nope") is False
        assert kv.cas("k", v1, "v2") is True
        assert kv.get("k") == b"v2"
        assert kv.cas("new", 0, "x") is True
        found = kv.get_versioned("new")
        assert found is not None and kv.cas_versioned("new", 0, "y") == (False, found[1])
        assert kv.delete("k") is True
        assert kv.delete("k") is False
        assert kv.get("k") is None
        v3 = kv.put("k", "v3")
        assert kv.delete_versioned("k", expected_version=v3 + 1) == (False, v3)
        assert kv.delete("k", expected_version=v3) is True
        assert kv.delete_versioned("k", expected_version=v3) == (False, 0)
        with pytest.raises(ValueError):
            kv.delete("k", expected_version=0)
        with pytest.raises(TypeError):
            kv.delete("k", expected_version="1")  # type: ignore[arg-type]
        assert kv.ping() == "fake-b0"
        status = kv.status()
        assert status["broker_id"] == "fake-b0"
        assert status["nodes"][0]["node_id"] == "s0r0"
        assert status["ring"]["shards"] == [0]
    assert env.net.open_connections == 0 and env.clock.slept == []


def test_str_and_bytes_keys_and_values(env: Setup) -> None:
    with env.client() as kv:
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


def test_too_large_is_refused_before_sending(env: Setup) -> None:
    with env.client(key_bytes_max=8, value_bytes_max=16) as kv:
        with pytest.raises(TooLarge):
            kv.put("k" * 9, "v")
        with pytest.raises(TooLarge):
            kv.put("k", "v" * 17)
        with pytest.raises(TooLarge):
            kv.get("k" * 9)
        kv.put("k" * 8, "v" * 16)
    assert len(env.b.requests(PutRequest)) == 1
    with env.client() as kv, pytest.raises(TooLarge):
        kv.put("k", b"x" * (1024 * 1024 + 1))


def test_requests_carry_client_id_increasing_ids_and_lowest_pending(env: Setup) -> None:
    with env.client() as kv:
        kv.put("a", "1")
        kv.get("a", consistency=Consistency.STALE)
        kv.put("b", "2")
    msgs = [m for _, m in env.b.received]
    assert [m.request_id for m in msgs] == [1, 2, 3]
    assert {m.client_id for m in msgs} == {kv.client_id}
    assert len(kv.client_id) == 16
    assert msgs[1].consistency == Consistency.STALE
    assert [m.lowest_pending for m in msgs if isinstance(m, PutRequest)] == [1, 3]


def test_dropped_reply_resends_same_request_on_a_new_connection() -> None:
    env = Setup(lambda ident, msg, seen: DROP if seen == 1 else None)
    with env.client(attempt_timeout_s=0.2) as kv:
        start = env.clock.now()
        v = kv.put("k", "v")
        assert env.clock.now() - start == pytest.approx(0.2)  # one attempt timeout
        assert kv.get("k") == b"v"
        puts = env.b.requests(PutRequest)
        assert len(puts) == 2
        assert puts[0] == puts[1]  # same client id, request id, payload
        assert env.b.apply_count == 1
        assert kv.resets == 2 and kv.resends == 2 and kv.switches == 0
        assert env.b.data[b"k"] == (b"v", v)
        # Lazy Pirate: each retry came on a fresh connection (a new ROUTER identity),
        # and the dead ones were closed.
        assert len(env.b.idents) == 3
        assert env.net.open_connections == 1


def test_dropped_reply_to_write_is_deduplicated_by_the_node() -> None:
    # The write is applied but the reply is lost: the retry must get the same answer.
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, PutRequest) and seen == 1:
            lossy.b.answer(msg)  # apply, then lose the reply
            return DROP
        return None

    lossy = Setup(hook)
    with lossy.client(attempt_timeout_s=0.2) as kv:
        assert kv.put("k", "v") == 1
        assert lossy.b.apply_count == 1


def test_round_robin_over_endpoints_on_silence() -> None:
    env = Setup(lambda i, m, s: DROP, None)
    dead, live = env.brokers
    with env.client(timeout_s=3, attempt_timeout_s=0.2) as kv:
        assert kv.ping() == "fake-b1"
        assert kv.endpoint == B1 and kv.resets == 1 and kv.switches == 1
        assert kv.ping() == "fake-b1"  # and it stays there
    assert len(dead.received) == 1 and len(live.received) == 2


def test_a_deadline_of_one_attempt_still_leaves_a_silent_broker_for_the_next_call() -> None:
    """A call whose deadline fits one attempt gives up where it would have switched;
    the next call must go to the next broker, or such a client never leaves a dead one
    (every put failed for 45 s after a broker kill with 0.8 s deadlines)."""
    env = Setup(lambda i, m, s: DROP, None)
    dead, live = env.brokers
    with env.client(timeout_s=0.8) as kv:
        with pytest.raises(Timeout):
            kv.put("k", "v")
        assert kv.endpoint == B1
        assert kv.put("k", "v") > 0
    assert len(dead.requests(PutRequest)) == 1 and len(live.requests(PutRequest)) == 1


@pytest.mark.parametrize("code", [ErrorCode.NO_LEADER, ErrorCode.UNAVAILABLE])
def test_broker_refusal_moves_to_the_next_broker_at_once(code: ErrorCode) -> None:
    """Issue 10, item 2: b0 cannot reach the nodes, b1 can."""
    env = Setup(lambda i, m, s: ErrorReply(m.request_id, code), None)
    b0, b1 = env.brokers
    with env.client(timeout_s=5) as kv:
        start = env.clock.now()
        version = kv.put("k", "v")
        assert env.clock.now() == start and env.clock.slept == []  # no pause, no wait
        assert kv.switches == 1 and kv.resets == 0 and kv.endpoint == B1
        assert kv.get("k") == b"v" and kv.get_versioned("k") == (b"v", version)
    (refused,) = b0.requests(PutRequest)
    assert b1.requests(PutRequest) == [refused]  # the same request id went to b1
    assert len(b0.received) == 1  # later calls went straight to b1


def test_write_moved_to_another_broker_is_applied_once() -> None:
    """b0 forwards the write to the shard, then goes silent; b1 reaches the same shard:
    the retry through b1 carries the same (client id, request id) and is deduplicated."""
    def via_b0(ident: bytes, msg: Any, seen: int) -> Any:
        shard.answer(msg)
        return DROP

    env = Setup(via_b0, None)
    shard = env.brokers[1]
    with env.client(timeout_s=5, attempt_timeout_s=0.3) as kv:
        assert kv.put("k", "v") == 1
        assert kv.resets == 1 and kv.switches == 1
    assert shard.apply_count == 1
    (first,) = env.brokers[0].requests(PutRequest)
    assert shard.requests(PutRequest) == [first]


def test_every_broker_refusing_backs_off_per_round_then_times_out() -> None:
    refuse: Hook = lambda i, m, s: ErrorReply(m.request_id, ErrorCode.NO_LEADER)  # noqa: E731
    env = Setup(refuse, refuse)
    with env.client(timeout_s=1.0) as kv, pytest.raises(Timeout) as info:
        kv.put("k", "v")
    b0, b1 = env.brokers
    n0, n1 = len(b0.received), len(b1.received)
    # b0, b1 at once, pause, b0, b1 at once, pause, ...: a pause after each full round.
    assert 0 <= n0 - n1 <= 1 and len(env.clock.slept) == (n0 + n1 - 1) // 2
    assert 5 <= len(env.clock.slept) <= 20  # one backoff per round of both brokers
    assert all(0.005 <= s <= 0.2 for s in env.clock.slept)
    assert "deadline exhausted" in str(info.value) and "NO_LEADER" in str(info.value)
    assert isinstance(info.value.__cause__, NoLeader)
    assert len({m for _, m in b0.received} | {m for _, m in b1.received}) == 1


def test_not_leader_is_retried_on_the_same_broker_then_succeeds() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, PutRequest) and seen <= 2:
            return ErrorReply(msg.request_id, ErrorCode.NOT_LEADER, "", "s0r1")
        return None

    env = Setup(hook, None)
    with env.client() as kv:
        assert kv.put("k", "v") == 1
        assert 0.015 <= sum(env.clock.slept) <= 0.030  # backoff: 5-10 ms, then 10-20 ms
        puts = env.b.requests(PutRequest)
        assert len(puts) == 3 and len(set(puts)) == 1
        assert kv.resets == 0 and kv.switches == 0  # same broker, same connection
    assert env.brokers[1].received == []


def test_server_timeout_code_is_retried_on_the_same_broker() -> None:
    env = Setup(lambda i, m, s: ErrorReply(m.request_id, ErrorCode.TIMEOUT) if s == 1 else None)
    with env.client() as kv:
        assert kv.ping() == "fake-b0"
        assert len(env.clock.slept) == 1 and kv.switches == 0


def test_no_leader_on_the_only_broker_until_deadline_raises_timeout_with_cause() -> None:
    env = Setup(lambda i, m, s: ErrorReply(m.request_id, ErrorCode.NO_LEADER))
    with env.client(timeout_s=0.3) as kv:
        start = env.clock.now()
        with pytest.raises(Timeout) as info:
            kv.get("k")
        assert 0.1 < env.clock.now() - start < 0.3
        assert "NO_LEADER" in str(info.value)
        assert isinstance(info.value.__cause__, NoLeader)
        assert len(env.b.received) >= 4 and kv.resets == 0


def test_timeout_raised_at_the_deadline() -> None:
    env = Setup(lambda i, m, s: DROP)
    with env.client() as kv:
        start = env.clock.now()
        with pytest.raises(Timeout) as info:
            kv.put("k", "v", timeout=0.5)
        assert env.clock.now() - start == pytest.approx(0.5)  # one attempt: min(1 s, 0.5)
        assert len(env.b.requests(PutRequest)) == 1
        assert isinstance(info.value.__cause__, Timeout)
        start = env.clock.now()
        with pytest.raises(Timeout):
            kv.put("k", "v", timeout=2.5)  # attempts of 1 s each: 1 + 1 + 0.5
        assert env.clock.now() - start == pytest.approx(2.5)
        assert len(env.b.requests(PutRequest)) == 4


def test_retries_bound_the_resends() -> None:
    env = Setup(lambda i, m, s: DROP)
    with env.client(retries=2, attempt_timeout_s=0.05) as kv, pytest.raises(Timeout) as info:
        kv.ping()
    assert len(env.b.received) == 3
    assert "retries exhausted" in str(info.value)


def test_non_matching_request_ids_are_discarded() -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        # Stale replies, garbage, then the real answer.
        return [
            PongReply(msg.request_id + 1000, "stale"),
            PutReply(msg.request_id - 1, 99),
            [b"not msgpack at all"],
            PongReply(msg.request_id, "real"),
        ]

    env = Setup(hook)
    with env.client() as kv:
        assert kv.ping() == "real"
        assert kv.ping() == "real"


def test_non_retryable_error_raises_typed_exception() -> None:
    env = Setup(lambda i, m, s: ErrorReply(m.request_id, ErrorCode.BAD_REQUEST, "bad key"))
    with env.client() as kv:
        with pytest.raises(BadRequest, match="bad key"):
            kv.get("k")
        assert len(env.b.received) == 1


def test_server_too_large_maps_to_too_large() -> None:
    env = Setup(lambda i, m, s: ErrorReply(m.request_id, ErrorCode.TOO_LARGE, "over 10 bytes"))
    with env.client() as kv, pytest.raises(TooLarge):
        kv.put("k", "v")


def test_a_reply_of_the_wrong_type_is_a_protocol_error() -> None:
    from zkv.protocol.errors import RemoteProtocolError

    env = Setup(lambda i, m, s: PongReply(m.request_id, "x") if isinstance(m, GetRequest)
                else None)
    with env.client() as kv, pytest.raises(RemoteProtocolError):
        kv.get("k")


def test_closed_client_refuses_calls(env: Setup) -> None:
    kv = env.client()
    kv.ping()
    kv.close()
    assert env.net.open_connections == 0
    with pytest.raises(ClientClosed):
        kv.ping()


def test_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch, env: Setup) -> None:
    monkeypatch.setenv("ZKV_ENDPOINT", "tcp://10.0.0.1:1, tcp://10.0.0.2:2")
    with KVClient(connect=env.net.connect) as kv:
        assert kv.endpoints == ["tcp://10.0.0.1:1", "tcp://10.0.0.2:2"]
    monkeypatch.delenv("ZKV_ENDPOINT")
    with KVClient(connect=env.net.connect) as kv:
        assert kv.endpoints == ["tcp://127.0.0.1:5555"]
    with pytest.raises(ValueError):
        KVClient(" , ", connect=env.net.connect)
    with pytest.raises(ValueError):
        KVClient(B0, timeout_s=0, connect=env.net.connect)


def test_get_request_encodes_consistency_default(env: Setup) -> None:
    with env.client(consistency=Consistency.LEADER) as kv:
        kv.get("x")
        with pytest.raises(ValueError):
            kv.get("x", timeout=0)
    (req,) = env.b.requests(GetRequest)
    assert req.consistency == Consistency.LEADER
    assert codec.route_fields(codec.encode(req)[0]) == (GetRequest.TYPE, b"x", 1)
    assert not env.b.requests(PingRequest)
