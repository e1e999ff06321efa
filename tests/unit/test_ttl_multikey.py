"""Where TTLs meet batches and scans: a batch write ends a key's TTL as a single put
does, and batch reads and scan pages leave out keys expired by the reader's clock
before the sweep has removed them."""

from __future__ import annotations

from zkv.protocol.ring import RingConfig
from zkv.storage_node.multikey_commands import MultiKind, MultiWrite
from zkv.storage_node.multikey_state import multi_get_reply, scan_page
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.ttl_commands import PutTtlCommand

T0 = 1_000_000
RING = RingConfig(1, (0,), 16)


def machine_with_ttl_keys() -> KVStateMachine:
    sm = KVStateMachine(shard_id=0, ring=RING)
    sm.apply_command(1, PutTtlCommand(b"c", 1, 1, T0, b"a", b"va", T0 + 100))
    sm.apply_command(2, PutTtlCommand(b"c", 2, 2, T0, b"b", b"vb", T0 + 100))
    sm.apply_command(3, PutTtlCommand(b"c", 3, 3, T0, b"c", b"vc", T0 + 10_000))
    return sm


def test_a_batch_put_ends_the_ttl_of_the_keys_it_writes() -> None:
    sm = machine_with_ttl_keys()
    sm.apply_command(4, MultiWrite(b"d", 1, 1, T0 + 50, MultiKind.PUT, (b"a",), (b"new",)))
    assert b"a" not in sm.expiry and b"b" in sm.expiry
    assert sm.get_live(b"a", T0 + 500) == (b"new", 4)  # no longer expires
    assert sm.get_live(b"b", T0 + 500) is None


def test_a_batch_delete_of_an_expired_key_finds_nothing() -> None:
    sm = machine_with_ttl_keys()
    reply = sm.apply_command(4, MultiWrite(b"d", 1, 1, T0 + 200, MultiKind.DELETE, (b"a", b"c")))
    existed = [r.found for r in reply.results]  # type: ignore[union-attr]
    assert existed == [False, True]  # "a" expired at T0 + 100, before the batch's stamp
    assert b"a" not in sm.data and b"c" not in sm.data and len(sm.expiry) == 1


def test_batch_reads_and_scans_leave_out_expired_keys_not_yet_swept() -> None:
    sm = machine_with_ttl_keys()
    now = T0 + 500  # "a" and "b" expired, nothing swept

    def expired(key: bytes) -> bool:
        return sm.expiry.expired(key, now)

    got = multi_get_reply(1, (b"a", b"b", b"c"), sm.data, sm.ownership, RING, expired=expired)
    assert [r.found for r in got.results] == [False, False, True]
    page = scan_page(2, b"", None, 10, False, sm.data, sm.ownership, RING, expired=expired)
    assert page.keys == (b"c",)  # type: ignore[union-attr]
    # without a reader's clock (no TTL anywhere) nothing is left out
    page = scan_page(3, b"", None, 10, True, sm.data, sm.ownership, RING)
    assert page.keys == (b"a", b"b", b"c")  # type: ignore[union-attr]
