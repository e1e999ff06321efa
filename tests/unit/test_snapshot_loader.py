"""A snapshot decoded a slice at a time (``snapshot_loader.py``) is the snapshot
``restore`` decodes in one call: same state, same refusals, bounded work per step."""

from __future__ import annotations

import random

import msgpack
import pytest

from tests.unit.test_state_machine import Driver, _format_2, random_ops
from zkv.protocol.errors import RemoteProtocolError
from zkv.storage_node.commands import encode_command
from zkv.storage_node.snapshot_loader import SnapshotLoader
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.ttl_commands import PutTtlCommand

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000


def _machine() -> KVStateMachine:
    return KVStateMachine(replies_per_client_max=3, clients_max=4, session_ttl_ms=500)


def _load(blob: bytes, records: int) -> tuple[KVStateMachine, int]:
    """The state ``blob`` decodes to, stepping ``records`` keys at a time; and the steps."""
    loader, steps = SnapshotLoader(blob), 0
    while not loader.step(records):
        steps += 1
    machine = _machine()
    machine.adopt(loader.fmt, loader.applied, loader.table, loader.rest)
    return machine, steps + 1


def _with_ttls(seed: int) -> Driver:
    d = Driver(_machine())
    random_ops(d, random.Random(seed), 300)
    for i in range(20):  # keys with deadlines: format 4's last part
        d.apply(encode_command(PutTtlCommand(b"t", 1000 + i, 1000 + i, T0, b"ttl%d" % i,
                                             b"v", T0 + 1000 + i)))
    return d


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("records", [1, 7, 64, 100_000])
def test_a_snapshot_decoded_step_by_step_is_the_one_restore_decodes(seed, records):
    d = _with_ttls(seed)
    blob = d.sm.snapshot_bytes()
    whole = _machine()
    whole.restore(blob)
    stepped, steps = _load(blob, records)
    assert stepped == whole == d.sm
    assert stepped.data_bytes == d.sm.data_bytes
    assert stepped.snapshot_bytes() == blob
    keys = d.sm.key_count
    # every key and every value is a record: the work per step is bounded by the budget
    assert steps >= (2 * keys) // records


def test_a_step_stops_near_its_byte_budget_when_values_are_large():
    d = Driver(_machine())
    for i in range(300):
        d.put(b"k%d" % i, b"v" * 10_000)
    loader, sizes, before = SnapshotLoader(d.sm.snapshot_bytes()), [], 0
    while not loader.step(records=1000, nbytes=50_000):
        sizes.append(loader._unpacker.tell() - before)
        before = loader._unpacker.tell()
    assert len(sizes) >= 300 * 10_000 // 100_000
    # a slice of records is sized from those decoded so far: at most a few over
    assert max(sizes) <= 50_000 + 2 * 10_010


def test_a_format_2_snapshot_decodes_step_by_step():
    d = Driver(_machine())
    random_ops(d, random.Random(3), 300)
    stepped, _ = _load(_format_2(d.sm), 5)
    assert stepped == d.sm


def test_an_empty_snapshot_decodes_in_one_step():
    blob = _machine().snapshot_bytes()
    stepped, steps = _load(blob, 10)
    assert stepped == _machine() and steps == 1


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x90", b"\x95\x02\x00\x90\x90\x92\x00\x90",
     b"\x95\x01\x00\x91\xa1k\x90\x92\x00\x90",
     msgpack.packb([4, 5, [b"k", 7], [b"v" * 9] * 2, [], None, [[], []]]),  # a bad key
     msgpack.packb([4, 5, [b"k"], [b"short"], [], None, [[], []]]),  # no version
     msgpack.packb([4, 5, [b"k", b"j"], [b"v" * 9], [], None, [[], []]]),  # one short
     msgpack.packb([4, -1, [], [], [], None, [[], []]]),  # a negative index
     msgpack.packb([9, 5, [], [], [], None, [[], []]])[:-3],  # cut short
     msgpack.packb([4, 5, [], [], [], None, [[b"k"], [0]]]),  # a deadline of 0
     msgpack.packb([4, 5, [], [], [], None, [[1], [T0]]]),  # a deadline's key not bytes
     msgpack.packb([4, 5, [], [], [], None, [[b"k", b"j"], [T0]]]),  # one short
     msgpack.packb([4, 5, [], [], [], None, [[b"k"]]])],  # no deadlines at all
    ids=["empty", "garbage", "no-parts", "fmt2-short", "fmt1-mismatch", "key-type",
         "no-version", "count-mismatch", "negative", "truncated", "deadline-0",
         "deadline-key-type", "deadline-count", "deadline-part"],
)
def test_a_malformed_snapshot_is_refused_and_the_state_is_untouched(data):
    d = Driver(_machine())
    d.put(b"k", b"v")
    before = d.sm.snapshot_bytes()
    with pytest.raises(RemoteProtocolError):
        loader = SnapshotLoader(data)
        while not loader.step(2):
            pass
        d.sm.adopt(loader.fmt, loader.applied, loader.table, loader.rest)
    assert d.sm.snapshot_bytes() == before


def test_deadlines_decoded_step_by_step_still_come_due_earliest_first():
    """The TTL index is grown by heap pushes a slice at a time: what comes due, and
    in which order, is what the one-call restore gives."""
    d = _with_ttls(5)
    stepped, steps = _load(d.sm.snapshot_bytes(), 3)
    whole = _machine()
    whole.restore(d.sm.snapshot_bytes())
    assert steps > 20 // 3
    assert stepped.expiry.due(T0 + 1010, 100) == whole.expiry.due(T0 + 1010, 100)
    assert stepped.expiry.due(T0 + 1005, 3) == [b"ttl0", b"ttl1", b"ttl2"]
