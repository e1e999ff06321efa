"""``zkv`` CLI output and exit codes against an in-memory broker (no socket, no wait)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.fake_transport import DROP, FakeBrokerCore, FakeNet, Hook
from zkv.broker.node_table import NodeTable
from zkv.client import KVClient, cli
from zkv.client.cli import annotate_status, format_status, main
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply, Heartbeat, PutRequest, Role
from zkv.protocol.ring import RingConfig

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


ENDPOINT = "fake://b0"


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> FakeNet:
    """The CLI's clients talk to in-memory brokers on a fake clock."""
    net = FakeNet()
    monkeypatch.setattr(cli, "KVClient", lambda *a, **kw: KVClient(
        *a, connect=net.connect, clock=net.clock, **kw))
    return net


@pytest.fixture
def broker(net: FakeNet) -> FakeBrokerCore:
    return net.add(ENDPOINT)


def serve(net: FakeNet, hook: Hook) -> FakeBrokerCore:
    return net.add(ENDPOINT, hook)


def zkv(b: FakeBrokerCore, *argv: str) -> int:
    return main(["--endpoint", ENDPOINT, "--timeout", "1", *argv])


def test_put_get_delete_cas(broker: FakeBrokerCore, capsys: pytest.CaptureFixture[str]) -> None:
    assert zkv(broker, "put", "greeting", "héllo") == 0
    assert capsys.readouterr().out == "OK version 1\n"
    assert zkv(broker, "get", "greeting") == 0
    assert capsys.readouterr().out == "héllo\n"
    assert zkv(broker, "get", "greeting", "--consistency", "stale", "--show-version") == 0
    assert capsys.readouterr().out == "héllo\nversion 1\n"
    assert zkv(broker, "cas", "greeting", "7", "x") == 1
    err = capsys.readouterr().err
    assert "not swapped" in err and "current version 1" in err
    assert zkv(broker, "cas", "greeting", "1", "x") == 0
    assert capsys.readouterr().out.startswith("OK version ")
    assert zkv(broker, "delete", "greeting", "--if-version", "1") == 1
    err = capsys.readouterr().err
    assert "not deleted" in err and "expected 1" in err
    assert zkv(broker, "delete", "greeting") == 0
    assert capsys.readouterr().out == "deleted\n"
    assert zkv(broker, "delete", "greeting") == 0
    assert capsys.readouterr().out == "(not found)\n"


def test_get_missing_prints_nil_on_stderr_and_exits_1(
    broker: FakeBrokerCore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert zkv(broker, "get", "nope") == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == "(nil)\n"


def test_binary_value_is_written_raw(broker: FakeBrokerCore, capsysbinary: Any) -> None:
    broker.data[b"bin"] = (b"\xff\x00\xfe", 1)
    assert zkv(broker, "get", "bin") == 0
    assert capsysbinary.readouterr().out == b"\xff\x00\xfe\n"


def test_timeout_is_one_line_and_exit_3(net: FakeNet, capsys: pytest.CaptureFixture[str]) -> None:
    serve(net, lambda i, m, s: DROP)
    start = net.clock.now()
    assert main(["--endpoint", ENDPOINT, "--timeout", "0.3", "get", "k"]) == 3
    assert net.clock.now() - start == pytest.approx(0.3)
    err = capsys.readouterr().err
    assert err.startswith("zkv: error: timeout") and err.count("\n") == 1
    assert "Traceback" not in err


def test_error_reply_is_one_line_exit_1(net: FakeNet, capsys: pytest.CaptureFixture[str]) -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, PutRequest):
            return ErrorReply(msg.request_id, ErrorCode.BAD_REQUEST, "key must not be empty")
        return None

    assert zkv(serve(net, hook), "put", "", "v") == 1
    err = capsys.readouterr().err
    assert err == "zkv: error: BAD_REQUEST: key must not be empty\n"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["put", "only-key"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["cas", "k", "notanint", "v"])
    assert info.value.code == 2
    assert "zkv: error:" in capsys.readouterr().err


def test_ping(broker: FakeBrokerCore, capsys: pytest.CaptureFixture[str]) -> None:
    assert zkv(broker, "ping") == 0
    assert capsys.readouterr().out.startswith("pong from fake-b0")


def _node(nid: str, shard: int, role: int, term: int, last: int, **kw: Any) -> dict[str, Any]:
    node = {"node_id": nid, "shard_id": shard, "role": role, "term": term,
            "last_index": last, "commit_index": last, "applied_index": last,
            "key_count": 10, "pid": 100, "age_ms": 42, "extra": {}}
    node.update(kw)
    return node


