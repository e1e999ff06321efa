"""The SDK's batches, scans and pipeline over in-memory brokers: rounds that retry only
the keys answered with a retryable code (writes under one request id), errors and
timeouts, scan paging by cursor, the sync pipeline, and the same for asyncio."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.fake_transport import DROP, FakeClock, FakeNet, run_virtual
from zkv.client import AsyncKVClient, KVClient, Timeout, TooLarge
from zkv.client.batch import BatchState
from zkv.protocol.errors import ErrorCode
from zkv.protocol.limits import MULTI_KEYS_MAX
from zkv.protocol.messages import GetRequest, PutRequest
from zkv.protocol.multikey import (
    KeyResult,
    MultiDeleteRequest,
    MultiGetRequest,
    MultiPutRequest,
    MultiReply,
    ScanReply,
    ScanRequest,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


class MultiStore:
    """A hook answering batches and scans from a dict; ``flaky`` keys get ``code`` for
    their first ``times`` rounds (a ring change, an election)."""

    def __init__(self, flaky: set[bytes] = frozenset(),  # type: ignore[assignment]
                 code: int = ErrorCode.WRONG_SHARD, times: int = 1) -> None:
        self.data: dict[bytes, tuple[bytes, int]] = {}
        self.flaky, self.code, self.times = set(flaky), code, times
        self.failed: dict[bytes, int] = {}
        self.requests: list[Any] = []
        self.version = 0
        self.applied: dict[tuple[bytes, int, tuple[bytes, ...]], MultiReply] = {}

    def __call__(self, ident: bytes, msg: Any, seen: int) -> Any:
        if not isinstance(msg, (MultiGetRequest, MultiPutRequest, MultiDeleteRequest,
                                ScanRequest)):
            return None
        self.requests.append(msg)
        if isinstance(msg, ScanRequest):
            keys = sorted(k for k in self.data if k.startswith(msg.prefix)
                          and (msg.after is None or k > msg.after))
            page = keys[:msg.limit]
            more = len(keys) > msg.limit
            return ScanReply(msg.request_id, tuple(page),
                             () if msg.keys_only else tuple(self.data[k][0] for k in page),
                             tuple(self.data[k][1] for k in page),
                             page[-1] if more else None, 1)
        results = []
        for i, k in enumerate(msg.keys):
            if k in self.flaky and self.failed.get(k, 0) < self.times:
                self.failed[k] = self.failed.get(k, 0) + 1
                results.append(KeyResult(self.code))
            elif isinstance(msg, MultiGetRequest):
                found = self.data.get(k)
                results.append(KeyResult(0, found is not None, found[1] if found else 0,
                                         found[0] if found else b""))
            elif isinstance(msg, MultiPutRequest):
                self.version += 1
                self.data[k] = (msg.values[i], self.version)
                results.append(KeyResult(0, True, self.version))
            else:
                results.append(KeyResult(0, self.data.pop(k, None) is not None, 1))
        return MultiReply(msg.request_id, msg.keys, tuple(results))


def client(store: MultiStore, **kw: Any) -> KVClient:
    clock = FakeClock()
    net = FakeNet(clock)
    net.add("fake://b0", store, "b0")
    kw.setdefault("timeout_s", 2.0)
    return KVClient(["fake://b0"], seed=1, connect=net.connect, clock=clock, **kw)


def test_mget_mset_mdelete_round_trip_with_keys_as_given() -> None:
    store = MultiStore()
    with client(store) as kv:
        versions = kv.mset({"a": "1", b"b": b"2"})
        assert set(versions) == {"a", b"b"} and all(v > 0 for v in versions.values())
        assert kv.mget(["a", b"b", "missing"]) == {"a": b"1", b"b": b"2", "missing": None}
        assert kv.mdelete(["a", "missing"]) == {"a": True, "missing": False}
        assert kv.mget([]) == {}


def test_retryable_keys_are_asked_again_alone_and_writes_keep_their_request_id() -> None:
    store = MultiStore(flaky={b"b", b"c"}, code=ErrorCode.NO_LEADER, times=2)
    with client(store) as kv:
        kv.mset({"a": "1", "b": "2", "c": "3"})
        sent = [r for r in store.requests if isinstance(r, MultiPutRequest)]
        assert [r.keys for r in sent] == [(b"a", b"b", b"c"), (b"b", b"c"), (b"b", b"c")]
        assert len({r.request_id for r in sent}) == 1
        store.flaky, store.failed = {b"a"}, {}
        assert kv.mget(["a", "b"]) == {"a": b"1", "b": b"2"}
        gets = [r for r in store.requests if isinstance(r, MultiGetRequest)]
        assert [r.keys for r in gets] == [(b"a", b"b"), (b"a",), (b"a",)]
        assert gets[0].request_id != gets[1].request_id  # reads need no dedup


def test_a_non_retryable_key_error_raises_and_a_stuck_key_times_out() -> None:
    with client(MultiStore(flaky={b"b"}, code=ErrorCode.TOO_LARGE)) as kv, \
            pytest.raises(TooLarge):
        kv.mget(["a", "b"])
    with client(MultiStore(flaky={b"b"}, code=ErrorCode.UNAVAILABLE, times=10**6)) as kv, \
            pytest.raises(Timeout, match="1 keys of the batch"):
        kv.mget(["a", "b"])
    with pytest.raises(TooLarge):
        BatchState.start([b"%d" % i for i in range(MULTI_KEYS_MAX + 1)])
    assert BatchState.start([b"a", b"a", b"b"]).pending == [b"a", b"b"]


def test_scan_pages_follow_the_cursor_to_the_end() -> None:
    store = MultiStore()
    store.data = {b"p%02d" % i: (b"v%d" % i, i) for i in range(25)}
    store.data[b"q"] = (b"x", 1)
    with client(store) as kv:
        page = kv.scan("p", limit=10)
        assert page.keys == [b"p%02d" % i for i in range(10)] and page.cursor == b"p09"
        assert page.items()[0] == (b"p00", b"v0")
        rest = kv.scan("p", limit=10, cursor=page.cursor, keys_only=True)
        assert rest.keys[0] == b"p10" and rest.values == []
        assert [k for k, _ in kv.scan_iter("p", page_size=7)] == sorted(
            k for k in store.data if k.startswith(b"p"))
        with pytest.raises(ValueError):
            kv.scan("p", limit=0)


def test_the_pipeline_sends_a_window_then_collects_in_call_order() -> None:
    dropped: set[int] = set()

    def hook(ident: bytes, msg: Any, seen: int) -> Any:
        if isinstance(msg, GetRequest) and msg.key == b"slow" and seen == 1:
            dropped.add(msg.request_id)
            return DROP  # no answer the first time: retried alone
        return None

    clock = FakeClock()
    net = FakeNet(clock)
    broker = net.add("fake://b0", hook, "b0")
    with KVClient(["fake://b0"], seed=1, connect=net.connect, clock=clock, timeout_s=5) as kv:
        kv.put("slow", "s")
        with kv.pipeline() as p:
            p.put("a", "1")
            p.get("slow")
            p.delete("zz")
            p.cas("a", 0, "x")
            p.get("missing")
        assert len(dropped) == 1
        version, slow, deleted, swapped, missing = p.results
        assert isinstance(version, int) and slow == b"s" and deleted is False
        assert swapped is False and missing is None
        puts = broker.requests(PutRequest)
        assert puts[-1].lowest_pending <= puts[-1].request_id
        with kv.pipeline() as p2:
            p2.cas("a", 12345, "y")
        assert p2.results == [False]


def test_asyncio_batches_and_scans() -> None:
    store = MultiStore(flaky={b"b"}, code=ErrorCode.WRONG_SHARD)

    async def main() -> None:
        net = FakeNet()
        net.add("fake://b0", store, "b0")
        async with AsyncKVClient(["fake://b0"], seed=1, connect=net.connect_async,
                                 timeout_s=2) as kv:
            await kv.mset({"a": "1", "b": "2"})
            sent = [r for r in store.requests if isinstance(r, MultiPutRequest)]
            assert [r.keys for r in sent] == [(b"a", b"b"), (b"b",)]
            assert sent[0].request_id == sent[1].request_id
            assert sent[1].lowest_pending <= sent[1].request_id
            assert await kv.mget(["a", "b", "c"]) == {"a": b"1", "b": b"2", "c": None}
            assert await kv.mdelete(["a"]) == {"a": True}
            page = await kv.scan("", limit=1)
            assert page.keys == [b"b"]
            assert [k async for k, _ in kv.scan_iter("")] == [b"b"]

    run_virtual(main())
