"""LocalCluster layout and cluster.json handling, without starting processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zkv.client.cli import main
from zkv.ops.cluster import ClusterError, LocalCluster, load_or_create_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def test_spec_is_written_then_reused(tmp_path: Path) -> None:
    spec = load_or_create_spec(tmp_path, 2, 3, 1)
    assert [n["id"] for n in spec["nodes"]] == ["s0r0", "s0r1", "s0r2", "s1r0", "s1r1", "s1r2"]
    on_disk = json.loads((tmp_path / "cluster.json").read_text())
    assert on_disk["shards"] == [0, 1] and on_disk["replicas"] == 3
    again = load_or_create_spec(tmp_path, None, None, 2)  # defaults come from the file
    assert again["nodes"] == spec["nodes"] and again["brokers"] == 2


@pytest.mark.parametrize(("shards", "replicas", "word"), [(3, None, "shards"), (None, 5, "replicas")])
def test_spec_mismatch_is_a_clear_error(
    tmp_path: Path, shards: int | None, replicas: int | None, word: str
) -> None:
    load_or_create_spec(tmp_path, 2, 3, 1)
    with pytest.raises(ClusterError, match=word):
        load_or_create_spec(tmp_path, shards, replicas, 1)


def test_vnodes_are_recorded_and_passed_to_every_node(tmp_path: Path) -> None:
    spec = load_or_create_spec(tmp_path, 1, 1, 1, vnodes=64)
    assert spec["vnodes"] == 64
    assert load_or_create_spec(tmp_path, None, None, 1)["vnodes"] == 64
    with pytest.raises(ClusterError, match="64 vnodes per shard, not 1024"):
        load_or_create_spec(tmp_path, None, None, 1, vnodes=1024)
    c = LocalCluster(tmp_path, port=0)
    c._choose_peer_ports()
    argv = c._node_argv({"id": "s0r0", "shard": 0, "replica": 0})
    assert argv[argv.index("--vnodes") + 1] == "64"


def test_a_cluster_file_from_before_vnodes_were_recorded_keeps_256(tmp_path: Path) -> None:
    """Its nodes were started at the old default: a shard added now must match them."""
    spec = load_or_create_spec(tmp_path, 2, 1, 1)
    del spec["vnodes"]
    (tmp_path / "cluster.json").write_text(json.dumps(spec))
    assert load_or_create_spec(tmp_path, None, None, 1)["vnodes"] == 256
    assert json.loads((tmp_path / "cluster.json").read_text())["vnodes"] == 256


def test_cli_reports_mismatch_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load_or_create_spec(tmp_path, 1, 1, 1)
    assert main(["cluster", "up", "--data-dir", str(tmp_path), "--shards", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zkv: error:") and "1 shards, not 2" in err


def test_layout_and_process_flags(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, shards=2, replicas=3, brokers=2, port=6000, fsync="never",
                     heartbeat_ms=50, election_timeout_ms=300)
    assert c.endpoints == ["tcp://127.0.0.1:6000", "tcp://127.0.0.1:6003"]
    assert c.backend_endpoints() == ["tcp://127.0.0.1:6001", "tcp://127.0.0.1:6004"]
    c._choose_peer_ports()
    argv = c._node_argv({"id": "s1r2", "shard": 1, "replica": 2})
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert argv[1:3] == ["-m", "zkv.storage_node.main"]
    assert flags["--node-id"] == "s1r2" and flags["--shard"] == "1"
    assert flags["--data-dir"] == str(tmp_path / "s1r2")
    assert flags["--listen"] == f"tcp://127.0.0.1:{c.peer_ports['s1r2']}"
    assert flags["--peers"] == (f"s1r0=tcp://127.0.0.1:{c.peer_ports['s1r0']},"
                                f"s1r1=tcp://127.0.0.1:{c.peer_ports['s1r1']}")
    assert flags["--brokers"] == "tcp://127.0.0.1:6001,tcp://127.0.0.1:6004"
    assert flags["--shards"] == "0,1" and flags["--fsync"] == "never"
    assert flags["--vnodes"] == "1024"
    assert flags["--heartbeat-ms"] == "50" and flags["--election-timeout-ms"] == "300"
    assert len(set(c.peer_ports.values())) == 6
    b = c._broker_argv(1)
    bflags = dict(zip(b[3::2], b[4::2], strict=False))
    assert b[1:3] == ["-m", "zkv.broker.main"]
    assert bflags["--port"] == "6003" and bflags["--broker-id"] == "b1"


def test_bootstrap_only_when_the_cluster_creates_the_data_dir(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, shards=1, replicas=3, port=0)
    c._choose_peer_ports()
    assert "--bootstrap" in c._node_argv({"id": "s0r0", "shard": 0, "replica": 0})
    (tmp_path / "s0r1").mkdir()
    (tmp_path / "s0r1" / "identity.json").write_text("{}")
    assert "--bootstrap" not in c._node_argv({"id": "s0r1", "shard": 0, "replica": 1})


def test_single_replica_has_no_peers_flag(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, shards=1, replicas=1, port=0)
    c._choose_peer_ports()
    assert "--peers" not in c._node_argv({"id": "s0r0", "shard": 0, "replica": 0})
    assert 20000 <= c.port < 60000


def test_no_port_is_handed_out_twice_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """`zkv cluster up --shards 8` picks 24 peer ports, then a metrics port per process:
    a port picked earlier is free until its node binds it, so a later pick could take it
    again (a node died with "Address already in use" in CI). Forced here by a small range
    (1,000 ports: 200 random picks from it repeat one almost surely without the rule)."""
    from zkv.ops import cluster_spec

    monkeypatch.setattr(cluster_spec, "LISTEN_PORT_MIN", 40000)
    monkeypatch.setattr(cluster_spec, "_ephemeral_low", lambda: 41000)
    monkeypatch.setattr(cluster_spec, "_HANDED_OUT", set())
    spec = {"nodes": []}
    peers = cluster_spec.choose_peer_ports(spec, [f"n{i}" for i in range(24)], "127.0.0.1")
    others = [cluster_spec.free_port("127.0.0.1") for _ in range(176)]
    base = cluster_spec.free_port_block(3, "127.0.0.1")
    chosen = [*peers.values(), *others, base, base + 1, base + 2]
    assert len(set(chosen)) == len(chosen), sorted(chosen)
