"""``zkv`` CLI output and exit codes against the fake broker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.test_client_fake import DROP, FakeBroker, broker  # noqa: F401
from zkv.client.cli import annotate_status, format_status, main
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply, PutRequest
from zkv.protocol.ring import RingConfig

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def zkv(b: FakeBroker, *argv: str) -> int:
    return main(["--endpoint", b.endpoint, "--timeout", "1", *argv])


def test_put_get_delete_cas(broker: FakeBroker, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
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
    assert zkv(broker, "delete", "greeting") == 0
    assert capsys.readouterr().out == "deleted\n"
    assert zkv(broker, "delete", "greeting") == 0
    assert capsys.readouterr().out == "(not found)\n"


def test_get_missing_prints_nil_on_stderr_and_exits_1(
    broker: FakeBroker, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    assert zkv(broker, "get", "nope") == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == "(nil)\n"


def test_binary_value_is_written_raw(broker: FakeBroker, capsysbinary: Any) -> None:  # noqa: F811
    broker.data[b"bin"] = (b"\xff\x00\xfe", 1)
    assert zkv(broker, "get", "bin") == 0
    assert capsysbinary.readouterr().out == b"\xff\x00\xfe\n"


def test_timeout_is_one_line_and_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeBroker(lambda i, m, s: DROP) as b:
        assert main(["--endpoint", b.endpoint, "--timeout", "0.3", "get", "k"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("zkv: error: timeout") and err.count("\n") == 1
    assert "Traceback" not in err


def test_error_reply_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, PutRequest):
            return ErrorReply(msg.request_id, ErrorCode.BAD_REQUEST, "key must not be empty")
        return None

    with FakeBroker(hook) as b:
        assert zkv(b, "put", "", "v") == 1
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


def test_bad_endpoint_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--endpoint", "nonsense", "get", "k"]) == 1
    assert capsys.readouterr().err.startswith("zkv: error:")


def test_ping(broker: FakeBroker, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert zkv(broker, "ping") == 0
    assert capsys.readouterr().out.startswith("pong from fake-b0")


def _node(nid: str, shard: int, role: int, term: int, last: int, **kw: Any) -> dict[str, Any]:
    node = {"node_id": nid, "shard_id": shard, "role": role, "term": term,
            "last_index": last, "commit_index": last, "applied_index": last,
            "key_count": 10, "pid": 100, "age_ms": 42, "extra": {}}
    node.update(kw)
    return node


STATUS_NODES = (
    _node("s0r0", 0, 2, 3, 100, extra={"uptime_s": 12.3}),
    _node("s0r1", 0, 0, 3, 97),
    _node("s1r0", 1, 0, 2, 50),
    _node("s1r1", 1, 2, 1, 60),  # a stale leader claim from an older term
    _node("s1r2", 1, 2, 2, 55),
)


def test_status_table_groups_by_shard_with_leader_and_lag(
    broker: FakeBroker, capsys: pytest.CaptureFixture[str]  # noqa: F811
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
    assert "up 12s/hb 42ms" in out


def test_status_json(broker: FakeBroker, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
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
