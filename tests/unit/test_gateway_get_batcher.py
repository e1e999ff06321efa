"""The gateway's GET batcher: one loop turn's GETs leave as one batch, with the
answers (and errors) each GET would have had alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from zkv.client.calls import Limits
from zkv.gateway.get_batcher import GetBatcher
from zkv.protocol.errors import TooLarge, Unavailable
from zkv.protocol.limits import VALUE_BYTES_MAX
from zkv.protocol.messages import Consistency


class FakeKV:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.data = {b"a": (b"1", 3), b"b": (b"2", 5)}
        self.limits = Limits(16, VALUE_BYTES_MAX)
        self.calls: list[tuple[str, Any, Any]] = []
        self.fail = fail

    async def get_versioned(self, key: bytes, consistency: Any = None) -> Any:
        self.calls.append(("get", key, consistency))
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return self.data.get(key)

    async def mget_versioned(self, keys: list[bytes], consistency: Any = None) -> Any:
        self.calls.append(("mget", tuple(keys), consistency))
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return {k: self.data.get(k) for k in keys}


def _run(kv: FakeKV, *gets: tuple[Any, Any]) -> tuple[list[Any], GetBatcher]:
    batcher = GetBatcher(lambda: kv)  # type: ignore[arg-type, return-value]

    async def main() -> list[Any]:
        return await asyncio.gather(*(batcher.get_versioned(k, c) for k, c in gets),
                                    return_exceptions=True)

    return asyncio.run(main()), batcher


def test_one_turns_gets_leave_as_one_batch_per_level_and_a_lone_get_as_a_get() -> None:
    kv = FakeKV()
    got, b = _run(kv, ("a", None), (b"b", None), ("zz", None), ("a", None),
                  ("b", Consistency.STALE))
    assert got == [(b"1", 3), (b"2", 5), None, (b"1", 3), (b"2", 5)]
    assert sorted(kv.calls, key=str) == [("get", b"b", Consistency.STALE),
                                         ("mget", (b"a", b"b", b"zz"), None)]
    assert (b.batches, b.singles) == (1, 1)


def test_a_refused_key_fails_alone_and_a_batch_error_reaches_every_get() -> None:
    kv = FakeKV()
    got, _ = _run(kv, ("a", None), ("x" * 17, None), ("b", None))
    assert isinstance(got[1], TooLarge)
    assert got[0] == (b"1", 3) and got[2] == (b"2", 5)
    assert kv.calls == [("mget", (b"a", b"b"), None)]
    kv = FakeKV(fail=Unavailable("no leader"))
    got, _ = _run(kv, ("a", None), ("b", None), ("c", None))
    assert all(isinstance(g, Unavailable) for g in got)


def test_batches_are_bounded_and_later_turns_batch_again() -> None:
    kv = FakeKV()
    batcher = GetBatcher(lambda: kv, max_batch=2)  # type: ignore[arg-type, return-value]

    async def main() -> None:
        first = await asyncio.gather(*(batcher.get_versioned(k) for k in "abcde"))
        assert first == [(b"1", 3), (b"2", 5), None, None, None]
        assert await batcher.get_versioned("a") == (b"1", 3)

    asyncio.run(main())
    assert [c[:2] for c in kv.calls] == [("mget", (b"a", b"b")), ("mget", (b"c", b"d")),
                                         ("get", b"e"), ("get", b"a")]


def test_a_cancelled_get_does_not_disturb_the_others() -> None:
    kv = FakeKV()
    batcher = GetBatcher(lambda: kv)  # type: ignore[arg-type, return-value]

    async def main() -> Any:
        t1 = asyncio.ensure_future(batcher.get_versioned("a"))
        t2 = asyncio.ensure_future(batcher.get_versioned("b"))
        await asyncio.sleep(0)
        t1.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t1
        return await t2

    assert asyncio.run(main()) == (b"2", 5)
