"""The blake3 virtual-node ring: which shard owns a key.

Each shard places ``vnodes`` tokens at ``blake3(f"{shard_id}:{i}")[:8]`` (big-endian
u64); a key sits at ``blake3(key)[:8]`` and belongs to the shard owning the first token
clockwise (at or after the key's position, wrapping). Ties between tokens (vanishingly
rare) go to the lower shard id so every process computes the same owner.

The ring is pure and immutable; brokers and nodes both build it from a ``RingConfig``
(epoch, shards, vnodes), which is cluster state kept by the storage nodes.

Why 1024 vnodes by default: from the tokens' exact hash-space shares, the worst
max/mean share over 2-64 shards is 1.128 at 512 vnodes (34 shards) but 1.088 at 1024,
within the 1.10 balance bound (tests/unit/test_ring.py). The vnode count is part of the
persisted ring config, so a cluster created with another count keeps it: the default
only applies to a new cluster.

Building hashes every token (65,536 at 64 x 1024): a shard's tokens are memoised
(a pure function of shard and vnodes), so a new epoch's ring, which repeats all but
one shard, hashes only that one; ``python -m bench.ring`` measures build and lookup.

Wire format (one, everywhere a ring travels or is stored: messages, log commands,
snapshots): ``RingConfig.to_wire()`` = ``[epoch, [shard, ...], vnodes]``;
``RingConfig.from_wire`` checks it (ints in range, shards non-empty and distinct,
shards x vnodes within ``limits.RING_TOKENS_MAX``) and raises ``RemoteProtocolError``.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from blake3 import blake3

from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.limits import INT_MAX, RING_TOKENS_MAX, RING_VNODES_MIN

DEFAULT_VNODES = 1024
#: Memoised shards' token lists (each ~40 KB at 1024 vnodes): a few rings' worth.
SHARD_TOKENS_CACHED_MAX = 256


def position(key: bytes) -> int:
    """A key's place on the ring: the first 8 bytes of its blake3 hash."""
    return int.from_bytes(blake3(key).digest(8), "big")


def token(shard_id: int, i: int) -> int:
    return int.from_bytes(blake3(f"{shard_id}:{i}".encode()).digest(8), "big")


@functools.lru_cache(maxsize=SHARD_TOKENS_CACHED_MAX)
def shard_tokens(shard_id: int, vnodes: int) -> tuple[int, ...]:
    """``token(shard_id, i)`` for ``i < vnodes`` (memoised: rings share their shards)."""
    return tuple(
        int.from_bytes(blake3(b"%d:%d" % (shard_id, i)).digest(8), "big") for i in range(vnodes)
    )


@dataclass(frozen=True, slots=True)
class RingConfig:
    epoch: int
    shards: tuple[int, ...]
    vnodes: int = DEFAULT_VNODES

    def as_dict(self) -> dict[str, object]:
        """For people (``zkv status``, JSON); the wire uses ``to_wire``."""
        return {"epoch": self.epoch, "shards": list(self.shards), "vnodes": self.vnodes}

    def to_wire(self) -> list[object]:
        return [self.epoch, list(self.shards), self.vnodes]

    @classmethod
    def from_wire(cls, v: Any) -> RingConfig:
        """The config ``to_wire`` wrote; ``RemoteProtocolError`` on anything else.
        (Arrays may come as tuples: how msgpack reads them with ``use_list=False``.)"""
        if type(v) not in (list, tuple) or len(v) != 3:
            raise RemoteProtocolError("a ring is [epoch, [shard, ...], vnodes]")
        epoch: Any = v[0]
        shards: Any = v[1]
        vnodes: Any = v[2]
        if type(shards) not in (list, tuple) or not shards:
            raise RemoteProtocolError("a ring needs a non-empty list of shards")
        for n in (epoch, vnodes, *shards):
            if type(n) is not int or not 0 <= n <= INT_MAX:
                raise RemoteProtocolError(f"ring field {n!r} is not an int in range")
        if len(set(shards)) != len(shards):
            raise RemoteProtocolError("a ring names a shard twice")
        if vnodes < RING_VNODES_MIN or len(shards) * vnodes > RING_TOKENS_MAX:
            raise RemoteProtocolError(
                f"ring of {len(shards)} shards x {vnodes} vnodes is out of bounds")
        return cls(epoch, tuple(shards), vnodes)


