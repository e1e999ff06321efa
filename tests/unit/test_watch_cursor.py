"""The client's watch cursor: tokens, dedup of repeated or stale replies, resume in the
middle of a batch, compaction, shards joining and leaving."""

from __future__ import annotations

import random

import pytest

from zkv.client.watch import WatchCursor, format_token, parse_token
from zkv.protocol.watch import WATCH_FROM_NOW, WatchCompacted, WatchEvent, WatchReply
from zkv.storage_node.watch_history import PUT, WatchHistory

pytestmark = pytest.mark.unit


def reply(shard: int, events: list[tuple[int, bytes]], revision: int) -> WatchReply:
    return WatchReply(1, shard, tuple(WatchEvent(r, PUT, k, b"", r) for r, k in events),
                      revision)


def test_tokens_round_trip_and_bad_ones_are_refused() -> None:
    pos = {0: (17, 0), 3: (9, 2)}
    assert format_token(pos) == "0:17,3:9+2" and parse_token("0:17,3:9+2") == pos
    assert parse_token("") == {}
    for bad in ("x", "0:-1", "a:1", "0"):
        with pytest.raises(ValueError):
            parse_token(bad)


def test_from_now_then_events_and_repeats_are_dropped() -> None:
    c = WatchCursor(b"p")
    c.set_shards((0,))
    assert c.request(b"c", 1, 0).after == WATCH_FROM_NOW
    assert c.absorb(reply(0, [], 10)) == [] and c.token() == "0:10"
    r = reply(0, [(11, b"p1"), (12, b"p2")], 12)
    assert [e.key for e in c.absorb(r)] == [b"p1", b"p2"]
    assert c.absorb(r) == []  # the same reply again (a resent poll): nothing new
    assert c.absorb(reply(0, [(11, b"p1")], 11)) == []  # stale
    assert c.token() == "0:12"


def test_a_token_from_the_middle_of_a_batch_resumes_exactly() -> None:
    c = WatchCursor(b"p", start="0:4")
    c.set_shards((0,))
    evs = c.absorb(reply(0, [(5, b"pa"), (5, b"pb"), (5, b"pc"), (6, b"pd")], 6))
    assert [e.token for e in evs] == ["0:4+1", "0:4+2", "0:5", "0:6"]
    again = WatchCursor(b"p", start=evs[1].token)
    again.set_shards((0,))
    assert again.request(b"c", 1, 0).after == 4
    rest = again.absorb(reply(0, [(5, b"pa"), (5, b"pb"), (5, b"pc"), (6, b"pd")], 6))
    assert [e.key for e in rest] == [b"pc", b"pd"]


def test_compacted_names_the_token_to_restart_from() -> None:
    c = WatchCursor(b"p", start="0:3,1:7")
    c.set_shards((0, 1))
    with pytest.raises(WatchCompacted) as err:
        c.absorb(WatchReply(1, 1, (), 40, compacted=True))
    assert err.value.token == "0:3,1:40"


def test_shards_joining_start_at_their_beginning_and_leaving_are_dropped() -> None:
    c = WatchCursor(b"p")
    c.set_shards((0,))
    c.absorb(reply(0, [], 5))
    c.set_shards((0, 1))
    assert c.request(b"c", 1, 1).after == 0
    c.set_shards((1,))
    assert c.token() == "1:0" and c.absorb(reply(0, [(6, b"p")], 6)) == []


@pytest.mark.parametrize("seed", range(4))
def test_resume_from_every_event_token_gives_exactly_the_rest(seed: int) -> None:
    """Against a real history with batches: from each event's token, paging with random
    limits and stale repeats, the events that follow are exactly the rest."""
    rng = random.Random(seed)
    h = WatchHistory()
    rev = 0
    for _ in range(60):
        rev += 1
        for _ in range(rng.choice((1, 1, 3))):
            h.record(rev, PUT, rng.choice((b"p/a", b"p/b", b"q")), b"", rev)

    def run(start: str) -> list[tuple[int, bytes]]:
        c = WatchCursor(b"p/", start=start)
        c.set_shards((0,))
        got: list[tuple[int, bytes]] = []
        last = None
        while True:
            after = c.request(b"c", 1, 0).after
            evs, covered = h.poll(after, b"p/", False, rev, rng.randint(1, 4), 10**6)
            r = WatchReply(1, 0, tuple(WatchEvent(*e) for e in evs), covered)
            got += [(e.revision, e.key) for e in c.absorb(r)]
            if last is not None and rng.random() < 0.3:
                got += [(e.revision, e.key) for e in c.absorb(last)]  # a stale repeat
            last = r
            if covered == rev and after == rev:
                return got

    full = WatchCursor(b"p/", start="0:0")
    full.set_shards((0,))
    evs, _ = h.poll(0, b"p/", False, rev, 10**6, 10**9)
    all_events = full.absorb(WatchReply(1, 0, tuple(WatchEvent(*e) for e in evs), rev))
    expected = [(e.revision, e.key) for e in all_events]
    assert run("0:0") == expected
    for i, e in enumerate(all_events):
        assert run(e.token) == expected[i + 1:]
