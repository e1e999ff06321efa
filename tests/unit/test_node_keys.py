"""Node keys from committed membership changes (issue 12, item 3): the trust map shared by
nodes and brokers (``protocol/node_keys.py``), the allow-list that applies it
(``TrustStore.learn``, the ZAP decision), the broker's learning rule
(``broker/learned_keys.py``) and the operator's ``--public-key``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import zmq

from zkv.broker.learned_keys import LearnedKeys
from zkv.ops.keys import generate
from zkv.protocol.messages import AdminAddReplica, AdminMembersReply, AdminReplaceReplica
from zkv.protocol.node_keys import (
    HEARTBEAT_FIELD,
    NODE,
    Principal,
    config_keys,
    dial_key,
    heartbeat_field,
    newest_keys,
    parse_heartbeat_field,
    trust_map,
)
from zkv.protocol.security import CLIENT, TrustStore, ZapHandler, file_node_key, load_pair
from zkv.storage_node.membership import Membership


def _key() -> str:
    return zmq.curve_keypair()[0].decode()


K1, K2, K3 = _key(), _key(), _key()


# ------------------------------------------------------------------ the trust map


def test_trust_map_seeded_from_files_extended_by_configured_keys() -> None:
    files = {b"F" * 40: Principal(NODE, "a"), b"C" * 40: Principal(CLIENT, "client")}
    assert trust_map(files, {}) == files  # seeded from the files alone
    got = trust_map(files, config_keys([("d", K1)]))
    assert got[K1.encode()] == Principal(NODE, "d") and len(got) == 3


def test_files_win_and_a_key_given_to_two_members_is_neither() -> None:
    files = {b"C" * 40: Principal(CLIENT, "client"), b"F" * 40: Principal(NODE, "a")}
    # a configuration cannot turn a client's key, or another node's, into a member's
    got = trust_map(files, {b"C" * 40: "d", b"F" * 40: "e"})
    assert got == files
    assert config_keys([("d", K1), ("e", K1), ("f", K2)]) == {K2.encode(): "f"}


def test_removed_members_key_is_dropped() -> None:
    conf = Membership(("a", "b", "c")).add_learner("d", "tcp://d", key=K1)
    conf = conf.add_learner("e", "tcp://e", key=K2)
    assert config_keys(conf.keys) == {K1.encode(): "d", K2.encode(): "e"}
    assert config_keys(conf.remove("d").keys) == {K2.encode(): "e"}


def test_dial_key_prefers_the_published_certificate() -> None:
    assert dial_key(b"F" * 40, K1) == b"F" * 40
    assert dial_key(None, K1) == K1.encode()
    assert dial_key(None, "") is None  # no key: not dialed yet


def test_saved_keys_count_only_when_from_a_later_configuration(tmp_path: Path) -> None:
    from zkv.storage_node import durable_state

    assert durable_state.load_member_keys(tmp_path) is None
    durable_state.save_member_keys(tmp_path, 150, {"d": K1})
    saved = durable_state.load_member_keys(tmp_path)
    assert saved == (150, {"d": K1})
    # restarted with a snapshot from before the change: the saved one is later
    assert newest_keys((120, {}), saved) == (150, {"d": K1})
    # a later committed configuration (d removed) wins over what was saved
    assert newest_keys((180, {}), saved) == (180, {})
    assert newest_keys((150, {"e": K2}), saved) == (150, {"e": K2})  # ties: the replica's
    (tmp_path / durable_state.MEMBER_KEYS_FILE).write_bytes(b"garbage")
    with pytest.raises(durable_state.CorruptStateError):
        durable_state.load_member_keys(tmp_path)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return generate(tmp_path / "keys", ["s0r0", "s0r1"], ["b0"])


def test_trust_store_learns_exactly_the_configured_keys(keys: Path) -> None:
    trust = TrustStore(keys)
    new_pub, _ = zmq.curve_keypair()
    file_pub, _ = load_pair(keys / "nodes" / "s0r0")
    client_pub, _ = load_pair(keys / "client")
    assert trust.lookup(new_pub) is None
    trust.learn({new_pub: "s0r9", client_pub: "s0r8"})
    assert trust.lookup(new_pub) == Principal(NODE, "s0r9")
    assert trust.lookup(client_pub) == Principal(CLIENT, "client")  # files win
    assert trust.lookup(file_pub) == Principal(NODE, "s0r0")
    trust.learn({})  # the next committed configuration removed s0r9
    assert trust.lookup(new_pub) is None and trust.lookup(file_pub) is not None
    assert file_node_key(trust.public_dir, "s0r0") == file_pub
    assert file_node_key(trust.public_dir, "s0r9") is None


def test_zap_admits_a_learned_node_key_only_where_nodes_go(keys: Path) -> None:
    ctx = zmq.Context()
    trust = TrustStore(keys)
    zap = ZapHandler(ctx, trust)
    try:
        pub, _ = zmq.curve_keypair()
        raw = zmq.utils.z85.decode(pub)
        assert zap.decide("peer", b"CURVE", [raw]) is None  # not yet
        trust.learn({pub: "s0r9"})
        for domain in ("peer", "backend", "heartbeats"):
            assert zap.decide(domain, b"CURVE", [raw]) == Principal(NODE, "s0r9")
        assert zap.decide("frontend", b"CURVE", [raw]) is None
    finally:
        zap.close()
        ctx.term()


# ------------------------------------------------------------------ the broker's rule


def _extra(index: int, keys: dict[str, str]) -> dict[str, Any]:
    return {HEARTBEAT_FIELD: heartbeat_field(index, keys.items())}


def test_broker_learns_only_from_a_node_it_already_trusts() -> None:
    learned = LearnedKeys()
    # a key that is no node's (None), or a node speaking for another, teaches nothing
    assert not learned.report(None, "s0r0", 0, _extra(5, {"s0r9": K1}))
    assert not learned.report("s0r1", "s0r0", 0, _extra(5, {"s0r9": K1}))
    assert learned.keys == {}
    assert learned.report("s0r0", "s0r0", 0, _extra(5, {"s0r9": K1}))
    assert learned.keys == {K1.encode(): "s0r9"}  # trusted as that member only
    assert not learned.report("s0r1", "s0r1", 0, _extra(5, {"s0r9": K1}))  # nothing new


def test_broker_follows_the_newest_configuration_per_shard() -> None:
    learned = LearnedKeys()
    learned.report("a", "a", 0, _extra(5, {"d": K1}))
    learned.report("x", "x", 1, _extra(3, {"y": K2}))
    assert learned.keys == {K1.encode(): "d", K2.encode(): "y"}
    # d was removed at index 9: its key goes, and d's own stale report cannot bring it back
    assert learned.report("b", "b", 0, _extra(9, {"e": K3}))
    assert learned.keys == {K3.encode(): "e", K2.encode(): "y"}
    assert not learned.report("d", "d", 0, _extra(5, {"d": K1}))
    assert learned.report("c", "c", 0, _extra(12, {}))  # the last keyed member removed
    assert learned.keys == {K2.encode(): "y"}


@pytest.mark.parametrize("bad", [
    None, 7, [], [1], [-1, {}], ["1", {}], [1, []], [1, {"d": "short"}], [1, {"": K1}],
    [1, {"d": 5}], [1, {f"n{i}": K1 for i in range(100)}],
])
def test_malformed_reports_are_ignored(bad: object) -> None:
    assert parse_heartbeat_field(bad) is None
    learned = LearnedKeys()
    assert not learned.report("a", "a", 0, {HEARTBEAT_FIELD: bad})
    assert learned.keys == {}


# ------------------------------------------------------------------ the operator's side


class _FakeKV:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def admin(self, request: Any, *, timeout: float | None = None) -> AdminMembersReply:
        self.sent.append(request)
        return AdminMembersReply(0, "s0r0", ("s0r0", "s0r9", "x"), (), {}, {}, {}, False, 1, "")


@pytest.mark.parametrize("command", ["add-replica", "replace-replica"])
def test_public_key_file_goes_into_the_request(keys: Path, command: str) -> None:
    from zkv.ops import membership as ops

    generate(keys.parent / "outside", ["s0r9"], [])
    cert = keys.parent / "outside" / "nodes" / "s0r9" / "s0r9.key"
    parser = argparse.ArgumentParser()
    common = argparse.ArgumentParser(add_help=False)
    sub = parser.add_subparsers(dest="admin_command")
    ops.add_arguments(sub, common)
    old = ["s0r1"] if command == "replace-replica" else []
    args = parser.parse_args([command, "0", *old, "--node-id", "s0r9", "--peer-addr",
                              "tcp://127.0.0.1:1", "--public-key", str(cert), "--wait", "1"])
    kv = _FakeKV()
    assert ops.run(kv, args, lambda _: None) == 0  # type: ignore[arg-type]
    req = kv.sent[0]
    assert isinstance(req, AdminAddReplica | AdminReplaceReplica)
    assert req.public_key == load_pair(keys.parent / "outside" / "nodes" / "s0r9")[0].decode()
    assert ops.public_key_text(None) == ""


def test_refused_dials_are_reopened_once_after_the_retry_delay() -> None:
    from zkv.storage_node.refusals import RefusedDials

    dials = RefusedDials(retry_s=0.5)
    dials.refused("peer:a", 10.0)
    dials.refused("peer:a", 10.3)  # refused again meanwhile: still due from the first
    dials.refused("pub", 10.2)
    assert dials.due(10.4) == []
    assert dials.due(10.5) == ["peer:a"]
    assert dials.due(10.6) == []  # reopened: watched anew, not due again
    dials.forget("pub")  # closed for another reason (the member left)
    assert dials.due(99.0) == []
