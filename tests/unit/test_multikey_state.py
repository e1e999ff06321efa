"""Batches and scans in the state machine: one entry applied atomically and once, the
sorted key index against a naive reference, and scan pages filtered by ownership."""

from __future__ import annotations

import random

import pytest

from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply, PutReply
from zkv.protocol.multikey import KeyResult, MultiReply, ScanReply
from zkv.protocol.ring import Ring, RingConfig
from zkv.storage_node.commands import Fence, PutCommand, decode_command, encode_command
from zkv.storage_node.key_index import CHUNK_MAX, SortedKeys
from zkv.storage_node.multikey_commands import MultiKind, MultiWrite, key_hash
from zkv.storage_node.multikey_state import multi_get_reply, scan_page
from zkv.storage_node.ownership import Ownership
from zkv.storage_node.sessions import merge_session_state
from zkv.storage_node.state_machine import KeyTable, KVStateMachine

pytestmark = pytest.mark.unit

RING = RingConfig(1, (0, 1), 16)


def mput(rid: int, items: dict[bytes, bytes], client: bytes = b"c") -> MultiWrite:
    return MultiWrite(client, rid, rid, 1000, MultiKind.PUT, tuple(items), tuple(items.values()))


def mdel(rid: int, keys: list[bytes]) -> MultiWrite:
    return MultiWrite(b"c", rid, rid, 1000, MultiKind.DELETE, tuple(keys))


def keys_of(shard: int, n: int, prefix: str = "k") -> list[bytes]:
    ring = Ring(RING)
    out = [f"{prefix}{i:04d}".encode() for i in range(10 * n)]
    return [k for k in out if ring.shard_for(k) == shard][:n]


# ------------------------------------------------------------------ the command


def test_multi_write_round_trips_through_the_log_encoding() -> None:
    for cmd in (mput(3, {b"a": b"1", b"b": b""}), mdel(4, [b"a", b"zz"])):
        assert decode_command(encode_command(cmd)) == cmd


@pytest.mark.parametrize("bad", [
    [100, b"c", 1, 1, 1, 2, [], []],            # kind
    [100, b"c", 1, 1, 1, 0, [b"a"], []],        # put without its value
    [100, b"c", 1, 1, 1, 1, [b"a"], [b"x"]],    # delete with a value
    [100, "c", 1, 1, 1, 0, [], []],             # client id not bytes
    [100, b"c", 1, 1, 1, 0, ["a"], [b"x"]],     # key not bytes
])
def test_a_malformed_multi_write_is_a_remote_protocol_error(bad: list[object]) -> None:
    import msgpack

    from zkv.protocol.errors import RemoteProtocolError

    with pytest.raises(RemoteProtocolError):
        decode_command(msgpack.packb(bad))


# ------------------------------------------------------------------ apply


def test_a_batch_put_is_one_entry_one_version_for_every_key() -> None:
    sm = KVStateMachine()
    reply = sm.apply(5, encode_command(mput(1, {b"a": b"1", b"b": b"2"})))
    assert reply == MultiReply(1, (b"a", b"b"), (KeyResult(0, True, 5), KeyResult(0, True, 5)))
    assert sm.get(b"a") == (b"1", 5) and sm.get(b"b") == (b"2", 5)
    reply = sm.apply(6, encode_command(mdel(2, [b"a", b"nope"])))
    assert reply == MultiReply(2, (b"a", b"nope"), (KeyResult(0, True, 6), KeyResult(0, False, 0)))
    assert sm.get(b"a") is None and sm.get(b"b") == (b"2", 5)


def test_a_retried_batch_applies_once_and_gets_the_same_results() -> None:
    sm = KVStateMachine()
    first = sm.apply(1, encode_command(mput(7, {b"a": b"1", b"b": b"2"})))
    sm.apply(2, encode_command(PutCommand(b"other", 1, 1, 1000, b"a", b"changed")))
    again = sm.apply(3, encode_command(mput(7, {b"a": b"1", b"b": b"2"})))
    assert again == first
    assert sm.get(b"a") == (b"changed", 2)  # not written again
    single = sm.apply(5, encode_command(PutCommand(b"c", 7, 7, 1000, b"x", b"y")))
    assert isinstance(single, ErrorReply) and single.code == ErrorCode.BAD_REQUEST


