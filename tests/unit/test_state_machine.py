"""The key-value state machine: semantics, exactly-once retries, snapshots."""

from __future__ import annotations

import random

import msgpack
import pytest
from loguru import logger

from zkv.protocol.errors import ErrorCode, RemoteProtocolError
from zkv.protocol.messages import CasReply, DeleteReply, ErrorReply, PutReply
from zkv.storage_node.commands import (
    NOOP_DATA,
    CasCommand,
    DeleteCommand,
    PutCommand,
    encode_command,
)
from zkv.storage_node.state_machine import KeyTable, KVStateMachine


class Driver:
    """Applies commands at consecutive indexes; each write a fresh request id."""

    def __init__(self, sm: KVStateMachine | None = None) -> None:
        self.sm = sm or KVStateMachine()
        self.index = self.sm.applied_index
        self.rid = 0

    def apply(self, data: bytes):
        self.index += 1
        return self.sm.apply(self.index, data)

    def put(self, key: bytes, value: bytes, client: bytes = b"c", rid: int | None = None,
            lowest: int | None = None, ts: int = 0):  # fmt: skip
        rid = self._rid(rid)
        return self.apply(encode_command(PutCommand(client, rid, lowest or rid, ts, key, value)))

    def delete(self, key: bytes, client: bytes = b"c", rid: int | None = None, ts: int = 0,
               expected: int = 0):  # fmt: skip
        rid = self._rid(rid)
        return self.apply(encode_command(DeleteCommand(client, rid, rid, ts, key, expected)))

    def cas(self, key: bytes, expected: int, value: bytes, client: bytes = b"c",
            rid: int | None = None, ts: int = 0):  # fmt: skip
        rid = self._rid(rid)
        return self.apply(encode_command(CasCommand(client, rid, rid, ts, key, expected, value)))

    def _rid(self, rid: int | None) -> int:
        if rid is None:
            self.rid += 1
            return self.rid
        return rid


def test_semantics_table():
    d = Driver()
    steps = [
        # (operation, expected reply (request id filled in), expected get(b"k") after)
        (lambda: d.put(b"k", b"v1"), lambda r: PutReply(r, 1), (b"v1", 1)),
        (lambda: d.put(b"k", b"v2"), lambda r: PutReply(r, 2), (b"v2", 2)),
        (lambda: d.cas(b"k", 1, b"no"), lambda r: CasReply(r, False, 2), (b"v2", 2)),
        (lambda: d.cas(b"k", 0, b"no"), lambda r: CasReply(r, False, 2), (b"v2", 2)),
        (lambda: d.cas(b"k", 2, b"v3"), lambda r: CasReply(r, True, 5), (b"v3", 5)),
        (lambda: d.delete(b"k"), lambda r: DeleteReply(r, True, 6), None),
        (lambda: d.delete(b"k"), lambda r: DeleteReply(r, False, 0), None),
        (lambda: d.cas(b"k", 5, b"no"), lambda r: CasReply(r, False, 0), None),
        (lambda: d.cas(b"k", 0, b"v4"), lambda r: CasReply(r, True, 9), (b"v4", 9)),
        (lambda: d.put(b"other", b"x"), lambda r: PutReply(r, 10), (b"v4", 9)),
    ]
    for n, (op, reply, after) in enumerate(steps, 1):
        assert op() == reply(n), n
        assert d.sm.get(b"k") == after, n
    assert d.sm.key_count == 2
    assert d.sm.applied_index == 10
    assert d.sm.get(b"missing") is None


def test_conditional_delete_table():
    """A delete with an expected version removes the key only at that version; the
    reply tells deleted, absent (version 0) and mismatch (the current version) apart."""
    d = Driver()
    steps = [
        (lambda: d.put(b"k", b"v1"), lambda r: PutReply(r, 1), (b"v1", 1)),
        (lambda: d.delete(b"k", expected=7), lambda r: DeleteReply(r, False, 1), (b"v1", 1)),
        (lambda: d.put(b"k", b"v2"), lambda r: PutReply(r, 3), (b"v2", 3)),
        (lambda: d.delete(b"k", expected=1), lambda r: DeleteReply(r, False, 3), (b"v2", 3)),
        (lambda: d.delete(b"k", expected=3), lambda r: DeleteReply(r, True, 5), None),
        (lambda: d.delete(b"k", expected=5), lambda r: DeleteReply(r, False, 0), None),
        (lambda: d.delete(b"k", expected=0), lambda r: DeleteReply(r, False, 0), None),
        (lambda: d.put(b"k", b"v3"), lambda r: PutReply(r, 8), (b"v3", 8)),
        (lambda: d.delete(b"k", expected=0), lambda r: DeleteReply(r, True, 9), None),
    ]
    for n, (op, reply, after) in enumerate(steps, 1):
        assert op() == reply(n), n
        assert d.sm.get(b"k") == after, n
    assert d.sm.data_bytes == 0


