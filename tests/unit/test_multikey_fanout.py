"""The broker's fan-out core: batches split per shard and merged per key, scan pages
sent to every shard and merged k-way, pages answered under different rings asked
again, bounds and expiry. Pure: frames in, frames out."""

from __future__ import annotations

import ast
import random
import zlib
from pathlib import Path

import pytest

from zkv.broker.fanout import (
    SCAN_ROUNDS_MAX,
    FanOutTable,
    merge_pages,
    parse_ident,
    part_ident,
    split_keys,
)
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.limits import MULTI_KEYS_MAX
from zkv.protocol.messages import Consistency, ErrorReply
from zkv.protocol.multikey import (
    KeyResult,
    MultiDeleteRequest,
    MultiGetRequest,
    MultiPutRequest,
    MultiReply,
    ScanReply,
    ScanRequest,
)
from zkv.protocol.ring import Ring, RingConfig

pytestmark = pytest.mark.unit

RING = Ring(RingConfig(1, (0, 1, 2), 16))
LEADERS = {0: b"n0", 1: b"n1", 2: b"n2"}
NODE_SHARD = {b"n0": 0, b"n1": 1, b"n2": 2}
CLIENT = b"\x00cli"
KEYS = tuple(f"key-{i}".encode() for i in range(30))


def decode(frames: list[bytes]) -> object:
    return codec.decode(frames)


def answer_multi(node: bytes, frames: list[bytes], store: dict[bytes, bytes]) -> MultiReply:
    req = codec.decode(frames)
    assert isinstance(req, (MultiGetRequest, MultiPutRequest, MultiDeleteRequest))
    assert all(RING.shard_for(k) == NODE_SHARD[node] for k in req.keys)
    results = tuple(KeyResult(0, k in store, 1, store.get(k, b"")) for k in req.keys)
    return MultiReply(req.request_id, req.keys, results)


def test_part_idents_round_trip_and_nothing_else_parses() -> None:
    assert parse_ident(part_ident(7, 3, 2)) == (7, 3, 2)
    assert parse_ident(b"\x00abcd") is None
    assert parse_ident(part_ident(7, 3, 2) + b"x") is None


def test_split_keeps_each_shards_keys_in_request_order() -> None:
    parts = split_keys(KEYS, RING)
    assert sorted(i for p in parts.values() for i in p) == list(range(len(KEYS)))
    for shard, positions in parts.items():
        assert positions == sorted(positions)
        assert all(RING.shard_for(KEYS[i]) == shard for i in positions)


def test_a_batch_read_goes_once_to_each_shard_and_is_merged_in_key_order() -> None:
    table = FanOutTable(1024)
    store = {k: b"v" + k for k in KEYS[::2]}
    req = MultiGetRequest(b"c", 5, KEYS)
    out = table.start(CLIENT, b"", req, 0.0, RING, LEADERS)
    assert out.replies == [] and sorted(n for n, _, _ in out.sends) == [b"n0", b"n1", b"n2"]
    replies = []
    for node, ident, frames in reversed(out.sends):  # any order
        more = table.on_reply(ident, answer_multi(node, frames, store), 0.1, RING, LEADERS)
        replies += more.replies
    (client, frames), = replies
    assert client == CLIENT and len(table) == 0
    reply = decode(frames)
    assert isinstance(reply, MultiReply) and reply.request_id == 5 and reply.keys == KEYS
    assert [r.value if r.found else None for r in reply.results] == [store.get(k) for k in KEYS]


def test_a_write_part_carries_the_clients_ids_and_its_own_values() -> None:
    table = FanOutTable(1024)
    req = MultiPutRequest(b"cid", 9, 4, KEYS, tuple(b"v" + k for k in KEYS))
    out = table.start(CLIENT, b"C", req, 0.0, RING, LEADERS)
    for _node, ident, frames in out.sends:
        assert ident[:1] == b"C"  # the role stamp a secure broker puts before the ident
        part = codec.decode(frames)
        assert isinstance(part, MultiPutRequest)
        assert (part.client_id, part.request_id, part.lowest_pending) == (b"cid", 9, 4)
        assert part.values == tuple(b"v" + k for k in part.keys)


