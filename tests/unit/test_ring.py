"""The blake3 vnode ring: balance and movement over 1,000,000 keys, and a property test
against a naive linear-scan ring.

Issue 4 asks for max/mean keys per shard <= 1.10 for 2..16 shards at 256 vnodes. With
the exact token formula the hash-space share is 1.111 (15 shards) and 1.107 (16 shards)
max/mean, so those two cannot meet the bound at the default vnode count: the bound is
asserted for every shard count that meets it, and
``test_balance_spec_conflict_15_and_16_shards`` records the measured figures for the
others (a spec conflict reported to the lead; the default is deliberately unchanged).
"""

from __future__ import annotations

import bisect
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zkv.protocol.ring import DEFAULT_VNODES, Ring, plan_moves, position, token

KEYS = 1_000_000
BALANCE_MAX = 1.10
MOVE_SLACK = 1.1
#: Shard counts whose exact hash-space share exceeds 1.10 at 256 vnodes (see docstring).
OVER_BOUND = (15, 16)


@pytest.fixture(scope="module")
def positions() -> list[int]:
    return sorted(position(f"key-{i}".encode()) for i in range(KEYS))


def _counts(ring: Ring, pos: list[int]) -> dict[int, int]:
    """Keys per shard, counted per token interval with two bisects (no per-key lookup)."""
    counts = dict.fromkeys(ring.config.shards, 0)
    bounds = ring.boundaries()
    prev = 0
    for t, owner in bounds:
        hi = bisect.bisect_right(pos, t)
        counts[owner] += hi - prev
        prev = hi
    counts[bounds[0][1]] += len(pos) - prev  # past the last token: wraps to the first
    return counts


def _moved_to_new_shard(n: int, vnodes: int, positions: list[int]) -> int:
    """Keys that change owner when shard ``n`` joins shards ``0..n-1``; asserts every
    moving range goes to the new shard."""
    moved = 0
    for m in plan_moves(Ring.of(range(n), vnodes), Ring.of(range(n + 1), vnodes)):
        assert m.dst == n, f"a range moved {m.src} -> {m.dst}, not to the new shard"
        if m.lo < m.hi:
            moved += bisect.bisect_right(positions, m.hi) - bisect.bisect_right(positions, m.lo)
        else:
            moved += len(positions) - bisect.bisect_right(positions, m.lo)
            moved += bisect.bisect_right(positions, m.hi)
    return moved


def _balance(n: int, pos: list[int]) -> float:
    counts = _counts(Ring.of(range(n)), pos)
    return max(counts.values()) / (len(pos) / n)


@pytest.mark.parametrize("n", [n for n in range(2, 17) if n not in OVER_BOUND])
def test_balance_within_bound(n: int, positions: list[int]) -> None:
    ratio = _balance(n, positions)
    assert ratio <= BALANCE_MAX, f"{n} shards: max/mean {ratio:.4f}"


def test_balance_spec_conflict_15_and_16_shards(positions: list[int]) -> None:
    """Documents, does not hide: measured max/mean over 1,000,000 keys for the shard
    counts whose exact share is above 1.10 at 256 vnodes (measured 1.1118 and 1.1071).
    Asserts the figures stay where they were measured, so a ring change shows here."""
    measured = {n: _balance(n, positions) for n in OVER_BOUND}
    exact = {n: max(Ring.of(range(n)).shares().values()) * n for n in OVER_BOUND}
    print(f"\nmax/mean keys per shard at {DEFAULT_VNODES} vnodes: "
          + ", ".join(f"{n} shards {measured[n]:.4f} (hash share {exact[n]:.4f})"
                      for n in OVER_BOUND))
    for n in OVER_BOUND:
        assert BALANCE_MAX < measured[n] < 1.13, (n, measured[n])
        assert abs(measured[n] - exact[n]) < 0.01


@pytest.mark.parametrize("n", range(2, 16))
def test_adding_a_shard_moves_little_and_only_to_it(n: int, positions: list[int]) -> None:
    moved = _moved_to_new_shard(n, DEFAULT_VNODES, positions)
    ideal = len(positions) / (n + 1)
    assert moved <= MOVE_SLACK * ideal, f"{n}->{n + 1}: moved {moved}, ideal {ideal:.0f}"


def test_plan_moves_matches_per_key_owners() -> None:
    old, new = Ring.of([0, 1, 2], vnodes=32), Ring.of([0, 2, 3], vnodes=32)
    moves = plan_moves(old, new)
    for i in range(5000):
        key = f"k{i}".encode()
        p = position(key)
        a, b = old.shard_for(key), new.shard_for(key)
        hits = [m for m in moves if (m.lo < p <= m.hi) or (m.lo >= m.hi and (p > m.lo or p <= m.hi))]
        if a == b:
            assert not hits
        else:
            assert [(m.src, m.dst) for m in hits] == [(a, b)]


# --------------------------------------------------------------------------- property


def naive_owner(shards: list[int], vnodes: int, key: bytes) -> int:
    """Linear scan: the smallest token at or after the key's position, else the smallest
    token overall; equal tokens go to the lower shard id."""
    p = position(key)
    best: tuple[int, int] | None = None
    first: tuple[int, int] | None = None
    for s in shards:
        for i in range(vnodes):
            cand = (token(s, i), s)
            if first is None or cand < first:
                first = cand
            if cand[0] >= p and (best is None or cand < best):
                best = cand
    assert first is not None
    return (best or first)[1]


@settings(max_examples=60, deadline=None)
@given(
    shards=st.sets(st.integers(0, 1000), min_size=1, max_size=6),
    vnodes=st.integers(1, 12),
    keys=st.lists(st.binary(max_size=24), min_size=1, max_size=30),
)
def test_ring_matches_naive_linear_scan(shards: set[int], vnodes: int, keys: list[bytes]) -> None:
    ring = Ring.of(shards, vnodes)
    for key in keys:
        assert ring.shard_for(key) == naive_owner(sorted(shards), vnodes, key)


def test_ring_matches_naive_on_random_seeds() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        shards = rng.sample(range(64), rng.randint(1, 8))
        vnodes = rng.randint(1, 16)
        ring = Ring.of(shards, vnodes)
        for _ in range(50):
            key = rng.randbytes(rng.randint(0, 16))
            assert ring.shard_for(key) == naive_owner(sorted(shards), vnodes, key)


def test_512_vnodes_would_meet_both_bounds(positions: list[int]) -> None:
    """The option offered to the issue author for the 15/16-shard conflict: the same
    token formula at 512 vnodes per shard meets the balance bound for 2..16 shards
    (measured max 1.0807) and the movement bound (measured max 1.0629 x ideal). The
    default stays 256 as the issue prescribes until the author decides."""
    vnodes = 512
    for n in range(2, 17):
        counts = _counts(Ring.of(range(n), vnodes), positions)
        assert max(counts.values()) / (len(positions) / n) <= BALANCE_MAX, n
    for n in range(2, 16):
        moved = _moved_to_new_shard(n, vnodes, positions)
        assert moved <= MOVE_SLACK * len(positions) / (n + 1), n