def test_a_retried_conditional_delete_returns_its_first_reply():
    d = Driver()
    d.put(b"k", b"v", rid=1)
    first = d.delete(b"k", rid=2, expected=9)
    d.put(b"k", b"w", rid=3, lowest=2)  # now at version 3: the retry must not re-decide
    assert d.delete(b"k", rid=2, expected=3) == first == DeleteReply(2, False, 1)
    assert d.sm.get(b"k") == (b"w", 3)


def test_noop_and_garbage_return_none():
    d = Driver()
    errors: list[str] = []
    handler = logger.add(lambda m: errors.append(m.record["message"]), level="ERROR")
    try:
        assert d.apply(NOOP_DATA) is None
        assert d.apply(b"\xc1 not a command") is None
        assert d.apply(b"\x92\x04\xa1x") is None  # op 4 (ring change) is not supported yet
    finally:
        logger.remove(handler)
    assert d.sm.applied_index == 3 and d.sm.key_count == 0
    assert any("log entry 2" in m for m in errors)
    assert d.put(b"k", b"v") == PutReply(1, 4)  # still works


def test_indexes_must_increase():
    d = Driver()
    d.put(b"k", b"v")
    with pytest.raises(AssertionError):
        d.sm.apply(1, NOOP_DATA)


@pytest.mark.parametrize("kind", ["put", "delete", "cas"])
def test_a_retried_write_applies_once(kind):
    d = Driver()
    d.put(b"k", b"v0", client=b"other", rid=1)
    if kind == "put":
        first = d.put(b"k", b"v1", rid=7)
        retry = d.put(b"k", b"v1", rid=7)
    elif kind == "delete":
        first = d.delete(b"k", rid=7)
        d.put(b"k", b"back", client=b"other", rid=2)
        retry = d.delete(b"k", rid=7)
    else:
        first = d.cas(b"k", 1, b"v1", rid=7)
        retry = d.cas(b"k", 1, b"v1", rid=7)
    assert retry == first
    assert d.sm.get(b"k") == {
        "put": (b"v1", 2), "delete": (b"back", 3), "cas": (b"v1", 2)
    }[kind]  # fmt: skip


def test_a_retry_with_different_content_still_gets_the_first_answer():
    d = Driver()
    assert d.put(b"k", b"first", rid=1) == PutReply(1, 1)
    assert d.put(b"k", b"second", rid=1) == PutReply(1, 1)
    assert d.sm.get(b"k") == (b"first", 1)


def test_lowest_pending_prunes_and_an_old_retry_expires():
    d = Driver()
    d.put(b"a", b"1", rid=1, lowest=1)
    d.put(b"b", b"2", rid=2, lowest=1)
    d.put(b"c", b"3", rid=3, lowest=3)  # the client holds answers to 1 and 2
    reply = d.put(b"a", b"again", rid=1, lowest=3)
    assert type(reply) is ErrorReply
    assert (reply.code, reply.request_id) == (ErrorCode.SESSION_EXPIRED, 1)
    assert d.sm.get(b"a") == (b"1", 1)
    assert d.put(b"c", b"3", rid=3, lowest=3) == PutReply(3, 3)


def test_session_bounds_and_expiry_are_enforced():
    sm = KVStateMachine(replies_per_client_max=2, clients_max=2, session_ttl_ms=1000)
    d = Driver(sm)
    for rid in (1, 2, 3):
        d.put(b"k", b"v", rid=rid, lowest=1)
    assert d.put(b"k", b"v", rid=1, lowest=1).code == ErrorCode.SESSION_EXPIRED
    d.put(b"k", b"v", client=b"x", rid=1)
    d.put(b"k", b"v", client=b"y", rid=1)  # evicts c, the least recently active
    assert len(sm.sessions) == 2 and b"c" not in sm.sessions
    d.put(b"k", b"v", client=b"y", rid=2, ts=5000)  # x idle for 5 s: expired
    assert b"x" not in sm.sessions and b"y" in sm.sessions


def random_ops(d: Driver, rng: random.Random, count: int) -> None:
    keys = [b"k%d" % i for i in range(30)]
    for _ in range(count):
        key, client = rng.choice(keys), b"c%d" % rng.randrange(5)
        r = rng.random()
        if r < 0.5:
            d.put(key, rng.randbytes(rng.randrange(10)), client=client, ts=d.index)
        elif r < 0.7:
            d.delete(key, client=client, ts=d.index)
        elif r < 0.95:
            current = d.sm.get(key)
            expected = rng.choice([0, current[1] if current else 0, d.index])
            d.cas(key, expected, b"cas", client=client, ts=d.index)
        else:
            d.apply(NOOP_DATA)


