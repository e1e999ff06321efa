"""The data quota: exact usage accounting and the admission rule (storage_node/quota.py)."""

from __future__ import annotations

import random

import pytest

from zkv.protocol.errors import DiskFull, ErrorCode, QuotaExceeded, error_for_code
from zkv.storage_node.commands import DeleteCommand, PutCommand
from zkv.storage_node.quota import Quota, write_growth_bytes
from zkv.storage_node.state_machine import KeyTable, KVStateMachine


def _naive(table: dict[bytes, tuple[bytes, int]]) -> int:
    return sum(len(k) + len(v[0]) for k, v in table.items())


@pytest.mark.parametrize("seed", range(20))
def test_key_table_size_matches_a_naive_sum(seed: int) -> None:
    rng = random.Random(seed)
    table = KeyTable()
    for i in range(500):
        key = b"k%d" % rng.randrange(40)
        op = rng.random()
        if op < 0.6:
            table[key] = (bytes(rng.randrange(100)), i)
        elif op < 0.8:
            table.pop(key, None)
        elif key in table:
            del table[key]
        assert table.size_bytes == _naive(table)
    assert KeyTable(table.items()).size_bytes == table.size_bytes


def test_usage_survives_snapshot_and_restore() -> None:
    sm = KVStateMachine()
    sm.apply_command(1, PutCommand(b"c", 1, 0, 0, b"alpha", b"12345"))
    sm.apply_command(2, PutCommand(b"c", 2, 0, 0, b"beta", b"1"))
    sm.apply_command(3, DeleteCommand(b"c", 3, 0, 0, b"alpha"))
    assert sm.data_bytes == len(b"beta") + 1
    other = KVStateMachine()
    other.restore(sm.snapshot_bytes())
    assert other.data_bytes == sm.data_bytes


def test_admission_counts_writes_in_flight() -> None:
    q = Quota(max_data_bytes=100)
    assert q.refusal(used_bytes=50, growth_bytes=40) == ""
    q.proposed(7, 40)
    assert "over its quota of 100" in q.refusal(used_bytes=50, growth_bytes=40)
    assert q.refusal(used_bytes=50, growth_bytes=0) == ""  # same-size overwrite
    assert q.refusal(used_bytes=500, growth_bytes=-10) == ""  # shrinking always admitted
    q.applied(7)
    assert q.refusal(used_bytes=50, growth_bytes=40) == ""
    q.proposed(8, 40)
    q.clear()  # a leader change forgets what it had in flight
    assert q.refusal(used_bytes=50, growth_bytes=40) == ""


def test_no_quota_admits_everything() -> None:
    q = Quota()
    assert q.refusal(used_bytes=1 << 40, growth_bytes=1 << 30) == ""


def test_growth_of_a_write() -> None:
    assert write_growth_bytes(b"key", b"12345", None) == 8
    assert write_growth_bytes(b"key", b"12345", (b"123", 4)) == 2
    assert write_growth_bytes(b"key", b"1", (b"123", 4)) == -2


def test_new_codes_map_to_their_exceptions() -> None:
    assert isinstance(error_for_code(ErrorCode.QUOTA_EXCEEDED, "full"), QuotaExceeded)
    assert isinstance(error_for_code(ErrorCode.DISK_FULL, "no space"), DiskFull)
    assert int(ErrorCode.QUOTA_EXCEEDED) == 11 and int(ErrorCode.DISK_FULL) == 12