STATUS_NODES = (
    _node("s0r0", 0, 2, 3, 100),
    _node("s0r1", 0, 0, 3, 97),
    _node("s1r0", 1, 0, 2, 50),
    _node("s1r1", 1, 2, 1, 60),  # a stale leader claim from an older term
    _node("s1r2", 1, 2, 2, 55),
)


def test_status_table_groups_by_shard_with_leader_and_lag(
    broker: FakeBrokerCore, capsys: pytest.CaptureFixture[str]
) -> None:
    broker.status_nodes = STATUS_NODES
    broker.ring = RingConfig(1, (0, 1, 2), 256)
    assert zkv(broker, "status") == 0
    out = capsys.readouterr().out
    assert "shard 0  leader s0r0" in out
    assert "shard 1  leader s1r2" in out
    assert "shard 2  leader NONE" in out
    s0r1 = next(line for line in out.splitlines() if line.strip().startswith("s0r1"))
    assert s0r1.split()[:7] == ["s0r1", "follower", "3", "97", "97", "97", "3"]
    assert _column(out, "s0r1", "age") == "42ms"  # the broker's age_ms


def _column(out: str, node: str, name: str) -> str:
    """The value in column ``name`` of ``node``'s row of ``zkv status``."""
    lines = out.splitlines()
    header = next(line.split() for line in lines if line.split()[:2] == ["node", "role"])
    row = next(line.split() for line in lines if line.strip().startswith(node))
    return row[header.index(name)]


def test_status_age_is_time_since_the_broker_heard_the_node() -> None:
    """The rows as the broker builds them from real heartbeats (no node sends an age or
    an uptime): the age column is the broker's ``age_ms``."""
    t = NodeTable(election_timeout_s=1.0)
    for nid, role, heard_s in (("s0r0", Role.LEADER, 0.5), ("s0r1", Role.FOLLOWER, 0.0)):
        t.observe(Heartbeat(
            node_id=nid, shard_id=0, role=role, term=1, leader_id="s0r0", last_log_term=1,
            last_index=5, commit_index=5, applied_index=5, key_count=0, pid=1,
            peer_addr="tcp://127.0.0.1:7000", members=("s0r0", "s0r1"),
            ring=RingConfig(1, (0,), 16), heartbeat_ms=100), heard_s)
    rows = t.status_rows(1.7)
    out = format_status(annotate_status({"broker_id": "b", "nodes": rows, "ring": t.ring_config().as_dict()}))
    ages = {n: _column(out, n, "age") for n in ("s0r0", "s0r1")}
    assert ages == {"s0r0": "1.2s", "s0r1": "1.7s"}
    one = format_status(annotate_status(
        {"broker_id": "b", "nodes": [_node("s0r0", 0, 2, 1, 1, age_ms=7)]}))
    assert _column(one, "s0r0", "age") == "7ms"


def test_status_json(broker: FakeBrokerCore, capsys: pytest.CaptureFixture[str]) -> None:
    broker.status_nodes = STATUS_NODES
    assert zkv(broker, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["broker_id"] == "fake-b0"
    assert status["shards"]["1"]["leader"] == "s1r2"
    lags = {n["node_id"]: n["lag"] for n in status["shards"]["1"]["nodes"]}
    assert lags == {"s1r0": 5, "s1r1": 0, "s1r2": 0}


def test_status_without_leader_has_no_lag() -> None:
    status = annotate_status({"broker_id": "b", "nodes": [_node("s0r0", 0, 0, 1, 5)],
                              "ring": {"shards": [0]}})
    assert status["shards"]["0"]["leader"] is None
    assert status["shards"]["0"]["nodes"][0]["lag"] is None
    assert "leader NONE" in format_status(status)


@pytest.mark.parametrize(("code", "text"), [
    (ErrorCode.QUOTA_EXCEEDED, "this write would bring the shard to 20500 bytes of keys and "
     "values, over its quota of 20000 (--max-data-bytes); deletes and reads still work"),
    (ErrorCode.DISK_FULL, "the shard leader's disk is full; retry later"),
])
def test_quota_and_disk_full_are_one_line_exit_1(code: ErrorCode, text: str, net: FakeNet,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, PutRequest):
            return ErrorReply(msg.request_id, code, text)
        return None

    assert zkv(serve(net, hook), "put", "k", "v") == 1
    assert capsys.readouterr().err == f"zkv: error: {code.name}: {text}\n"


def test_status_shows_data_usage_against_the_quota_and_a_full_disk() -> None:
    node = _node("s0r0", 0, 2, 1, 5, extra={"data_bytes": 3 << 20, "max_data_bytes": 12 << 20,
                                            "disk_full": True})
    text = format_status(annotate_status({"broker_id": "b", "nodes": [node],
                                          "ring": {"shards": [0]}}))
    assert "3.0MiB/12.0MiB (25%) DISK FULL" in text