def test_a_shard_without_leader_or_failing_answers_per_key_the_others_succeed() -> None:
    table = FanOutTable(1024)
    leaders = {0: b"n0", 1: b"n1"}  # shard 2 has none
    out = table.start(CLIENT, b"", MultiDeleteRequest(b"c", 1, 1, KEYS), 0.0, RING, leaders)
    assert len(out.sends) == 2
    done = []
    for node, ident, frames in out.sends:
        reply = (ErrorReply(1, ErrorCode.NOT_LEADER, "x", "n1b") if node == b"n1"
                 else answer_multi(node, frames, {}))
        done += table.on_reply(ident, reply, 0.0, RING, leaders).replies
    reply = decode(done[0][1])
    assert isinstance(reply, MultiReply)
    expect = {0: 0, 1: ErrorCode.NOT_LEADER, 2: ErrorCode.NO_LEADER}
    assert [r.code for r in reply.results] == [expect[RING.shard_for(k)] for k in KEYS]


def test_late_repeated_and_unknown_part_replies_are_dropped() -> None:
    table = FanOutTable(1024)
    out = table.start(CLIENT, b"", MultiGetRequest(b"c", 1, KEYS), 0.0, RING, LEADERS)
    node, ident, frames = out.sends[0]
    reply = answer_multi(node, frames, {})
    assert table.on_reply(ident, reply, 0.0, RING, LEADERS).replies == []
    assert table.on_reply(ident, reply, 0.0, RING, LEADERS).replies == []  # repeated
    assert table.on_reply(part_ident(999, 0, 0), reply, 0.0, RING, LEADERS).replies == []
    assert table.on_reply(b"junk", reply, 0.0, RING, LEADERS).replies == []
    assert len(table) == 1


def test_an_unanswered_fan_out_expires_with_timeout_for_the_missing_keys() -> None:
    table = FanOutTable(1024, timeout_s=2.0)
    out = table.start(CLIENT, b"", MultiGetRequest(b"c", 1, KEYS), 0.0, RING, LEADERS)
    node, ident, frames = out.sends[0]
    table.on_reply(ident, answer_multi(node, frames, {}), 0.5, RING, LEADERS)
    assert table.expire(1.9).replies == []
    (client, frames2), = table.expire(2.0).replies
    reply = decode(frames2)
    assert isinstance(reply, MultiReply) and len(table) == 0 and table.expired == 1
    answered = {k for k in KEYS if RING.shard_for(k) == NODE_SHARD[node]}
    assert [r.code for r in reply.results] == [0 if k in answered else ErrorCode.TIMEOUT
                                               for k in KEYS]


def test_bounds_answer_at_once() -> None:
    table = FanOutTable(8, pending_max=1)
    too_many = MultiGetRequest(b"c", 1, tuple(b"%d" % i for i in range(MULTI_KEYS_MAX + 1)))
    long_key = MultiGetRequest(b"c", 2, (b"k" * 9,))
    no_ring = MultiGetRequest(b"c", 3, (b"k",))
    bad_limit = ScanRequest(b"c", 4, b"", None, 0)
    codes = []
    for req, ring in ((too_many, RING), (long_key, RING), (no_ring, None), (bad_limit, RING)):
        (_, frames), = table.start(CLIENT, b"", req, 0.0, ring, LEADERS).replies
        reply = decode(frames)
        assert isinstance(reply, ErrorReply)
        codes.append(reply.code)
    assert codes == [ErrorCode.TOO_LARGE, ErrorCode.TOO_LARGE, ErrorCode.NO_LEADER,
                     ErrorCode.BAD_REQUEST]
    table.start(CLIENT, b"", MultiGetRequest(b"c", 5, (b"k",)), 0.0, RING, LEADERS)
    (_, frames), = table.start(CLIENT, b"", MultiGetRequest(b"c", 6, (b"k",)), 0.0, RING,
                               LEADERS).replies
    busy = decode(frames)
    assert isinstance(busy, ErrorReply) and busy.code == ErrorCode.UNAVAILABLE


