"""Found while testing watch (issue 15, item 2), present on main before it (commit
9ab0cdc): a synchronous client whose deadline is at most its attempt timeout (default
``min(1 s, timeout)``, so any ``timeout_s <= 1``) never leaves a dead broker. Each call's
one attempt ends in silence at the deadline; ``retry.decide`` then answers FAIL (rule 7,
deadline) before the SWITCH it would have made, so ``KVClient._endpoint_index`` stays on
the dead broker and every later call fails the same way (writers with 0.8 s deadlines
failed every put for 45 s after a broker SIGKILL). Fixed: a call that gives up where it
would have switched names the next broker, and the next call goes there
(``client/retry.py``, rule 7)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from zkv.client import KVClient
from zkv.ops.cluster import LocalCluster
from zkv.protocol.errors import KVError

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def test_a_short_deadline_client_leaves_a_dead_broker(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "data", shards=1, replicas=3, brokers=2, port=0,
                      fsync="never", heartbeat_ms=50, election_timeout_ms=500) as c:
        c.wait_ready(30)
        eps = c.endpoints
        with KVClient(eps[1:] + eps[:1], timeout_s=0.8) as kv:
            kv.put("k", "before")
            c.kill_broker(1, signal.SIGKILL)
            ok = 0
            deadline = time.time() + 15
            while time.time() < deadline and not ok:
                try:
                    kv.put("k", "after")
                    ok += 1
                except KVError:
                    pass
            assert ok, "every put failed for 15 s: the client stays on the dead broker"