@pytest.mark.parametrize("seed", range(5))
def test_against_a_naive_model(seed):
    rng = random.Random(seed)
    d = Driver()
    model: dict[bytes, tuple[bytes, int]] = {}
    for _ in range(500):
        key = b"k%d" % rng.randrange(10)
        r = rng.random()
        index = d.index + 1
        if r < 0.4:
            value = rng.randbytes(4)
            assert d.put(key, value) == PutReply(d.rid, index)
            model[key] = (value, index)
        elif r < 0.6:
            reply = d.delete(key)
            assert reply == DeleteReply(d.rid, key in model, index if key in model else 0)
            model.pop(key, None)
        else:
            version = model[key][1] if key in model else 0
            expected = version if rng.random() < 0.5 else rng.randrange(index + 1)
            reply = d.cas(key, expected, b"c")
            if expected == version:
                assert reply == CasReply(d.rid, True, index)
                model[key] = (b"c", index)
            else:
                assert reply == CasReply(d.rid, False, version)
        assert all(d.sm.get(k) == model.get(k) for k in (b"k%d" % i for i in range(10)))
    assert d.sm.key_count == len(model)


@pytest.mark.parametrize("seed", range(5))
def test_snapshot_round_trip(seed):
    rng = random.Random(seed)
    d = Driver(KVStateMachine(replies_per_client_max=3, clients_max=4, session_ttl_ms=500))
    random_ops(d, rng, 400)
    restored = KVStateMachine(replies_per_client_max=3, clients_max=4, session_ttl_ms=500)
    restored.restore(d.sm.snapshot_bytes())
    assert restored == d.sm
    assert restored.applied_index == d.sm.applied_index
    assert restored.snapshot_bytes() == d.sm.snapshot_bytes()
    # both replicas go on identically, retries included
    other = Driver(restored)
    other.rid = d.rid
    tail_seed = rng.random()
    random_ops(d, random.Random(tail_seed), 200)
    random_ops(other, random.Random(tail_seed), 200)
    assert restored == d.sm


def test_empty_snapshot_round_trip():
    sm = KVStateMachine()
    restored = KVStateMachine()
    restored.restore(sm.snapshot_bytes())
    assert restored == sm


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\x90", b"\x95\x02\x00\x90\x90\x92\x00\x90",
             b"\x95\x01\x00\x91\xa1k\x90\x92\x00\x90"]
)  # fmt: skip
def test_a_bad_snapshot_is_refused_and_changes_nothing(data):
    d = Driver()
    d.put(b"k", b"v")
    before = d.sm.snapshot_bytes()
    with pytest.raises(RemoteProtocolError):
        d.sm.restore(data)
    assert d.sm.snapshot_bytes() == before


def _format_2(sm: KVStateMachine) -> bytes:
    """The snapshot the previous format wrote: ``(value, version)`` pairs."""
    return msgpack.packb([2, sm.applied_index, list(sm.data.keys()), list(sm.data.values()),
                          sm.sessions.to_state(), sm.ownership.to_state()], use_bin_type=True)


@pytest.mark.parametrize("seed", range(3))
def test_a_format_2_snapshot_still_loads(seed):
    d = Driver(KVStateMachine(replies_per_client_max=3, clients_max=4, session_ttl_ms=500))
    random_ops(d, random.Random(seed), 300)
    restored = KVStateMachine(replies_per_client_max=3, clients_max=4, session_ttl_ms=500)
    restored.restore(_format_2(d.sm))
    assert restored == d.sm
    assert restored.data_bytes == d.sm.data_bytes
    assert restored.snapshot_bytes() == d.sm.snapshot_bytes()


@pytest.mark.parametrize(
    "values", [[b"short"], [5], [(b"v", 1)], [b"v" * 7]], ids=["<8B", "int", "pair", "7B"])
def test_a_format_3_snapshot_with_a_malformed_packed_value_is_refused(values):
    d = Driver()
    d.put(b"k", b"v")
    before = d.sm.snapshot_bytes()
    bad = msgpack.packb([3, 5, [b"k"] * len(values), values, [], None], use_bin_type=True)
    with pytest.raises(RemoteProtocolError):
        d.sm.restore(bad)
    assert d.sm.snapshot_bytes() == before


def test_key_table_keeps_its_byte_count_and_reads_back_pairs():
    t = KeyTable()
    t.put(b"a", b"xyz", 7)
    t[b"bb"] = (b"", 2**40)
    assert t.size_bytes == 1 + 3 + 2
    t.put(b"a", b"x", 9)
    assert t.size_bytes == 1 + 1 + 2
    assert t[b"a"] == (b"x", 9) and t.get(b"bb") == (b"", 2**40) and t.get(b"zz") is None
    assert dict(t.items()) == {b"a": (b"x", 9), b"bb": (b"", 2**40)}
    assert t == {b"a": (b"x", 9), b"bb": (b"", 2**40)} and t != {b"a": (b"x", 9)}
    assert t.pop(b"a") == (b"x", 9) and t.pop(b"a", None) is None
    del t[b"bb"]
    assert t.size_bytes == 0 and len(t) == 0
    with pytest.raises(KeyError):
        t.pop(b"a")
    packed = KeyTable.from_packed((b"k",), (b"value" + (3).to_bytes(8, "little"),))
    assert packed[b"k"] == (b"value", 3) and packed.size_bytes == 6