def test_held_bytes_are_bounded_and_released() -> None:
    table = FanOutTable(1024, held_bytes_max=100)
    big = MultiPutRequest(b"c", 1, 1, (b"k",), (b"v" * 200,))
    out = table.start(CLIENT, b"", big, 0.0, RING, LEADERS)
    assert table.held_bytes == 201
    (_, frames), = table.start(CLIENT, b"", MultiGetRequest(b"c", 2, (b"k",)), 0.0, RING,
                               LEADERS).replies
    busy = decode(frames)
    assert isinstance(busy, ErrorReply) and busy.code == ErrorCode.UNAVAILABLE
    (node, ident, frames), = out.sends
    table.on_reply(ident, answer_multi(node, frames, {}), 0.0, RING, LEADERS)
    assert table.held_bytes == 0 and len(table) == 0
    table.start(CLIENT, b"", MultiGetRequest(b"c", 3, KEYS), 0.0, RING, LEADERS)
    assert table.held_bytes > 0
    table.expire(10.0)
    assert table.held_bytes == 0
    table.start(CLIENT, b"", MultiGetRequest(b"c", 4, KEYS), 0.0, RING, {})  # no leaders
    assert table.held_bytes == 0 and len(table) == 0


def test_stale_batch_reads_spread_over_replicas() -> None:
    table = FanOutTable(1024)
    replicas = {s: (b"r%da" % s, b"r%db" % s) for s in range(3)}
    req = MultiGetRequest(b"c", 1, KEYS, Consistency.STALE)
    out = table.start(CLIENT, b"", req, 0.0, RING, LEADERS, replicas)
    assert all(n in replicas[s] for s in range(3) for n, _, _ in out.sends
               if n.startswith(b"r%d" % s))
    assert not any(n in LEADERS.values() for n, _, _ in out.sends)


# ------------------------------------------------------------------ scans


def page(keys: list[bytes], next_after: bytes | None, epoch: int = 1,
         ring: RingConfig = RING.config) -> ScanReply:
    return ScanReply(1, tuple(keys), tuple(b"v" + k for k in keys), tuple(1 for _ in keys),
                     next_after, epoch, ring)


def naive_scan(shards: list[list[bytes]], limit: int, page_fn: object) -> list[bytes]:
    """Page through ``shards`` (each a shard's sorted keys) by the merge rule."""
    out: list[bytes] = []
    after: bytes | None = None
    for _ in range(10_000):
        pages = [page_fn(s, after) for s in shards]  # type: ignore[operator]
        keys, _values, _versions, after = merge_pages(pages, limit)
        out += keys
        if after is None:
            return out
    raise AssertionError("the scan did not end")


@pytest.mark.parametrize("seed", range(40))
def test_paging_across_shard_boundaries_returns_every_key_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    universe = sorted({bytes(rng.randrange(97, 100) for _ in range(rng.randrange(1, 5)))
                       for _ in range(rng.randrange(0, 80))})
    nshards = rng.randrange(1, 5)
    shards = [[k for k in universe if zlib.crc32(k) % nshards == s] for s in range(nshards)]
    limit = rng.randrange(1, 10)
    shard_limit = rng.randrange(1, 10)  # a shard's page may also end early (bytes, work)

    def page_fn(keys: list[bytes], after: bytes | None) -> ScanReply:
        rest = [k for k in keys if after is None or k > after]
        if rng.random() < 0.3 and len(rest) > 1:  # stopped by its examined bound
            cut = rng.randrange(1, len(rest))
            # it looked past its last owned key (at a key it does not own), not further
            return page(rest[:cut], rest[cut - 1] + b"\x00")
        taken = rest[:shard_limit]
        return page(taken, taken[-1] if len(rest) > shard_limit else None)

    assert naive_scan(shards, limit, page_fn) == universe


def test_merge_keeps_only_keys_up_to_the_smallest_cursor() -> None:
    keys, values, versions, nxt = merge_pages(
        [page([b"a", b"c", b"e"], b"e"), page([b"b", b"f"], None), page([b"d"], b"d")], 10)
    assert keys == [b"a", b"b", b"c", b"d"] and nxt == b"d"
    assert values == [b"va", b"vb", b"vc", b"vd"] and versions == [1, 1, 1, 1]
    keys, _, _, nxt = merge_pages([page([b"a", b"c"], None), page([b"b"], None)], 2)
    assert keys == [b"a", b"b"] and nxt == b"b"
    keys, _, _, nxt = merge_pages([page([], None), page([], None)], 2)
    assert keys == [] and nxt is None