class Ring:
    """Shard lookup over sorted tokens: ``shard_for`` is one hash and one bisect (none
    for a ring of one shard)."""

    __slots__ = ("config", "_tokens", "_owners", "_only")

    def __init__(self, config: RingConfig) -> None:
        if not config.shards:
            raise ValueError("a ring needs at least one shard")
        if config.vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        # Sort plain ints, not (token, shard) tuples (sort + split ~3x faster at 64k): each
        # point is the token shifted left over the shard's index in sorted order, so
        # equal tokens still order by the lower shard id.
        shards = sorted(set(config.shards))
        bits = len(shards).bit_length()
        points = sorted(
            [t << bits | j for j, s in enumerate(shards) for t in shard_tokens(s, config.vnodes)]
        )
        mask = (1 << bits) - 1
        self.config = config
        self._tokens = [p >> bits for p in points]
        self._owners = [shards[p & mask] for p in points]
        #: a ring of one shard owns every key: no hash to compute (1 x N clusters)
        self._only = shards[0] if len(shards) == 1 else None

    @classmethod
    def of(cls, shards: Iterable[int], vnodes: int = DEFAULT_VNODES, epoch: int = 1) -> Ring:
        return cls(RingConfig(epoch, tuple(sorted(set(shards))), vnodes))

    def shard_for(self, key: bytes) -> int:
        if self._only is not None:
            return self._only
        i = bisect.bisect_left(self._tokens, position(key))
        return self._owners[i if i < len(self._owners) else 0]

    def owner_of_position(self, pos: int) -> int:
        i = bisect.bisect_left(self._tokens, pos)
        return self._owners[i if i < len(self._owners) else 0]

    def shares(self) -> dict[int, float]:
        """Fraction of the hash space each shard owns (for ``zkv status``)."""
        space = 1 << 64
        owned = dict.fromkeys(self.config.shards, 0)  # exact, in positions
        prev = self._tokens[-1] - space
        for t, s in zip(self._tokens, self._owners, strict=True):
            owned[s] += t - prev
            prev = t
        return {s: n / space for s, n in owned.items()}

    def boundaries(self) -> list[tuple[int, int]]:
        """``(token, owner)`` pairs in ring order: the owner of every position in
        ``(previous token, token]`` (the first pair also owns past the last token)."""
        return list(zip(self._tokens, self._owners, strict=True))


@dataclass(frozen=True, slots=True)
class Move:
    """Positions in ``(lo, hi]`` (wrapping when ``lo >= hi``) change owner ``src -> dst``."""

    lo: int
    hi: int
    src: int
    dst: int

    @property
    def share(self) -> float:
        return ((self.hi - self.lo) % (1 << 64)) / (1 << 64)


def plan_moves(old: Ring, new: Ring) -> list[Move]:
    """The ranges whose owner differs between ``old`` and ``new``, adjacent ranges with
    the same (src, dst) merged. Pure; cost O(tokens log tokens)."""
    points = sorted({t for t, _ in old.boundaries()} | {t for t, _ in new.boundaries()})
    moves: list[Move] = []
    prev = points[-1]
    for p in points:
        a, b = old.owner_of_position(p), new.owner_of_position(p)
        if a != b:
            last = moves[-1] if moves else None
            if last is not None and last.hi == prev and (last.src, last.dst) == (a, b):
                moves[-1] = Move(last.lo, p, a, b)
            else:
                moves.append(Move(prev, p, a, b))
        prev = p
    return moves
