"""``zkv mget``, ``mset``, ``mdel``, ``scan`` and ``put KEY -`` against an in-memory broker."""

from __future__ import annotations

import io
import sys

import pytest

from tests.support.fake_transport import FakeNet
from tests.unit.test_client_multikey import MultiStore
from zkv.client import KVClient, cli
from zkv.client.cli import main

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]

ENDPOINT = "fake://b0"


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> MultiStore:
    net = FakeNet()
    monkeypatch.setattr(cli, "KVClient", lambda *a, **kw: KVClient(
        *a, connect=net.connect, clock=net.clock, **kw))
    s = MultiStore()
    s.broker = net.add(ENDPOINT, s)  # type: ignore[attr-defined]
    return s


def zkv(*argv: str) -> int:
    return main(["--endpoint", ENDPOINT, "--timeout", "1", *argv])


def test_mset_mget_mdel(store: MultiStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert zkv("mset", "a", "1", "b", "two words") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == ["a", "b"] and "OK version" in out[0]
    assert zkv("mget", "a", "b") == 0
    assert capsys.readouterr().out == "a\t1\nb\ttwo words\n"
    assert zkv("mget", "a", "nope") == 1  # a missing key is a negative answer, like get
    assert capsys.readouterr().out == "a\t1\nnope\t(nil)\n"
    assert zkv("mdel", "a", "nope") == 0
    assert capsys.readouterr().out == "a\tdeleted\nnope\t(not found)\n"
    assert zkv("mset", "a") == 1  # not pairs
    assert "KEY VALUE pairs" in capsys.readouterr().err


def test_scan_prints_keys_in_order_with_a_limit(store: MultiStore,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    store.data = {b"u:%03d" % i: (b"v\n%d" % i, 1) for i in range(150)}
    store.data[b"z"] = (b"\xff", 1)
    assert zkv("scan", "u:") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 150 and lines[0] == "u:000\tv\\n0" and lines[-1].startswith("u:149")
    assert zkv("scan", "u:", "--keys-only", "--limit", "3") == 0
    assert capsys.readouterr().out == "u:000\nu:001\nu:002\n"
    assert zkv("scan", "z") == 0
    assert capsys.readouterr().out == "z\t\\xff\n"
    with pytest.raises(SystemExit):
        zkv("scan", "u:", "--limit", "0")


def test_put_dash_reads_the_value_from_stdin(store: MultiStore, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"line 1\n\x00bin")))
    assert zkv("put", "k", "-") == 0
    assert capsys.readouterr().out == "OK version 1\n"
    assert store.broker.data[b"k"] == (b"line 1\n\x00bin", 1)  # type: ignore[attr-defined]