def test_a_later_round_writes_only_the_keys_not_yet_written_under_its_request_id() -> None:
    sm = KVStateMachine()
    sm.apply(1, encode_command(mput(7, {b"a": b"1"})))
    sm.apply(2, encode_command(PutCommand(b"other", 1, 1, 1000, b"a", b"changed")))
    reply = sm.apply(3, encode_command(mput(7, {b"b": b"2", b"a": b"1"})))
    assert reply == MultiReply(7, (b"b", b"a"), (KeyResult(0, True, 3), KeyResult(0, True, 1)))
    assert sm.get(b"a") == (b"changed", 2) and sm.get(b"b") == (b"2", 3)


def test_parts_of_one_batch_from_two_shards_stay_written_once_after_a_move() -> None:
    """Shard X wrote key a under request 7, shard Y wrote b under 7; a moves to Y with
    X's sessions: a retry of a (and b) under 7 at Y must write nothing."""
    x, y = KVStateMachine(), KVStateMachine()
    x.apply(1, encode_command(mput(7, {b"a": b"1"})))
    y.apply(1, encode_command(mput(7, {b"b": b"2"})))
    merge_session_state(y.sessions, x.sessions.to_state())
    y.apply(2, encode_command(PutCommand(b"other", 1, 1, 1000, b"b", b"changed")))
    reply = y.apply(3, encode_command(mput(7, {b"a": b"1", b"b": b"2"})))
    assert reply == MultiReply(7, (b"a", b"b"), (KeyResult(0, True, 1), KeyResult(0, True, 1)))
    assert y.get(b"a") is None and y.get(b"b") == (b"changed", 2)


def test_a_batch_with_one_key_not_served_here_applies_nothing() -> None:
    mine, theirs = keys_of(0, 2), keys_of(1, 1)
    sm = KVStateMachine(shard_id=0, ring=RING)
    reply = sm.apply(1, encode_command(mput(1, {mine[0]: b"1", theirs[0]: b"2", mine[1]: b"3"})))
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.WRONG_SHARD
    assert sm.key_count == 0
    # ... and it was not recorded: the same request id with the right keys applies
    reply = sm.apply(2, encode_command(mput(1, {mine[0]: b"1", mine[1]: b"3"})))
    assert isinstance(reply, MultiReply) and sm.key_count == 2


def test_cached_batch_replies_survive_a_snapshot() -> None:
    sm = KVStateMachine()
    first = sm.apply(1, encode_command(mput(9, {b"a": b"1"})))
    restored = KVStateMachine()
    restored.restore(sm.snapshot_bytes())
    assert restored == sm
    assert restored.apply(2, encode_command(mput(9, {b"a": b"1"}))) == first
    assert key_hash(b"a") != key_hash(b"b")


# ------------------------------------------------------------------ the sorted index


def test_sorted_keys_follow_a_table_through_random_changes() -> None:
    rng = random.Random(7)
    table = KeyTable()
    naive: dict[bytes, bytes] = {}
    for step in range(20000):
        key = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3)))
        r = rng.random()
        if r < 0.55:
            table.put(key, b"v", step + 1)
            naive[key] = b"v"
        elif r < 0.8:
            if key in naive:
                del table[key]
                del naive[key]
        elif r < 0.9:
            table.pop(key, None)
            naive.pop(key, None)
        else:
            start = bytes([rng.randrange(256)])
            assert list(table.keys_from(start)) == sorted(k for k in naive if k >= start)
            assert table._index is not None
            table._index.check()
    assert list(table.keys_from(b"")) == sorted(naive)


