"""``zkv cluster up`` stops on SIGTERM even when the handler's exception is lost.

Python runs a signal handler at whatever bytecode the main thread is at; a
``KeyboardInterrupt`` raised while a finalizer (``__del__``) runs is printed as
"Exception ignored" and dropped. The supervisor must still stop: the handler also sets a
flag its loop checks. Here the signal is raised inside a ``__del__``, deterministically.
"""

from __future__ import annotations

import argparse
import gc
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from zkv.ops import cluster_cli

pytestmark = pytest.mark.timeout(30)


class _SignalsInFinalizer:
    def __del__(self) -> None:
        signal.raise_signal(signal.SIGTERM)  # the handler runs here: its raise is dropped


class _FakeCluster:
    """Just what ``run_cli`` touches; ``dead_children`` drops an object whose finalizer
    receives the SIGTERM."""

    def __init__(self, data_dir: Path, **_: Any) -> None:
        self.data_dir = data_dir
        (data_dir / "cluster.json").write_text("{}")
        self.shard_ids = [0]
        self.spec = {"replicas": 1, "brokers": 1}
        self.endpoint = "tcp://127.0.0.1:1"
        self.keys_dir = None
        self.turns = 0
        self.stopped = False

    def start(self) -> None:
        pass

    def wait_ready(self, *_: Any, **__: Any) -> None:
        pass

    def metrics_urls(self) -> dict[str, str]:
        return {}

    def sync_spec(self) -> list[str]:
        return []

    def dead_children(self) -> list[Any]:
        self.turns += 1
        if self.turns == 2:
            _SignalsInFinalizer()  # freed at once: its __del__ gets the signal
            gc.collect()
        return []

    def stop(self) -> None:
        self.stopped = True


def test_a_sigterm_whose_exception_a_finalizer_swallowed_still_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[_FakeCluster] = []

    def factory(data_dir: Path, **kw: Any) -> _FakeCluster:
        made.append(_FakeCluster(Path(data_dir), **kw))
        return made[-1]

    monkeypatch.setattr(cluster_cli, "LocalCluster", factory)
    parser = argparse.ArgumentParser()
    cluster_cli.add_arguments(parser)
    args = parser.parse_args(["--data-dir", str(tmp_path), "--http-port", "0"])
    assert threading.current_thread() is threading.main_thread()
    rc = cluster_cli.run_cli(args)  # before the fix: supervised forever (timeout)
    assert rc == 0
    assert made[0].stopped and made[0].turns == 2