def _scan(table: FanOutTable, ring: Ring = RING) -> list[tuple[bytes, bytes, list[bytes]]]:
    out = table.start(CLIENT, b"", ScanRequest(b"c", 1, b"", None, 5), 0.0, ring, LEADERS)
    assert out.replies == []
    return out.sends


def test_a_scan_page_asks_every_shard_and_merges_their_pages() -> None:
    table = FanOutTable(1024)
    sends = _scan(table)
    assert sorted(n for n, _, _ in sends) == [b"n0", b"n1", b"n2"]
    shard_keys = {b"n0": [b"a", b"d"], b"n1": [b"b"], b"n2": [b"c", b"e", b"f"]}
    replies = []
    for node, ident, frames in sends:
        assert isinstance(codec.decode(frames), ScanRequest)
        replies += table.on_reply(ident, page(shard_keys[node], None), 0.0, RING,
                                  LEADERS).replies
    reply = decode(replies[0][1])
    assert isinstance(reply, ScanReply)
    assert reply.keys == (b"a", b"b", b"c", b"d", b"e") and reply.next_after == b"e"


def test_a_page_answered_under_two_rings_is_asked_again_under_the_newest() -> None:
    table = FanOutTable(1024)
    sends = _scan(table)
    new = RingConfig(2, (0, 1, 2, 3), 16)
    out_replies = []
    resent = []
    for i, (_node, ident, _frames) in enumerate(sends):
        reply = page([], None, 2, new) if i == 0 else page([], None)  # one shard flipped
        got = table.on_reply(ident, reply, 0.0, Ring(new), {**LEADERS, 3: b"n3"})
        out_replies += got.replies
        resent += got.sends
    assert out_replies == [] and table.scan_rounds == 1
    assert sorted(n for n, _, _ in resent) == [b"n0", b"n1", b"n2", b"n3"]
    # a late answer of the first round is dropped
    assert table.on_reply(sends[0][1], page([], None), 0.0, RING, LEADERS).replies == []
    done = []
    for _node, ident, _frames in resent:
        done += table.on_reply(ident, page([], None, 2, new), 0.0, Ring(new),
                               {**LEADERS, 3: b"n3"}).replies
    reply = decode(done[0][1])
    assert isinstance(reply, ScanReply) and reply.epoch == 2


def test_a_page_whose_shards_are_not_the_rings_is_asked_again_then_refused() -> None:
    table = FanOutTable(1024)
    sends = _scan(table)
    wider = RingConfig(1, (0, 1, 2, 3), 16)  # every answer names a shard we did not ask
    for _ in range(SCAN_ROUNDS_MAX + 1):
        nxt = []
        replies = []
        for _node, ident, _frames in sends:
            got = table.on_reply(ident, page([], None, 1, wider), 0.0, RING, LEADERS)
            nxt += got.sends
            replies += got.replies
        sends = nxt
    reply = decode(replies[0][1])
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNAVAILABLE


def test_a_scan_part_error_or_a_missing_leader_fails_the_page() -> None:
    table = FanOutTable(1024)
    (_, frames), = table.start(CLIENT, b"", ScanRequest(b"c", 3, b"", None, 5), 0.0, RING,
                               {0: b"n0"}).replies
    reply = decode(frames)
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.NO_LEADER
    sends = _scan(table)
    (_, frames), = table.on_reply(sends[1][1], ErrorReply(1, ErrorCode.UNAVAILABLE, "fenced"),
                                  0.0, RING, LEADERS).replies
    reply = decode(frames)
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNAVAILABLE
    assert len(table) == 0


def test_the_fanout_core_is_pure() -> None:
    import zkv.broker.fanout as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom)}
    assert not names & {"zmq", "time", "asyncio", "threading", "socket", "random"}