def test_sorted_keys_keep_their_chunk_rules_through_growth_and_mass_deletes() -> None:
    rng = random.Random(3)
    keys = [b"%08d" % i for i in range(6000)]
    rng.shuffle(keys)
    index = SortedKeys(keys[:1000])
    for k in keys[1000:]:
        index.add(k)
    index.check()
    assert len(index._chunks) >= 6000 // CHUNK_MAX
    for k in keys[:5900]:
        index.remove(k)
    index.check()
    assert list(index.iter_from(b"")) == sorted(keys[5900:])
    assert len(index._chunks) <= 2  # merged as they shrank: no chunk header per key
    index.remove(b"absent")
    assert len(index) == 100


# ------------------------------------------------------------------ reads


def test_multi_get_answers_per_key_with_refusals_and_a_reply_budget() -> None:
    mine, theirs = keys_of(0, 3), keys_of(1, 1)
    sm = KVStateMachine(shard_id=0, ring=RING)
    sm.apply(1, encode_command(mput(1, {mine[0]: b"x" * 10, mine[1]: b"y" * 10})))
    asked = (mine[0], theirs[0], mine[2], mine[1])
    reply = multi_get_reply(5, asked, sm.data, sm.ownership, RING, reply_bytes_max=25)
    assert reply.keys == asked and reply.ring == RING
    assert reply.results == (KeyResult(0, True, 1, b"x" * 10), KeyResult(ErrorCode.WRONG_SHARD),
                             KeyResult(0, False, 0), KeyResult(ErrorCode.UNAVAILABLE))


def _state(shard: int, keys: list[bytes], ring: RingConfig = RING) -> KVStateMachine:
    sm = KVStateMachine(shard_id=None)
    for i, k in enumerate(keys):
        sm.apply(i + 1, encode_command(PutCommand(b"c", i + 1, i + 1, 0, k, b"v" + k)))
    sm.ownership = Ownership(shard, ring)
    return sm


def test_a_scan_page_holds_only_owned_keys_under_the_prefix_in_order() -> None:
    allkeys = sorted(keys_of(0, 20, "p") + keys_of(1, 20, "p") + keys_of(0, 5, "q"))
    sm = _state(0, allkeys)  # holds shard 1's keys too, as a new owner's copies would be
    page = scan_page(1, b"p", None, 100, False, sm.data, sm.ownership, RING)
    assert isinstance(page, ScanReply)
    assert list(page.keys) == sorted(keys_of(0, 20, "p")) and page.next_after is None
    assert list(page.values) == [b"v" + k for k in page.keys]
    page = scan_page(2, b"p", page.keys[4], 3, True, sm.data, sm.ownership, RING)
    assert isinstance(page, ScanReply) and page.values == ()
    assert list(page.keys) == sorted(keys_of(0, 20, "p"))[5:8]
    assert page.next_after == page.keys[-1] and page.epoch == 1


def test_a_scan_page_stops_after_examining_its_bound_and_says_where() -> None:
    sm = _state(0, keys_of(1, 30, "p") + keys_of(0, 3, "p"))
    page = scan_page(1, b"p", None, 100, False, sm.data, sm.ownership, RING, examined_max=10)
    assert isinstance(page, ScanReply)
    examined = sorted(sm.data.keys())[:10]
    assert page.next_after == examined[-1]
    assert list(page.keys) == [k for k in examined if k in set(keys_of(0, 3, "p"))]


def test_a_fenced_key_in_the_range_makes_the_page_unavailable() -> None:
    new = RingConfig(2, (0, 1, 2), 16)
    sm = _state(0, keys_of(0, 40, "p"))
    sm.apply(100, encode_command(Fence(RING, new)))
    assert sm.ownership.fence is not None
    page = scan_page(1, b"p", None, 100, False, sm.data, sm.ownership, RING)
    assert isinstance(page, ErrorReply) and page.code == ErrorCode.UNAVAILABLE


def test_put_reply_type_is_unchanged_for_single_writes() -> None:
    sm = KVStateMachine()
    assert sm.apply(1, encode_command(PutCommand(b"c", 1, 1, 0, b"a", b"1"))) == PutReply(1, 1)
